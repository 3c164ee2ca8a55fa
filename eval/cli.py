"""`specjax-eval --config configs/<sweep>.py[:arg] --workdir DIR [--config.key=value ...]`.

Runs (or resumes) the sweep a config file describes, writes results.jsonl, summary.csv,
summary.md and plots into DIR, and prints the summary table.
"""

from __future__ import annotations

import time

import jax
from absl import app, flags
from ml_collections import config_flags

from specjax import runtime, sharding

from . import report, sweep

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Sweep config: a file with get_config(arg), e.g. configs/demo.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder; rerunning on it resumes the sweep.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  # Several processes start jax.distributed before anything else touches JAX.
  sharding.initialize(_CONFIG.value.get("distributed"))
  runtime.enable_compilation_cache()
  runtime.check_map_count()  # a sweep holds a compiled program per method and cell shape
  plan = sweep.plan(_CONFIG.value)
  new_rows = sweep.run(plan, _WORKDIR.value)
  if jax.process_index():
    return  # process 0 writes the results and the report
  summary = report.write(_WORKDIR.value)
  print(report.markdown(summary))
  print(f"\n{len(new_rows)} new rows in {time.perf_counter() - start:.0f} s; "
        f"outputs in {_WORKDIR.value}")


def run() -> None:
  """Console entry point (`specjax-eval`)."""
  app.run(main, flags_parser=runtime.parse_config_flags)


if __name__ == "__main__":
  run()
