"""Cut a DSpark head's Markov head to a lower rank, without retraining.

  python -m specjax.training.truncate assets/heads/dspark-smollm2-135m --rank 64 --out DIR

The Markov head holds 2 x V x r of a DSpark head's params (V = 49,152 on SmolLM2, so
r = 256 is 25M); its best rank-`rank` approximation (`DFlashHead.truncate_markov`, the
truncated SVD of what the factors compute) keeps the backbone and the confidence head. The
new folder keeps the head's decode knobs and training config (with the new rank) and drops
the held-out acceptance numbers, which belong to the old rank: measure them again
(`python -m specjax.training.tau_check` on a workdir holding the new head).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Sequence

from safetensors import safe_open

from specjax import models
from specjax.drafters import io

from . import trainer


def truncate(head_dir: str, rank: int, out: str, target: str | None = None) -> dict:
  """Writes the rank-`rank` head to `out`; returns its head.json."""
  meta = io.read_meta(head_dir)
  if meta["kind"] != "dspark":
    raise ValueError(f"{head_dir!r} holds a {meta['kind']!r} head; only DSpark heads have a "
                     "Markov head to truncate.")
  if os.path.abspath(out) == os.path.abspath(head_dir):
    raise ValueError("--out must be a new folder: the head in place is the one being read.")
  cfg = models.load(target or meta["target_name"]).config
  with safe_open(os.path.join(head_dir, io.PARAMS), "numpy") as f:  # keep the stored dtype
    dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
  kind, head, params, meta = io.load(head_dir, cfg, {"F16": "float16", "BF16": "bfloat16"}
                                     .get(dtype, "float32"))
  head, params = head.truncate_markov(params, rank)
  kwargs = dict(meta["head_kwargs"], markov_rank=rank)
  extra = {k: v for k, v in meta.items() if k in ("target_name", "trained_tokens", "step")}
  io.save(out, kind, kwargs, params, cfg, meta["decode"], truncated_from=meta["head_kwargs"]
          ["markov_rank"], **extra)
  run_config = os.path.join(head_dir, trainer.CONFIG_FILE)
  if os.path.exists(run_config):  # the training config, at the new rank
    with open(run_config, encoding="utf-8") as f:
      c = json.load(f)
    c["head_kwargs"]["markov_rank"] = rank
    with open(os.path.join(out, trainer.CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(c, f, indent=1)
  for name in ("metrics.jsonl", "curves.png"):  # the run's history, at the old rank
    if os.path.exists(os.path.join(head_dir, name)):
      shutil.copy(os.path.join(head_dir, name), os.path.join(out, name))
  return io.read_meta(out)


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(prog="python -m specjax.training.truncate",
                              description=__doc__.splitlines()[0])
  p.add_argument("head", help="a specjax DSpark head folder")
  p.add_argument("--rank", type=int, required=True, help="the new Markov rank")
  p.add_argument("--out", required=True, help="the new head folder")
  p.add_argument("--target", default=None, help="target preset or path (default: the "
                 "head's target_name)")
  args = p.parse_args(argv)
  meta = truncate(args.head, args.rank, args.out, args.target)
  print(f"wrote {args.out}: markov_rank {meta['head_kwargs']['markov_rank']} "
        f"(from {meta['truncated_from']})")
  return meta


if __name__ == "__main__":
  main()
