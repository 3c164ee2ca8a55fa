"""Training metrics: one JSON line per log or eval row (fsynced), and a PNG of the curves."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

METRICS = "metrics.jsonl"
PLOT = "curves.png"


class Log:
  """Appends rows to `workdir/metrics.jsonl`; `plot()` redraws `workdir/curves.png`.

  A resumed run drops rows past its restored step first, so the file holds one curve."""

  def __init__(self, workdir: str, resume_step: int | None = None, write: bool = True):
    self.path = os.path.join(workdir, METRICS)
    self.png = os.path.join(workdir, PLOT)
    self.enabled = write  # False: a process other than the one that writes files
    if write and resume_step is not None and os.path.exists(self.path):
      rows = read(self.path)
      kept = [r for r in rows if r["step"] <= resume_step]
      if len(kept) < len(rows):
        print(f"{self.path}: dropped {len(rows) - len(kept)} rows past micro-step "
              f"{resume_step}, where the run resumes (it logs them again).", file=sys.stderr)
      with open(self.path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def plot(self) -> None:
    if not self.enabled:
      return
    plot(read(self.path), self.png)


def read(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics file. A torn last line (the run died mid-write) is dropped with
  a warning; a line before it that is not JSON is an error naming the file and line."""
  with open(path, encoding="utf-8") as f:
    lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
  rows = []
  for k, (n, line) in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if k == len(lines) - 1:
        print(f"warning: {path}: dropped its torn last line {n} (not JSON: the run stopped "
              "mid-write).", file=sys.stderr)
        break
      raise ValueError(f"{path}: line {n} is not JSON ({e.msg}); fix or remove it to "
                       "resume.") from None
  return rows


def summary(row: dict[str, Any]) -> str:
  """One line: step, loss, per-position top-1 agreement and simulated tau."""
  top1 = " ".join(f"{row[k]:.2f}" for k in sorted(row) if k.startswith("top1/"))
  acc = " ".join(f"{row[k]:.2f}" for k in sorted(row) if k.startswith("sim_accept/"))
  return (f"[{row['split']} step {row['step']}] loss {row['loss']:.4f}  top1 {top1}  "
          f"sim_tau {row.get('sim_tau', float('nan')):.2f}  (P(first k accepted): {acc})")


def plot(rows: list[dict[str, Any]], png: str) -> None:
  """Train/eval loss, held-out top-1 per position, and simulated tau against step."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  train = [r for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for split, rs in (("train", train), ("eval", evals)):
    if rs:
      axes[0].plot([r["step"] for r in rs], [r["loss"] for r in rs], label=split)
  positive = all(r["loss"] > 0 for r in train + evals)  # TVD++'s surrogate can be negative
  axes[0].set(title="loss", xlabel="micro-step", yscale="log" if positive else "linear")
  axes[0].legend()
  for k in sorted({k for r in evals for k in r if k.startswith("top1/")}):
    axes[1].plot([r["step"] for r in evals], [r.get(k) for r in evals], label=k)
  axes[1].set(title="held-out top-1 agreement with the target", xlabel="micro-step")
  if evals:
    axes[1].legend()
  axes[2].plot([r["step"] for r in evals], [r.get("sim_tau") for r in evals], marker="o")
  axes[2].set(title="simulated tau (greedy chain)", xlabel="micro-step")
  fig.tight_layout()
  fig.savefig(png, dpi=90)
  plt.close(fig)
