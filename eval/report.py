"""Sweep outputs: results.jsonl I/O, and the summary and plots regenerated from it.

results.jsonl holds one JSON row per method x dataset x prompt x temperature x seed; rows
are appended and fsynced one by one so an interrupted sweep loses nothing it finished.
`write(workdir)` rebuilds summary.csv, summary.md and the PNG plots from the whole file.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import sys
from typing import IO, Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from . import metrics

RESULTS = "results.jsonl"
KEY = ("method", "dataset", "prompt_id", "temperature", "seed")
SUMMARY_FIELDS = ("method", "dataset", "temperature", "drafter", "num_nodes", "rows",
                  "new_tokens", "tau", "tokens_per_s", "speedup", "target_per_token",
                  "draft_per_token", "draft_per_accepted", "drafted_per_step", "all_equal",
                  "match_ar",
                  "first_divergence", "logprob", "score", "lossy")


def row_key(row: Mapping[str, Any]) -> tuple:
  """What identifies a row: a restarted sweep skips keys it already has."""
  return tuple(row[k] for k in KEY)


def read_rows(path: str, repair: bool = True) -> list[dict[str, Any]]:
  """The rows of a results file ([] if absent).

  A last row without its final newline that is whole JSON is kept, and with `repair` the
  newline is added so that appending resumes on a clean line. A torn last line (the
  process died mid-write) is dropped, said on stderr, and with `repair` cut off the file.
  The file is opened for writing only to repair it.
  """
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1
  tail = data[end:]
  kept_tail = False
  if tail.strip():
    try:
      kept_tail = isinstance(json.loads(tail), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
      pass
    if not kept_tail:
      print(f"{path}: dropped its torn last line ({len(tail)} bytes, not whole JSON: the "
            "sweep stopped mid-write); that row is measured again.", file=sys.stderr)
  if repair and end < len(data):
    try:
      if kept_tail:  # a whole row missing only its newline: add the newline, keep the row
        with open(path, "ab") as f:
          f.write(b"\n")
      else:
        with open(path, "rb+") as f:
          f.truncate(end)
    except OSError as e:
      print(f"{path}: could not repair its last line ({e.strerror}).", file=sys.stderr)
  rows = []
  for i, line in enumerate((data if kept_tail else data[:end]).decode("utf-8").splitlines()):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {i + 1} is not JSON ({e}).") from e
  return rows


def append_row(f: IO[str], row: Mapping[str, Any]) -> None:
  """Appends one row and forces it to disk before the sweep goes on."""
  f.write(json.dumps(row) + "\n")
  f.flush()
  os.fsync(f.fileno())


def _fmt(value: Any, digits: int = 2) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def markdown(summary: Sequence[Mapping[str, Any]]) -> str:
  """The summary as a Markdown table."""
  head = ("method", "dataset", "T", "rows", "tau", "tok/s", "speedup", "target fwd/tok",
          "draft fwd/tok", "draft fwd/accepted", "drafted/step", "all = AR", "tokens = AR",
          "first diff", "logprob", "score", "lossy")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summary:
    cells = (s["method"], s["dataset"], _fmt(s["temperature"], 1), s["rows"],
             _fmt(s["tau"]), _fmt(s["tokens_per_s"], 1),
             "-" if s["speedup"] is None else f"{s['speedup']:.2f}x",
             _fmt(s["target_per_token"]), _fmt(s["draft_per_token"]),
             _fmt(s["draft_per_accepted"]), _fmt(s.get("drafted_per_step")),
             _fmt(s["all_equal"]),
             "-" if s.get("match_ar") is None else f"{100 * s['match_ar']:.0f}%",
             _fmt(s.get("first_divergence"), 0), _fmt(s.get("logprob")),
             _fmt(s.get("score")), _fmt(s["lossy"]))
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)


def _write_csv(summary: Sequence[Mapping[str, Any]], path: str) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, SUMMARY_FIELDS)
    writer.writeheader()
    writer.writerows({k: s.get(k) for k in SUMMARY_FIELDS} for s in summary)


def _plot_speedup(summary: Sequence[Mapping[str, Any]], path: str) -> None:
  """Grouped bars: x = dataset, one bar per method (AR is the dashed line at 1), one panel
  per temperature; LOSSY methods hatched and named "(LOSSY)"."""
  temps = sorted({s["temperature"] for s in summary})
  fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
  for ax, temp in zip(axes[0], temps):
    rows = [s for s in summary if s["temperature"] == temp and s["drafter"] != "ar"
            and s["speedup"] is not None]
    datasets = list(dict.fromkeys(s["dataset"] for s in rows))
    methods = list(dict.fromkeys(s["method"] for s in rows))
    lossy = {s["method"] for s in rows if s["lossy"]}
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
      by_ds = {s["dataset"]: s["speedup"] for s in rows if s["method"] == m}
      xs = [i + j * width for i, d in enumerate(datasets) if d in by_ds]
      ax.bar(xs, [by_ds[d] for d in datasets if d in by_ds], width,
             label=m + (" (LOSSY)" if m in lossy else ""), hatch="//" if m in lossy else None)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(datasets))],
                  datasets)
    ax.set_ylabel("speedup vs AR")
    ax.set_title(f"temperature {temp:g}")
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _plot_quality(summary: Sequence[Mapping[str, Any]], path: str) -> None:
  """The quality-vs-speed frontier: per dataset and temperature (columns), tokens/s and tau
  against the task score (where the dataset has one) and against the target's mean
  log-prob per token (rows). LOSSY methods are hollow markers named "(LOSSY)"; the
  lossless ones filled."""
  panels = sorted({(s["dataset"], s["temperature"]) for s in summary})
  qualities = [q for q in ("score", "logprob") if any(s.get(q) is not None for s in summary)]
  axes_rows = [(q, speed) for q in qualities for speed in ("tokens_per_s", "tau")]
  fig, axes = plt.subplots(max(len(axes_rows), 1), len(panels),
                           figsize=(5 * len(panels), 4 * max(len(axes_rows), 1)),
                           squeeze=False)
  for j, (dataset, temp) in enumerate(panels):
    group = [s for s in summary if (s["dataset"], s["temperature"]) == (dataset, temp)]
    for i, (quality, speed) in enumerate(axes_rows):
      ax = axes[i][j]
      for s in group:
        if s.get(quality) is None or s.get(speed) is None:
          continue
        label = s["method"] + (" (LOSSY)" if s["lossy"] else "")
        ax.scatter(s[quality], s[speed], facecolors="none" if s["lossy"] else None,
                   edgecolors="C3" if s["lossy"] else None)
        ax.annotate(label, (s[quality], s[speed]), xytext=(4, 2), textcoords="offset points",
                    fontsize=6)
      ax.set_xlabel("task score (pass@1 / exact answer)" if quality == "score"
                    else "target log-prob per token")
      ax.set_ylabel("tokens/s" if speed == "tokens_per_s" else "tau")
      ax.set_title(f"{dataset}, T={temp:g}")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _plot_accepted(rows: Iterable[Mapping[str, Any]], path: str) -> None:
  """Per drafting method: the share of target calls that accepted k draft tokens."""
  hists: dict[str, list[int]] = {}
  for r in rows:
    h = r.get("accepted_hist")
    if h and r["drafter"] != "ar":
      total = hists.setdefault(r["method"], [0] * len(h))
      total.extend([0] * (len(h) - len(total)))
      for k, n in enumerate(h):
        total[k] += n
  cols = min(3, max(len(hists), 1))
  nrows = -(-max(len(hists), 1) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
  for ax, (method, h) in zip(axes.flat, hists.items()):
    calls = max(sum(h), 1)
    ax.bar(range(len(h)), [n / calls for n in h])
    ax.set_title(method)
    ax.set_xlabel("accepted draft tokens per target call")
    ax.set_ylabel("share of calls")
  for ax in list(axes.flat)[len(hists):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _family(row: Mapping[str, Any]) -> str:
  """A method up to its draft budget: drafter, its other knobs, stop policy, acceptance."""
  knobs = sorted((k, v) for k, v in (row.get("drafter_kwargs") or {}).items()
                 if k not in ("depth", "num_nodes"))
  parts = [row["drafter"], *(f"{k}={os.path.basename(str(v))}" for k, v in knobs),
           row.get("stop"), row.get("acceptance")]
  return "/".join(str(p) for p in parts if p)


def budget_curves(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[int, float]]:
  """tau by num_nodes (the draft tree's size), for every (family, temperature) run with at least two budgets."""
  totals: dict[str, dict[int, list[int]]] = {}
  for r in rows:
    if r["drafter"] == "ar" or r["target_calls"] is None or not r["num_nodes"]:
      continue
    label = f"{_family(r)} T={r['temperature']:g}"
    new_calls = totals.setdefault(label, {}).setdefault(r["num_nodes"], [0, 0])
    new_calls[0] += r["new_tokens"]
    new_calls[1] += r["target_calls"]
  return {label: {k: metrics.tau(n, c) for k, (n, c) in sorted(by_k.items())}
          for label, by_k in totals.items() if len(by_k) > 1}


def _plot_budget(curves: Mapping[str, Mapping[int, float]], path: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, by_k in curves.items():
    ax.plot(list(by_k), list(by_k.values()), marker="o", label=label)
  ax.set_xlabel("num_nodes (draft tree size)")
  ax.set_ylabel("tau (tokens per target call)")
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write(workdir: str) -> list[dict[str, Any]]:
  """Regenerates summary.csv, summary.md and the plots from results.jsonl; returns the
  summary. tau_vs_budget.png appears only when some drafter ran with several budgets.
  A workdir that cannot be written (read-only) still gives its summary: the files are
  skipped with a note on stderr."""
  # Prompts the sweep could not run (e.g. longer than the context) keep a row saying why.
  rows = [r for r in read_rows(os.path.join(workdir, RESULTS), repair=False)
          if not r.get("skipped")]
  summary = metrics.summarize(rows)
  try:
    _write_files(workdir, rows, summary)
  except OSError as e:
    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
      raise
    print(f"note: {workdir} is not writable ({e.strerror}: {e.filename}); the summary "
          "files and plots were not written.", file=sys.stderr)
  return summary


def _write_files(workdir: str, rows: Sequence[Mapping[str, Any]],
                 summary: Sequence[Mapping[str, Any]]) -> None:
  _write_csv(summary, os.path.join(workdir, "summary.csv"))
  with open(os.path.join(workdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(markdown(summary) + "\n")
  _plot_speedup(summary, os.path.join(workdir, "speedup.png"))
  if any(s.get("logprob") is not None for s in summary):
    _plot_quality(summary, os.path.join(workdir, "quality_vs_speed.png"))
  _plot_accepted(rows, os.path.join(workdir, "accepted_hist.png"))
  curves = budget_curves(rows)
  if curves:
    _plot_budget(curves, os.path.join(workdir, "tau_vs_budget.png"))
