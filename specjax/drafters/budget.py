"""Draft budgets from costs measured on the device at hand, not hard-coded, and draft sizes
that fit a device-memory budget (SpecMemo: `fit_memory`).

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
from typing import Any, Callable, Mapping, Sequence

import numpy as np


def _verify_ms(table: Mapping, t: int) -> float:
  """ms of verifying T tokens, interpolated linearly in the measured table."""
  ts = sorted(int(k) for k in table)
  ms = [float(table[k] if k in table else table[str(k)]) for k in ts]
  if t > ts[-1]:
    raise ValueError(f"The verify-cost table stops at T={ts[-1]}; T={t} was asked for.")
  return float(np.interp(t, ts, ms))


def _plain_width(n: int) -> int:
  """Tokens one verification forward carries for n drafted nodes: the root and the nodes."""
  return 1 + n


def chain_depth(verify_ms: Mapping, draft_ms: float, accept: Sequence[float],
                width: Callable[[int], int] = _plain_width) -> tuple[int, float]:
  """(best chain depth, its predicted speedup over AR) for per-depth acceptance `accept`
  (accept[k - 1] = P(first k drafts accepted)); `width(n)` is the verification forward's
  width for n drafts (PPD's prompt tokens widen it)."""
  best = (0, 1.0)
  for d in range(1, len(accept) + 1):
    speedup = _chain_speedup(verify_ms, draft_ms, accept, d, width)
    if speedup > best[1]:
      best = (d, speedup)
  return best


def _chain_speedup(verify_ms: Mapping, draft_ms: float, accept: Sequence[float],
                   d: int, width: Callable[[int], int] = _plain_width) -> float:
  """Predicted tokens per ms of a depth-d chain over AR's."""
  tokens = 1.0 + float(np.sum(accept[:d]))
  return tokens * _verify_ms(verify_ms, 1) / (_verify_ms(verify_ms, width(d)) + d * draft_ms)


def tree_nodes(verify_ms: Mapping, depth: int, slack: float = 0.1,
               width: Callable[[int], int] = _plain_width) -> int:
  """The most tree nodes N (>= depth) whose verification costs at most (1 + slack) x that
  of a chain of `depth`."""
  limit = (1 + slack) * _verify_ms(verify_ms, width(depth))
  top = max(int(k) for k in verify_ms)
  fits = [n for n in range(depth, top + 1)
          if width(n) <= top and _verify_ms(verify_ms, width(n)) <= limit]
  return max([depth] + fits)


def sibling_tree(depth: int, num_nodes: int, top_k: int) -> list[tuple[int, ...]]:
  """Choice paths of a static tree of about `num_nodes` nodes: the top-1 chain `depth`
  deep, and at each level the next w - 1 candidates of the chain's node as leaves, with
  w = min(top_k, num_nodes // depth) (a chain when w = 1). For drafters whose levels are
  independent guesses (PPD, DFlash): the chain carries the likely path, the siblings the
  cheap second chances."""
  w = max(1, min(top_k, num_nodes // depth))
  return [(0,) * level + (r,) for level in range(depth) for r in range(w)]


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


def knobs(costs: Mapping, accept: Sequence[float], top_k: int = 1,
          width: Callable[[int], int] = _plain_width,
          draft_ms: float | None = None) -> tuple[dict, float]:
  """(decode knobs, the chain's predicted speedup over AR) for a head from measured costs
  and its simulated acceptance: the chain depth with the most tokens per ms (at least 1: a
  drafter drafts, even where the prediction says AR is faster), and for a tree (top_k > 1)
  the nodes whose verification costs about what that chain's does. `width` and `draft_ms`
  (default: the cost file's) describe drafters that verify wider or draft for free."""
  draft_ms = float(costs["draft_ms"]) if draft_ms is None else draft_ms
  depth, speedup = chain_depth(costs["verify_ms"], draft_ms, accept, width)
  if depth == 0:
    depth = 1
    speedup = _chain_speedup(costs["verify_ms"], draft_ms, accept, 1, width)
  if top_k == 1:
    return {"depth": depth}, speedup
  return {"depth": depth, "num_nodes": tree_nodes(costs["verify_ms"], depth, width=width)
          }, speedup


def step_ms(verify_ms: Mapping, n: int) -> tuple[float, ...]:
  """ms of one decode step that verifies d drafts, for d = 0..n: the loop compiles
  verification for a few widths (`decode.verify_widths`) and runs the narrowest that holds
  the drafts, so d drafts cost a forward of 1 + that width. Drafts that cost nothing to
  make (lookup, suffix matching) are worth d tokens when the expected gain per ms beats
  AR's."""
  from specjax import decode  # pylint: disable=g-import-not-at-top
  widths = decode.verify_widths(n)
  return tuple(_verify_ms(verify_ms, 1 + min(w for w in widths if w >= d)) for d in range(n + 1))



def fit_memory(model, prompts, candidates: Sequence[tuple[str, Any]], limit_bytes: int,
               log: Callable[[str], None] = print, **generate_kwargs) -> tuple[str, Any, int]:
  """SpecMemo's memory budget: the first of `candidates` ((label, drafter) pairs, largest
  first; None = AR) whose decode program fits `limit_bytes` of device memory, measured
  from the compiled program itself (`decode.program_bytes`: weights, KV caches, draft
  trees and buffers, temporaries), with the same prompts and `generate` settings it will
  run with. Each candidate that does not fit is named in a message (`log`) and the next
  is tried; if none fits, a ValueError says what the smallest needs. Nothing runs on the
  device, so a budget too small is an error before decoding, never an out-of-memory crash.
  Returns (label, drafter, bytes)."""
  from specjax import decode  # pylint: disable=g-import-not-at-top
  if not candidates:
    raise ValueError("fit_memory needs at least one (label, drafter) candidate.")
  need = []
  for label, drafter in candidates:
    n = decode.program_bytes(model, prompts, drafter=drafter, **generate_kwargs)
    if n <= limit_bytes:
      return label, drafter, n
    need.append((label, n))
    log(f"memory budget: {label} needs {n / 2**20:.1f} MiB > {limit_bytes / 2**20:.1f} MiB; "
        "trying the next candidate")
  smallest = min(need, key=lambda x: x[1])
  raise ValueError(f"No candidate fits the memory budget of {limit_bytes / 2**20:.1f} MiB: "
                   f"the smallest, {smallest[0]}, needs {smallest[1] / 2**20:.1f} MiB.")
