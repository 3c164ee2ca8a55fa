"""Simulated tau against measured tau, on the run's own held-out rows.

  python -m specjax.training.tau_check --workdir workdir/eagle [--max_new_tokens 96]

Training reports a *simulated* tau: the head unrolled on held-out rows, teacher-forced on
the data. This decodes the prompts of those same rows with `generate` (greedy, the head as
a chain of `sim_depth` drafts) and prints both, so a train/serve mismatch (wrong features,
wrong positions, a stale cache) shows up as a gap instead of a silent tau of ~1.
"""

from __future__ import annotations

import json
import os

import argparse
from typing import Sequence

import ml_collections
import numpy as np

from specjax import decode, models, runtime
from specjax.drafters import io, load_drafter

from . import trainer



def measure(workdir: str, max_new_tokens: int = 96) -> dict[str, float]:
  """{"simulated": the trained head's sim_tau on the held-out rows, "measured": tau of
  greedy `generate` on those rows' prompts (tokens over target calls, all rows)}."""
  with open(os.path.join(workdir, trainer.CONFIG_FILE), encoding="utf-8") as f:
    c = ml_collections.ConfigDict(json.load(f))
  target = models.load(c.target, c.dtype)
  d = trainer.load_data(c, target)
  prompts = []
  for tokens, mask in zip(d.eval_tokens, d.eval_mask):
    n = int(np.argmax(mask > 0))  # the response starts at the first trained token
    prompts.append(tokens[:max(n, 1)].tolist())
  knobs = {"depth": min(c.sim_depth, c.head_kwargs.get("num_heads", c.sim_depth))}
  if c.head in ("eagle", "eagle3", "falcon"):  # a chain, whatever the head was saved with
    knobs["top_k"] = 1
  drafter = load_drafter(os.path.join(workdir, trainer.HEAD_DIR), target, **knobs)
  out = decode.generate(target, prompts, max_new_tokens=max_new_tokens, drafter=drafter)
  ar = decode.generate(target, prompts, max_new_tokens=max_new_tokens)
  if out.token_lists() != ar.token_lists():
    raise AssertionError("speculative output differs from AR: the head is not lossless")
  kind, head, params, _ = io.load(os.path.join(workdir, trainer.HEAD_DIR), target.config)
  _, eval_step = trainer.make_steps(target, head, trainer.optimizer(c, params), c.seed,
                                    c.sim_depth)
  sim = trainer.evaluate(eval_step, params, target.params, d, c.batch_size)
  accept = []  # held-out P(first k drafts accepted), what head.json's sim_accept holds
  while f"sim_accept/{len(accept) + 1}" in sim:
    accept.append(float(sim[f"sim_accept/{len(accept) + 1}"]))
  return {"simulated": sim["sim_tau"], "sim_accept": accept,
          "measured": float(np.sum(out.lengths) / np.sum(out.stats.target_calls)),
          "rows": len(prompts), "depth": c.sim_depth}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  p = argparse.ArgumentParser(prog="python -m specjax.training.tau_check",
                              description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished specjax-train workdir")
  p.add_argument("--max_new_tokens", type=int, default=96, help="tokens decoded per prompt")
  args = p.parse_args(argv)
  runtime.enable_compilation_cache()
  out = measure(args.workdir, args.max_new_tokens)
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
