"""`specjax-train --config configs/<head>.py[:arg] --workdir DIR [--config.key=value ...]`.

Trains (or resumes, on the same DIR) the draft head a config file describes against its
frozen target. DIR gets config.json, checkpoints/, metrics.jsonl, curves.png and, at the
end, head/ (load it with `specjax.drafters.load_drafter` or a sweep's `checkpoint=`).
A configs/stop.py config trains a learned stop policy for a drafter instead: DIR gets
labels/ (resumable), metrics.json and predictor/ (`stopping.get(kind, checkpoint=...)`).
A configs/specee.py config trains SpecEE's exit predictors: DIR gets examples/
(resumable), metrics.json and predictor/ (`drafter="specee", checkpoint=...`).
A configs/judge.py config trains Judge Decoding's judge: DIR gets examples/ (resumable),
metrics.json and judge/ (`acceptance="judge", checkpoint=...`); configs/arbitrage.py
trains Arbitrage's router: DIR gets examples/, metrics.json and router/.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from specjax import runtime, sharding

from . import arbitrage, judge, specee, stop, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config: a file with get_config(arg), e.g. configs/eagle.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; rerunning on it resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Several processes start jax.distributed before anything else touches JAX.
  sharding.initialize(_CONFIG.value.get("distributed"))
  runtime.enable_compilation_cache()
  for key, predictor, out in (("stop_predictor", stop, "predictor"),
                              ("exit_predictor", specee, "predictor"),
                              ("judge", judge, "judge"),
                              ("router", arbitrage, "router")):
    if key in _CONFIG.value:  # configs/stop.py, specee.py, judge.py: predictors, not heads
      metrics = predictor.train(_CONFIG.value, _WORKDIR.value)
      print(f"done; predictor in {_WORKDIR.value}/{out}; {metrics}")
      return
  try:
    last = trainer.train(_CONFIG.value, _WORKDIR.value)
  except trainer.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"done; head in {_WORKDIR.value}/{trainer.HEAD_DIR}; last eval: {last}")


def run() -> None:
  """Console entry point (`specjax-train`)."""
  app.run(main, flags_parser=runtime.parse_config_flags)


if __name__ == "__main__":
  run()
