"""A request stream through `specjax.serve`: throughput, latency and tau per method and
scheduling policy, every output checked equal across them.

  python -m specjax.evaluation.stream --config configs/stream.py --workdir workdir/stream

The requests are the built-in evaluation prompts (chat-templated, at most
`max_prompt_tokens` tokens) with budgets drawn from [min_new_tokens, max_new_tokens],
arriving by a Poisson process of `rate` requests per second (0: all at once) or at the
times in `arrivals_file` (a JSON list of seconds). Each (method, policy) cell runs the
whole stream after its engine has compiled, and appends one row to results.jsonl (a rerun
skips the cells already there); summary.md holds the table. Greedy outputs must be equal
in every cell, request by request (`all equal` column).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from specjax import models, runtime, serve

from . import prompts as prompts_lib
from . import sweep

RESULTS = "results.jsonl"


def requests(target: models.Model, c: Any) -> list[serve.Request]:
  """The stream's requests (prompt tokens, budget, arrival), a pure function of the config."""
  rng = np.random.default_rng(c.seed)
  pool = []
  for name in c.datasets:
    for p in prompts_lib.load(name):
      if target.tokenizer is None:  # random test targets: the prompt's UTF-8 bytes
        ids = [b % target.config.vocab_size for b in p.turns[0].encode("utf-8")]
      else:
        ids = target.tokenizer.encode_chat([{"role": "user", "content": p.turns[0]}])
      if len(ids) <= c.max_prompt_tokens:
        pool.append(ids)
  if len(pool) < c.num_requests:
    raise ValueError(f"Only {len(pool)} prompts of <= {c.max_prompt_tokens} tokens in "
                     f"{list(c.datasets)}; the stream wants {c.num_requests}.")
  pick = rng.choice(len(pool), c.num_requests, replace=False)
  budgets = rng.integers(c.min_new_tokens, c.max_new_tokens + 1, c.num_requests)
  if c.arrivals_file:
    with open(c.arrivals_file, encoding="utf-8") as f:
      times = np.asarray(json.load(f), float)
    if times.shape != (c.num_requests,):
      raise ValueError(f"{c.arrivals_file} must hold {c.num_requests} arrival times "
                       f"(seconds); it holds {times.shape[0] if times.ndim else 0}.")
    if (times < 0).any():
      raise ValueError(f"{c.arrivals_file}: arrival times must be >= 0 seconds; got "
                       f"{times[times < 0][:3].tolist()}.")
  else:
    times = serve.poisson_arrivals(c.num_requests, c.rate, c.seed)
  return [serve.Request(tuple(pool[j]), int(b), float(t), id=i)
          for i, (j, b, t) in enumerate(zip(pick, budgets, times))]


def run(c: Any, workdir: str) -> list[dict]:
  """Runs every (method, policy) cell not yet in workdir's results; returns all rows."""
  methods = [sweep._method(m, [c.temperature]) for m in c.methods]  # pylint: disable=protected-access
  for p in c.policies:
    if p not in serve.POLICIES:
      raise ValueError(f"Unknown policy {p!r}; expected some of {serve.POLICIES}.")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RESULTS)
  rows = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
  done = {(r["method"], r["policy"]) for r in rows}
  target = models.load(c.target, c.dtype)
  reqs = requests(target, c)
  max_len = c.max_len or None
  for m in methods:
    todo = [p for p in c.policies if (m.name, p) not in done]
    if not todo:
      continue
    drafter = m.build_drafter(target)
    room = 0 if drafter is None else drafter.num_nodes
    size = max_len or max(len(r.tokens) for r in reqs) + c.max_new_tokens + 2 * (room + 1)
    engine = serve.Engine(target, slots=c.slots, max_len=int(size),
                          max_new_tokens=c.max_new_tokens, drafter=drafter,
                          stop=m.stop_policy(), acceptance=m.rule(),
                          temperature=c.temperature, seed=c.seed)
    t = time.perf_counter()
    engine.warmup()
    print(f"{m.name}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
    for policy in todo:
      results = serve.serve(engine, reqs, policy=policy, pool=c.exspec_pool,
                            progress=c.progress)
      row = {"method": m.name, "policy": policy, "slots": c.slots, "max_len": int(size),
             "lossy": m.lossy, **serve.summary(results),
             "outputs": [r.tokens for r in results],
             "latency_s": [None if r.error else r.latency for r in results]}
      rows.append(row)
      with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
      print(table([row], header=not rows[:-1]), flush=True)
  with open(os.path.join(workdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(table(rows) + "\n")
  return rows


def table(rows: Sequence[dict], header: bool = True) -> str:
  """Markdown rows: throughput, latency percentiles, tau, and whether every request's
  output equals the first row's (greedy streams)."""
  first = rows[0]["outputs"] if rows else None
  lines = ["| method | policy | slots | tokens/s | p50 latency s | p99 latency s | tau | "
           "all equal |", "|---|---|---|---|---|---|---|---|"] if header else []
  for r in rows:
    name = r["method"] + (" (LOSSY)" if r.get("lossy") else "")
    if not r.get("requests"):
      lines.append(f"| {name} | {r['policy']} | {r['slots']} | every request refused | "
                   "| | | |")
      continue
    lines.append(f"| {name} | {r['policy']} | {r['slots']} | {r['tokens_per_s']:.1f} | "
                 f"{r['p50_latency_s']:.1f} | {r['p99_latency_s']:.1f} | {r['tau']:.2f} | "
                 f"{'yes' if r['outputs'] == first else 'NO'} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.enable_compilation_cache()
  rows = run(flags.FLAGS.config, flags.FLAGS.workdir)
  print(table(rows))


if __name__ == "__main__":
  # Defined here, not at import: the tests import this module beside the other CLIs,
  # whose absl flags share the same names.
  config_flags.DEFINE_config_file(
      "config", None, "Stream config: a file with get_config(arg), e.g. configs/stream.py.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Output folder; a rerun resumes it.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=runtime.parse_config_flags)
