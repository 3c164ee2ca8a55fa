"""Draft budgets from costs measured on the device at hand, not hard-coded.

EAGLE-2's reference times the target at a few tree sizes and keeps the cheapest per token.
Here the inputs are `make bench`'s verify-cost table (ms of one target forward of T
tokens against a cache, `bench.json["verify_ms"]`), the draft network's ms per forward,
and a head's simulated acceptance (`sim_accept/k` from training: P(the first k drafts of
a greedy chain are accepted)):

  chain depth d:  tokens per step = 1 + sum_{k<=d} P(first k accepted)
                  ms per step     = verify(1 + d) + d * draft_ms
  pick the d with the most tokens per ms.

A dynamic tree then spends the verify budget that is nearly free: the most nodes N with
verify(1 + N) within `slack` of the chosen chain's verify(1 + d) (on this CPU T = 4 and
T = 8 cost about the same; on a TPU or GPU 60 nodes cost about one token).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np


def _verify_ms(table: Mapping, t: int) -> float:
  """ms of verifying T tokens, interpolated linearly in the measured table."""
  ts = sorted(int(k) for k in table)
  ms = [float(table[k] if k in table else table[str(k)]) for k in ts]
  if t > ts[-1]:
    raise ValueError(f"The verify-cost table stops at T={ts[-1]}; T={t} was asked for.")
  return float(np.interp(t, ts, ms))


def chain_depth(verify_ms: Mapping, draft_ms: float, accept: Sequence[float]
                ) -> tuple[int, float]:
  """(best chain depth, its predicted speedup over AR) for per-depth acceptance `accept`
  (accept[k - 1] = P(first k drafts accepted))."""
  best = (0, 1.0)
  for d in range(1, len(accept) + 1):
    speedup = _chain_speedup(verify_ms, draft_ms, accept, d)
    if speedup > best[1]:
      best = (d, speedup)
  return best


def _chain_speedup(verify_ms: Mapping, draft_ms: float, accept: Sequence[float],
                   d: int) -> float:
  """Predicted tokens per ms of a depth-d chain over AR's."""
  tokens = 1.0 + float(np.sum(accept[:d]))
  return tokens * _verify_ms(verify_ms, 1) / (_verify_ms(verify_ms, 1 + d) + d * draft_ms)


def tree_nodes(verify_ms: Mapping, depth: int, slack: float = 0.1) -> int:
  """The most tree nodes N (>= depth) whose verification costs at most (1 + slack) x that
  of a chain of `depth`."""
  limit = (1 + slack) * _verify_ms(verify_ms, 1 + depth)
  top = max(int(k) for k in verify_ms) - 1
  return max([depth] + [n for n in range(depth, top + 1) if _verify_ms(verify_ms, 1 + n) <= limit])


def read_costs(path: str) -> dict:
  """A cost file (`make bench`'s `costs.json`: the device, `verify_ms` by T, `draft_ms`)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No cost file at {path!r}: `make bench` writes one "
                            "(workdir/bench/costs.json) for the device at hand.")
  with open(path, encoding="utf-8") as f:
    costs = json.load(f)
  missing = {"verify_ms", "draft_ms"} - set(costs)
  if missing:
    raise ValueError(f"{path} lacks {sorted(missing)}: re-run `make bench`.")
  return costs


def knobs(costs: Mapping, accept: Sequence[float], top_k: int = 1) -> tuple[dict, float]:
  """(decode knobs, the chain's predicted speedup over AR) for a head from measured costs
  and its simulated acceptance: the chain depth with the most tokens per ms (at least 1: a
  drafter drafts, even where the prediction says AR is faster), and for a tree (top_k > 1)
  the nodes whose verification costs about what that chain's does."""
  depth, speedup = chain_depth(costs["verify_ms"], float(costs["draft_ms"]), accept)
  if depth == 0:
    depth = 1
    speedup = _chain_speedup(costs["verify_ms"], float(costs["draft_ms"]), accept, 1)
  if top_k == 1:
    return {"depth": depth}, speedup
  return {"depth": depth, "num_nodes": tree_nodes(costs["verify_ms"], depth)}, speedup


def step_ms(verify_ms: Mapping, n: int) -> tuple[float, ...]:
  """ms of one decode step that verifies d drafts, for d = 0..n: the loop compiles
  verification for a few widths (`decode.verify_widths`) and runs the narrowest that holds
  the drafts, so d drafts cost a forward of 1 + that width. Drafts that cost nothing to
  make (lookup, suffix matching) are worth d tokens when the expected gain per ms beats
  AR's."""
  from specjax import decode  # pylint: disable=g-import-not-at-top
  widths = decode.verify_widths(n)
  return tuple(_verify_ms(verify_ms, 1 + min(w for w in widths if w >= d)) for d in range(n + 1))

