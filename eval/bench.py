"""Micro-benchmarks behind the README's performance numbers (`make bench`).

In one process, after warm-up, medians of several runs:
  floor      XLA streaming every weight of the model once through the matmuls of one decode
             step (q/k/v/o, MLP, LM head for 1 token; no attention, cache, sampling, loop)
  specjax    batch-1 greedy AR decoding, tokens/s and ms per step
  hf         transformers' greedy `generate` on the same weights (PyTorch CPU)
  verify     one target forward of T tokens against a cache, relative to T = 1: what
             verifying a draft tree of T-1 nodes costs on this device
Writes bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from specjax import decode, models

from . import peers


def _median_time(fn, runs: int) -> float:
  jax.block_until_ready(fn())  # compile + warm-up
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def floor_ms(model: models.Model, runs: int) -> float:
  """ms for the weight-streaming matmuls of one decode step, nothing else."""
  mats = [w for w in jax.tree.leaves(model.params) if w.ndim == 2]
  if model.config.tie_embeddings:  # the LM head reads the embedding as [H, V]
    mats = [w.T if w.shape[0] == model.config.vocab_size else w for w in mats]

  @jax.jit
  def step(x_1xH, mats):
    return [jnp.ones((1, w.shape[0]), w.dtype) @ w + x_1xH.sum() for w in mats]

  x = jnp.ones((1, model.config.hidden_size), model.dtype)
  return 1e3 * _median_time(lambda: step(x, mats), runs)


def ar_ms(model: models.Model, prompt: list[int], new_tokens: int, runs: int) -> float:
  """ms per generated token of specjax greedy AR decoding (prefill amortised out)."""
  run = lambda n: decode.generate(model, [prompt], max_new_tokens=n, eos=None)
  long_s = _median_time(lambda: run(new_tokens), runs)
  short_s = _median_time(lambda: run(8), runs)
  return 1e3 * (long_s - short_s) / (new_tokens - 8)


def hf_ms(path: str, prompt: list[int], new_tokens: int, runs: int) -> float:
  """ms per generated token of transformers' greedy generate (prefill amortised out)."""
  import torch  # pylint: disable=g-import-not-at-top

  hf = peers.load(path).model
  ids = torch.tensor([prompt])

  def run(n):
    with torch.no_grad():
      return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

  long_s = _median_time(lambda: run(new_tokens), runs)
  short_s = _median_time(lambda: run(8), runs)
  return 1e3 * (long_s - short_s) / (new_tokens - 8)


def verify_cost(model: models.Model, sizes, runs: int, context: int = 256) -> dict:
  """Median ms of one cached forward of T tokens, for each T."""
  cfg, params = model.config, model.params

  @jax.jit
  def fwd(params, tokens, cache):
    t = tokens.shape[1]
    pos = cache.lengths[:, None] + jnp.arange(t)
    return models.forward(cfg, params, tokens, pos, cache.attention_mask(num_new=t), cache).logits

  cache = model.init_cache(1, context + max(sizes)).advance(jnp.asarray([context]))
  return {t: 1e3 * _median_time(lambda t=t: fwd(params, jnp.ones((1, t), jnp.int32), cache),
                                runs) for t in sizes}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default=models.DEFAULT)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
  ap.add_argument("--out", default="workdir/bench")
  args = ap.parse_args(argv)
  model = models.load(args.model)
  prompt = model.tokenizer.encode_chat([{"role": "user", "content": "Tell me about the sea."}])
  res = {"model": args.model, "device": str(jax.devices()[0]),
         "floor_ms": floor_ms(model, args.runs * 4)}
  print(f"floor: {res['floor_ms']:.1f} ms/step", flush=True)
  res["specjax_ms"] = ar_ms(model, prompt, args.new_tokens, args.runs)
  print(f"specjax AR: {res['specjax_ms']:.1f} ms/token", flush=True)
  if not args.no_hf:
    path = models.preset_path(args.model) if args.model in models.PRESETS else args.model
    res["hf_ms"] = hf_ms(path, prompt, args.new_tokens, args.runs)
    print(f"transformers AR: {res['hf_ms']:.1f} ms/token", flush=True)
  sizes = (1, 2, 4, 8, 16, 32, 64)
  res["verify_ms"] = verify_cost(model, sizes, args.runs * 2)
  base = res["verify_ms"][1]
  print("| step | ms | tokens/s | x floor |\n|---|---|---|---|")
  for k in ("floor_ms", "specjax_ms", "hf_ms"):
    if k in res:
      print(f"| {k[:-3]} | {res[k]:.1f} | {1e3 / res[k]:.1f} | {res[k] / res['floor_ms']:.2f} |")
  print("\n| verify T tokens | ms | x (T=1) |\n|---|---|---|")
  for t, ms in res["verify_ms"].items():
    print(f"| {t} | {ms:.1f} | {ms / base:.2f} |")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench.json"), "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
