"""The tau-vs-data curve: runs of one recipe on shares of the data, tau at each.

  python -m specjax.training.data_curve workdir/eagle3_f0.25 workdir/eagle3_f0.5 \
      workdir/eagle3_full --png docs/img/tau_vs_data.png

Each workdir is a finished `specjax-train` run of one recipe with `data=F` (the same
held-out rows and steps per token at every share; `train_common.data_fraction`). For each
it reads the exported head's held-out simulated tau (the best eval's under `keep_best`)
and decodes the held-out rows' prompts with `generate` for the measured tau
(`tau_check.measure`), then prints a table and plots both against the distinct training
tokens.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import ml_collections

from specjax import models, runtime
from specjax.drafters import io as head_io

from . import tau_check, trainer


def point(workdir: str, max_new_tokens: int = 96) -> dict:
  """One run's row: its data share, distinct training tokens, the tokens it trained on,
  the step of its exported head, simulated and measured tau."""
  path = os.path.join(workdir, trainer.CONFIG_FILE)
  if not os.path.exists(os.path.join(workdir, trainer.HEAD_DIR, head_io.META)):
    raise FileNotFoundError(f"{workdir} has no exported head: finish (or resume) its run.")
  with open(path, encoding="utf-8") as f:
    c = ml_collections.ConfigDict(json.load(f))
  meta = head_io.read_meta(os.path.join(workdir, trainer.HEAD_DIR))
  data = trainer.load_data(c, models.load(c.target, c.dtype))
  tau = tau_check.measure(workdir, max_new_tokens)
  return {"workdir": workdir, "head": c.head, "fraction": float(c.data.get("fraction", 1.0)),
          "rows": len(data.tokens), "distinct_tokens": data.train_tokens,
          "trained_tokens": meta.get("trained_tokens"), "step": meta.get("step"),
          "steps": c.steps, "sim_tau": tau["simulated"], "measured_tau": tau["measured"],
          "held_out_rows": tau["rows"], "depth": tau["depth"]}


def plot(rows: Sequence[dict], png: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = sorted(rows, key=lambda r: r["distinct_tokens"])
  x = [r["distinct_tokens"] for r in rows]
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  ax.plot(x, [r["sim_tau"] for r in rows], "o-", label="held-out simulated tau")
  ax.plot(x, [r["measured_tau"] for r in rows], "s--", label="measured tau (generate)")
  ax.set_xscale("log")
  ax.set_xlabel("distinct training tokens (target-distilled)")
  ax.set_ylabel(f"tau (chain of {rows[0]['depth']})")
  ax.set_title(f"{rows[0]['head']} on SmolLM2-135M: tau vs data")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
  fig.savefig(png, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(prog="python -m specjax.training.data_curve",
                              description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+", help="finished runs of one recipe at several data=F")
  p.add_argument("--png", default=None, help="where to write the plot")
  p.add_argument("--json", default=None, help="where to write the rows")
  p.add_argument("--max_new_tokens", type=int, default=96)
  args = p.parse_args(argv)
  heads = set()
  for w in args.workdirs:
    with open(os.path.join(w, trainer.CONFIG_FILE), encoding="utf-8") as f:
      heads.add(json.load(f)["head"])
  if len(heads) > 1:
    raise SystemExit(f"The runs train different heads ({sorted(heads)}): one recipe a curve.")
  runtime.enable_compilation_cache()
  rows = [point(w, args.max_new_tokens) for w in args.workdirs]
  print("| data share | training rows | distinct tokens | head's step / steps | simulated tau "
        "| measured tau |\n|---|---|---|---|---|---|")
  for r in sorted(rows, key=lambda r: r["fraction"]):
    print(f"| {r['fraction']:g} | {r['rows']} | {r['distinct_tokens']:,} | {r['step']} / "
          f"{r['steps']} | {r['sim_tau']:.3f} | {r['measured_tau']:.3f} |")
  if args.png:
    plot(rows, args.png)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
