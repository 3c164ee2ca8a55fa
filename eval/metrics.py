"""Sweep metrics: pure functions of measured numbers and result rows.

Conventions (Spec-Bench): tau counts the bonus/correction token, so autoregressive decoding
has tau 1; speedup is the mean per-prompt tokens/s of a method over that of the AR baseline
on the same prompts.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Mapping, Sequence

Row = Mapping[str, Any]

# A summary groups rows by these fields.
GROUP = ("method", "dataset", "temperature")


def tau(new_tokens: int, target_calls: int | None) -> float | None:
  """Mean tokens gained per target forward (bonus counted); None when calls are unknown."""
  if not target_calls:
    return None
  return new_tokens / target_calls


def tokens_per_s(new_tokens: int, seconds: float) -> float:
  """Decoding throughput of one generation."""
  return new_tokens / seconds if seconds > 0 else float("inf")


def per_token(calls: int | None, new_tokens: int) -> float | None:
  """Forwards (target or draft) spent per generated token; None when unknown."""
  if calls is None or new_tokens == 0:
    return None
  return calls / new_tokens


def accepted_histogram(gained_per_step: Iterable[int], num_nodes: int) -> list[int]:
  """`hist[k]` = target calls that accepted k draft tokens (gained k + 1), k in 0..num_nodes.

  `gained_per_step` is a row of `Stats.accepted`; 0 marks steps after the sequence ended.
  """
  hist = [0] * (num_nodes + 1)
  for gained in gained_per_step:
    if gained > 0:
      hist[min(gained - 1, num_nodes)] += 1
  return hist


def agreement(tokens: Sequence[int], ar_tokens: Sequence[int]) -> tuple[float, int | None]:
  """(share of positions where a greedy method's token equals AR's, the first position
  where they differ or None), over the longer of the two outputs: what a LOSSY method
  (SpecEE) is measured by beside its speed."""
  n = max(len(tokens), len(ar_tokens))
  same = [i < len(tokens) and i < len(ar_tokens) and tokens[i] == ar_tokens[i]
          for i in range(n)]
  return (sum(same) / n if n else 1.0), next((i for i, s in enumerate(same) if not s), None)


def speedup(method_tps: Sequence[float], ar_tps: Sequence[float]) -> float | None:
  """Mean per-prompt tokens/s of a method over that of AR (Spec-Bench)."""
  if not method_tps or not ar_tps:
    return None
  return statistics.fmean(method_tps) / statistics.fmean(ar_tps)


def baseline_method(rows: Iterable[Row]) -> str | None:
  """Name of the AR baseline: the method whose drafter is "ar"."""
  names = {r["method"] for r in rows if r.get("drafter") == "ar"}
  if len(names) > 1:
    raise ValueError(f"Several AR baselines in the results: {sorted(names)}.")
  return next(iter(names), None)


def _sum_or_none(values: Sequence[int | None]) -> int | None:
  return None if any(v is None for v in values) else sum(values)


def _summarize_group(rows: Sequence[Row], ar_tps: Mapping[tuple, float]) -> dict[str, Any]:
  first = rows[0]
  new = sum(r["new_tokens"] for r in rows)
  target = _sum_or_none([r["target_calls"] for r in rows])
  draft = _sum_or_none([r["draft_calls"] for r in rows])
  paired = [(r["tokens_per_s"], ar_tps[_cell(r)]) for r in rows if _cell(r) in ar_tps]
  equal = [r["equal_to_ar"] for r in rows if r["equal_to_ar"] is not None]
  # Rows written before the agreement fields existed have none.
  greedy = [r for r in rows if r.get("match_ar") is not None]
  diverged = [r["new_tokens"] if r["diverge_at"] is None else r["diverge_at"] for r in greedy]
  return {
      **{k: first[k] for k in GROUP},
      "drafter": first["drafter"],
      "num_nodes": first["num_nodes"],
      "rows": len(rows),
      "new_tokens": new,
      "tau": tau(new, target),
      "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rows),
      "speedup": speedup([m for m, _ in paired], [a for _, a in paired]),
      "target_per_token": per_token(target, new),
      "draft_per_token": per_token(draft, new),
      # accepted drafts = new tokens - one per target call (its bonus/correction token)
      "draft_per_accepted": per_token(draft, new - target) if target is not None else None,
      # The mean draft length a step verified (rows written before the field have none).
      "drafted_per_step": _weighted_drafted(rows),
      "all_equal": all(equal) if equal else None,
      "match_ar": statistics.fmean(r["match_ar"] for r in greedy) if greedy else None,
      # The median position of the first token that differs from AR's (a row equal to AR
      # counts as its length).
      "first_divergence": statistics.median(diverged) if diverged else None,
      # Quality (`quality`): the target's mean log-prob per generated token, and the
      # task score (HumanEval pass@1, GSM8K exact answer) over the rows that have one.
      "logprob": _mean_of(rows, "logprob"),
      "score": _mean_of(rows, "score"),
      "lossy": any(r["lossy"] for r in rows),
  }


def _weighted_drafted(rows: Sequence[Row]) -> float | None:
  """Drafted tokens per verification over the rows, each weighted by its target calls."""
  have = [r for r in rows if r.get("drafted_per_step") is not None and r["target_calls"]]
  if not have:
    return None
  calls = sum(r["target_calls"] for r in have)
  return sum(r["drafted_per_step"] * r["target_calls"] for r in have) / calls


def _mean_of(rows: Sequence[Row], field: str) -> float | None:
  values = [r[field] for r in rows if r.get(field) is not None]
  return statistics.fmean(values) if values else None


def _cell(row: Row) -> tuple:
  return row["dataset"], row["prompt_id"], row["temperature"], row["seed"]


def summarize(rows: Sequence[Row]) -> list[dict[str, Any]]:
  """One summary per method x dataset x temperature, in first-seen method order.

  tau and forwards per token are ratios of totals; tokens/s is the mean per-prompt value;
  speedup pairs each row with the AR row of the same prompt, temperature and seed;
  `all_equal`, `match_ar` and `first_divergence` are None when no row of the group is
  greedy.
  """
  base = baseline_method(rows)
  ar_tps = {_cell(r): r["tokens_per_s"] for r in rows if r["method"] == base}
  groups: dict[tuple, list[Row]] = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in GROUP), []).append(r)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  order = sorted(groups, key=lambda k: (methods.index(k[0]), k[1], k[2]))
  return [_summarize_group(groups[k], ar_tps) for k in order]
