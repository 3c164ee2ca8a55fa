"""Training seconds at each held-out eval, recomputed from a run's own metrics.

  python -m specjax.training.wallclock workdir/dflash assets/heads/eagle3-smollm2-135m

A run's train rows log tokens/s over each window of `log_every` micro-steps (the padded
tokens of its batches, compiles included, evals excluded); the batches are a pure function
of (seed, step), so the window's tokens, and with them its seconds, follow from the
run's config. This puts heads trained by different recipes on one wall-clock axis
(DFlash against EAGLE-3 on the same data and time budget). Takes a workdir or an exported
head folder that kept its `config.json` and `metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import ml_collections

from specjax import models

from . import metrics, trainer


def seconds_at_evals(workdir: str) -> list[dict]:
  """[{step, train_s, sim_tau}] for each held-out eval of the run, train_s being the
  train-step seconds before it."""
  with open(os.path.join(workdir, trainer.CONFIG_FILE), encoding="utf-8") as f:
    c = ml_collections.ConfigDict(json.load(f))
  rows = metrics.read(os.path.join(workdir, metrics.METRICS))
  data = trainer.load_data(c, models.load(c.target, c.dtype))
  out, seconds, last = [], 0.0, 0
  for r in rows:
    if r["split"] == "train":
      tokens = sum(len(idx) * width for idx, width in
                   (data.batch_rows(s, c.batch_size) for s in range(last, r["step"])))
      seconds += tokens / r["tokens_per_s"]
      last = r["step"]
    elif r["step"] == last:
      out.append({"step": r["step"], "train_s": seconds, "sim_tau": r["sim_tau"]})
  return out


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(prog="python -m specjax.training.wallclock",
                              description=__doc__.splitlines()[0])
  p.add_argument("runs", nargs="+", help="workdirs or head folders with config.json and "
                                         "metrics.jsonl")
  args = p.parse_args(argv)
  out = {}
  for run in args.runs:
    for name in (trainer.CONFIG_FILE, metrics.METRICS):
      if not os.path.exists(os.path.join(run, name)):
        raise SystemExit(f"{run} has no {name}: give a workdir or a head folder that kept it.")
  print("| run | step | train minutes | held-out simulated tau |\n|---|---|---|---|")
  for run in args.runs:
    out[run] = seconds_at_evals(run)
    for r in out[run]:
      print(f"| {run} | {r['step']} | {r['train_s'] / 60:.1f} | {r['sim_tau']:.3f} |")
  return out


if __name__ == "__main__":
  main()
