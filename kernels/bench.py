"""Tree-attention microbenchmark: the Pallas kernel against the XLA path.

  python -m specjax.kernels.bench [--batch 8 --context 4096 --tree 16 --heads 32
                                   --kv-heads 8 --head-dim 128 --dtype bfloat16]

On a GPU or TPU it times both (median of --iters calls after warm-up, each a jitted call
on device-resident inputs) and reports the bandwidth the kernel achieves against the
device's peak: the bytes it must read are the prefix's keys and values (each sequence's
own length: lengths are drawn uniformly up to --context), the tree's keys/values and the
queries, plus the output it writes. On CPU it says so and only checks correctness
(interpret mode against the jnp reference, on a small shape).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import dispatch, tree_attention

# Peak HBM bandwidth, GB/s, by device kind (vendor data sheets).
PEAK_GBPS = {"TPU v4": 1200, "TPU v5 lite": 819, "TPU v5e": 819, "TPU v5p": 2765,
             "TPU v6 lite": 1640, "TPU v6e": 1640, "NVIDIA A100-SXM4-40GB": 1555,
             "NVIDIA A100-SXM4-80GB": 2039, "NVIDIA H100 80GB HBM3": 3350,
             "NVIDIA H200": 4800, "NVIDIA L4": 300}


def inputs(batch, context, tree, heads, kv_heads, head_dim, dtype, seed=0):
  """Random q / tree k, v / cache k, v, per-sequence lengths and a random tree."""
  rng = np.random.default_rng(seed)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  parents = [[int(rng.integers(-1, i)) for i in range(tree)] for _ in range(batch)]
  visible = np.zeros((batch, tree, tree), bool)
  for b, ps in enumerate(parents):
    for i in range(tree):
      j = i
      while j >= 0:
        visible[b, i, j], j = True, ps[j]
  lengths = jnp.asarray(rng.integers(0, context - tree, batch), jnp.int32)
  return (arr(batch, tree, heads, head_dim), arr(batch, kv_heads, tree, head_dim),
          arr(batch, kv_heads, tree, head_dim), arr(batch, kv_heads, context, head_dim),
          arr(batch, kv_heads, context, head_dim), lengths,
          tree_attention.pack_ancestors(jnp.asarray(visible)))


def bytes_read(args) -> int:
  q, k, v, _, ck, lengths, bits = args
  item = jnp.dtype(q.dtype).itemsize
  kvh, d = ck.shape[1], ck.shape[3]
  prefix = int(np.sum(np.asarray(lengths))) * kvh * d * 2 * item
  return prefix + 2 * q.size * item + (k.size + v.size) * item + bits.size * 4 + lengths.size * 4


def median_seconds(fn, args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--context", type=int, default=4096)
  p.add_argument("--tree", type=int, default=16)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--iters", type=int, default=50)
  a = p.parse_args(argv)
  backend = dispatch._PLATFORM.get(jax.default_backend(), "cpu")  # pylint: disable=protected-access
  dtype = jnp.dtype(a.dtype)
  if backend == "cpu":
    print("CPU: no Pallas hardware here; checking correctness only (interpret mode, small "
          "shape). Run on a GPU or TPU for timings.")
    args = inputs(2, 64, 5, 4, 2, 16, dtype)
    want = tree_attention.reference(*args).astype(jnp.float32)
    errors = {n: float(jnp.abs(tree_attention.IMPLS[n](*args, interpret=True)
                               .astype(jnp.float32) - want).max()) for n in ("tpu", "gpu")}
    out = {"backend": "cpu", "max_abs_error": errors}
    print(json.dumps(out))
    return out
  args = inputs(a.batch, a.context, a.tree, a.heads, a.kv_heads, a.head_dim, dtype)
  visible = tree_attention.unpack_ancestors(args[-1], a.tree)
  kernel = jax.jit(dispatch.kernel("pallas"))
  xla = jax.jit(lambda q, k, v, ck, cv, lengths, _: dispatch.attention(
      q, k, v, visible, ck, cv, None, lengths, impl="xla"))
  err = float(jnp.abs(kernel(*args).astype(jnp.float32) - xla(*args).astype(jnp.float32)).max())
  t_kernel, t_xla = median_seconds(kernel, args, a.iters), median_seconds(xla, args, a.iters)
  kind = jax.devices()[0].device_kind
  gbps = bytes_read(args) / t_kernel / 1e9
  out = {"device": kind, "shape": vars(a), "kernel_us": t_kernel * 1e6, "xla_us": t_xla * 1e6,
         "speedup_over_xla": t_xla / t_kernel, "kernel_GBps": gbps,
         "peak_GBps": PEAK_GBPS.get(kind), "fraction_of_peak":
         gbps / PEAK_GBPS[kind] if kind in PEAK_GBPS else None, "max_abs_diff": err}
  print(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()
