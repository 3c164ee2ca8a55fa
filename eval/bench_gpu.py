"""Accelerator benchmark at real shapes with random weights (`make bench-gpu`).

  python -m specjax.evaluation.bench_gpu --out DIR [--tiny] [--shapes a,b] [--budget-s 420]
  python eval/bench_gpu.py ...     (the same, from a checkout that is not installed)

Needs JAX and flax only (no model package, checkpoint, tokenizer, transformers or torch):
every model is built on device from its shape (`SHAPES`), bf16 by default. Medians of
several timed calls after a compile (timed apart) and a warm-up, each call a jitted loop of
`reps` forwards carrying the (donated) cache, as the decode loop runs them:
  verify    one target forward of T = 1..64 tokens over a cache of `context` committed
            tokens (batch 1; T = 1 is the AR step), against the HBM floor: (weight bytes
            + KV-cache bytes read) / peak bandwidth
  kernel    the Pallas tree-attention kernel against the XLA path at a long context:
            attention alone (bandwidth achieved on the KV it must read; the max abs
            difference of the outputs) and the whole forward with either
  batched   AR tokens/s of one decode step at batch 1..64, against the same floor
Measurements run in priority order (a few per shape first) until --budget-s is spent; the
rest are listed as skipped. gpu_bench.json and gpu_bench.md are rewritten after every
measurement, so a cut-off or killed run keeps what it measured. On CPU the Pallas kernel
runs interpreted (`--tiny` shapes only: it is slow).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.abc
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
import traceback

_SCRIPT = __name__ == "__main__" and not __package__


def _map_packages(root: str) -> None:
  """Makes `specjax.*` importable from this checkout without installing it: setup.py's
  package_dir (specjax.evaluation -> eval/, specjax.kernels -> kernels/, ...), as an
  editable install's finder does."""
  with open(os.path.join(root, "setup.py"), encoding="utf-8") as f:
    calls = [n for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.keyword)]
  dirs = {k: os.path.join(root, v)
          for k, v in ast.literal_eval(next(c.value for c in calls if c.arg == "package_dir"))
          .items()}

  class Finder(importlib.abc.MetaPathFinder):

    def find_spec(self, name, path=None, target=None):
      if name not in dirs:
        return None
      return importlib.util.spec_from_file_location(
          name, os.path.join(dirs[name], "__init__.py"), submodule_search_locations=[dirs[name]])

  sys.meta_path.insert(0, Finder())


if _SCRIPT:  # `python eval/bench_gpu.py`: the checkout's root, not eval/, on the path
  _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path[0] = _ROOT
  _map_packages(_ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from specjax import models
from specjax.kernels import bench as kernel_bench
from specjax.kernels import dispatch, tree_attention
from specjax.models import KVCache, ModelConfig

# Real shapes (Hugging Face config.json values) with random weights.
SHAPES = {
    "smollm2-135m": ModelConfig(
        "llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_embeddings=True,
        max_position_embeddings=8192, model_type="llama"),
    "llama-3.2-1b": ModelConfig(
        "llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=("llama3", 32.0, 1.0, 4.0, 8192), tie_embeddings=True,
        max_position_embeddings=131072),
    "llama-3.1-8b": ModelConfig(
        "llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=("llama3", 8.0, 1.0, 4.0, 8192), tie_embeddings=False,
        max_position_embeddings=131072),
    # --tiny: the shape of models.RANDOM["tiny-random"].
    "tiny": ModelConfig("llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        tie_embeddings=True, max_position_embeddings=2048),
}
DEFAULT_SHAPES = ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b")
# Peak HBM bandwidth (GB/s) when the device kind is not in kernels/bench.py's table: H200.
FALLBACK_PEAK_GBPS = 4800.0


@dataclasses.dataclass(frozen=True)
class Settings:
  context: int  # committed tokens before the verified / decoded ones
  ts: tuple  # verify sizes T
  batches: tuple  # batched AR sizes B
  kernel_context: int  # cache slots of the kernel comparison (a power of two: Triton)
  kernel_batch: int
  kernel_ts: tuple  # attention-alone sizes T
  kernel_forward_t: int  # the whole forward with either attention, at this T
  runs: int  # timed calls (median)
  reps: int  # forwards per call


FULL = Settings(context=512, ts=(1, 2, 4, 8, 16, 32, 64), batches=(1, 2, 4, 8, 16, 32, 64),
                kernel_context=4096, kernel_batch=8, kernel_ts=(1, 16, 64),
                kernel_forward_t=16, runs=5, reps=8)
TINY = Settings(context=64, ts=(1, 2, 4, 8), batches=(1, 2, 4), kernel_context=64,
                kernel_batch=2, kernel_ts=(8,), kernel_forward_t=8, runs=3, reps=2)


# ---- models by shape -------------------------------------------------------------------------


def random_arrays(seed: int, shapes, dtype, scale: float = 1.0) -> list:
  """Pseudo-random arrays of these shapes, zero mean and standard deviation `scale`:
  uniform values from a 32-bit integer hash of each element's index (and the seed and the
  array's position). Elementwise over an iota, so each array is one fused loop that compiles
  in milliseconds on any backend; the random-bit generators did not: XLA:CPU took seconds
  per multi-dimensional draw, and XLA:GPU 4 minutes for Llama-3.2-1B's flat 2^30-element
  draws (seen on an H200 under JAX 0.11.2). Timings do not depend on the values."""
  out = []
  for i, shape in enumerate(shapes):
    n = math.prod(shape)
    if n >= 2**32:
      raise ValueError(f"array of {n} elements: the 32-bit hash would repeat")
    x = jax.lax.iota(jnp.uint32, n) + jnp.uint32((seed * 0x9E3779B1 + i * 0x85EBCA77) % 2**32)
    for mul, shift in ((0x7FEB352D, 15), (0x846CA68B, 13)):  # an integer mix (murmur-like)
      x = (x ^ (x >> shift)) * jnp.uint32(mul)
    x = x ^ (x >> 16)
    u = (x >> 8).astype(jnp.float32) / 2.0**24  # uniform in [0, 1)
    out.append((scale * math.sqrt(12.0) * (u - 0.5)).astype(dtype).reshape(shape))
  return out


def random_params(cfg: ModelConfig, dtype, seed: int = 0):
  """Random weights built on device by shape (no forward runs): std-0.02 matrices, unit
  norm scales."""
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), dtype))
  leaves, treedef = jax.tree.flatten(shapes)
  mats = [tuple(s.shape) for s in leaves if s.ndim > 1]

  def build():
    drawn = iter(random_arrays(seed, mats, dtype, 0.02))
    return treedef.unflatten([next(drawn) if s.ndim > 1 else jnp.ones(s.shape, s.dtype)
                              for s in leaves])

  return jax.jit(build)()


def nbytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def weight_bytes_read(cfg: ModelConfig, params) -> int:
  """Bytes of weights one forward streams: all of them, less an untied input embedding
  (only its T rows are gathered; a tied one is read whole as the LM head)."""
  total = nbytes(params)
  if not cfg.tie_embeddings:
    total -= nbytes(params["embed_tokens"])
  return total


def kv_bytes_per_token(cfg: ModelConfig, dtype) -> int:
  return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


# ---- timing ----------------------------------------------------------------------------------


def timed(fn, consts, carry, runs: int, donate: bool) -> tuple[float, float, object]:
  """(compile s, median s per call, last carry) of the jitted `fn(consts, carry) -> carry`,
  compiled ahead of time, then one warm-up call and `runs` timed ones (block_until_ready),
  each fed the previous call's (donated) carry."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=(1,) if donate else ()).lower(consts, carry).compile()
  compile_s = time.perf_counter() - start
  carry = jax.block_until_ready(compiled(consts, carry))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    carry = jax.block_until_ready(compiled(consts, carry))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times), carry


def forward_loop(cfg: ModelConfig, t: int, reps: int):
  """`(params, tokens_BxT), (cache, acc) -> (cache, acc)`: `reps` forwards of T chained
  tokens at the cache's lengths, each reading its greedy argmax over every position (what
  a verification needs; it keeps XLA from cutting the LM head short)."""

  def run(consts, carry):
    params, tokens_BxT = consts
    positions_BxT = carry[0].lengths[:, None] + jnp.arange(t)

    def body(_, carry):
      cache, acc = carry
      # Tokens that depend on the carry, so XLA cannot hoist the first layer out of the loop.
      tok_BxT = tokens_BxT + (acc > 1e30).astype(jnp.int32)
      out = models.forward(cfg, params, tok_BxT, positions_BxT, models.causal(t), cache)
      return out.cache, acc + jnp.argmax(out.logits, -1).sum().astype(jnp.float32)

    return jax.lax.fori_loop(0, reps, body, carry)

  return run


def attention_loop(impl: str, t: int, reps: int):
  """`(q, k, v, cache k, cache v, lengths, ancestors), (acc, out) -> (acc, out)`: `reps`
  tree attentions (the Pallas kernel or the XLA path), each output summed whole; unrolled
  (a GPU while loop's per-iteration cost is not small beside one attention)."""

  def run(args, carry):
    q, k, v, ck, cv, lengths, ancestors = args
    visible = tree_attention.unpack_ancestors(ancestors, t)

    def body(_, carry):
      acc, _ = carry
      q_ = q + (acc > 1e30).astype(q.dtype)
      if impl == "xla":
        o = dispatch.attention(q_, k, v, visible, ck, cv, None, lengths, impl="xla")
      else:
        o = dispatch.kernel(impl)(q_, k, v, ck, cv, lengths, ancestors)
      return acc + o.astype(jnp.float32).sum(), o

    return jax.lax.fori_loop(0, reps, body, carry, unroll=True)

  return run


def attention_inputs(cfg: ModelConfig, batch: int, slots: int, length: int, t: int, dtype,
                     seed: int = 0) -> tuple:
  """Random (q, tree k, v, cache k, v, lengths, ancestors), as kernels/bench.py's: a chain
  of T tokens over `length` committed slots of a `slots`-slot cache, built on device."""
  h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  tree, cache = (batch, kvh, t, d), (batch, kvh, slots, d)

  def build():
    arrays = random_arrays(seed, [(batch, t, h, d), tree, tree, cache, cache], dtype)
    visible = jnp.broadcast_to(models.causal(t), (batch, t, t))
    return (*arrays, jnp.full((batch,), length, jnp.int32),
            tree_attention.pack_ancestors(visible))

  return jax.jit(build)()


# ---- the run ---------------------------------------------------------------------------------


def peak_gbps(kind: str, flag: float | None) -> tuple[float, str]:
  """(peak GB/s, where it came from): the flag, else kernels/bench.py's table (exact or
  longest prefix of the device kind), else FALLBACK_PEAK_GBPS."""
  if flag:
    return float(flag), "--peak-gbps"
  known = [k for k in kernel_bench.PEAK_GBPS if kind == k or kind.startswith(k)]
  if known:
    return float(kernel_bench.PEAK_GBPS[max(known, key=len)]), f"table ({max(known, key=len)})"
  return FALLBACK_PEAK_GBPS, f"fallback (unknown device kind {kind!r})"


class Bench:
  """The shapes' models, the measurements taken so far and the report."""

  def __init__(self, shapes, settings: Settings, dtype, peak: float, report: dict):
    self.shapes, self.s, self.dtype, self.peak = shapes, settings, dtype, peak
    self.report = report
    self.params = {}
    self.forwards = {}  # (shape, impl, batch, slots, length, t) -> (compile s, ms)

  def model(self, name: str):
    if name not in self.params:
      cfg = SHAPES[name]
      start = time.perf_counter()
      self.params[name] = jax.block_until_ready(random_params(cfg, self.dtype))
      p = self.params[name]
      self.report["shapes"][name] = {
          **dataclasses.asdict(cfg), "params": sum(x.size for x in jax.tree.leaves(p)),
          "param_bytes": nbytes(p), "weight_bytes_read": weight_bytes_read(cfg, p),
          "kv_bytes_per_token": kv_bytes_per_token(cfg, self.dtype),
          "build_s": time.perf_counter() - start}
      say(f"built {name}: {nbytes(p) / 1e9:.4g} GB of {jnp.dtype(self.dtype).name} weights "
          f"in {self.report['shapes'][name]['build_s']:.1f} s")
    return SHAPES[name], self.params[name]

  def floor_bytes(self, name: str, batch: int, length: int) -> int:
    info = self.report["shapes"][name]
    return info["weight_bytes_read"] + batch * length * info["kv_bytes_per_token"]

  def forward(self, name: str, impl: str, batch: int, slots: int, length: int, t: int):
    """(compile s, ms) of one forward of T tokens per sequence (memoized)."""
    key = (name, impl, batch, slots, length, t)
    if key not in self.forwards:
      cfg, params = self.model(name)
      cfg = cfg.replace(attention_impl=impl)
      cache = KVCache.for_config(cfg, batch, slots, self.dtype).advance(
          jnp.full((batch,), length, jnp.int32))
      tokens = jnp.ones((batch, t), jnp.int32)
      compile_s, sec, _ = timed(forward_loop(cfg, t, self.s.reps), (params, tokens),
                                (cache, jnp.float32(0)), self.s.runs, donate=True)
      self.forwards[key] = (compile_s, 1e3 * sec / self.s.reps)
    return self.forwards[key]

  def floor_row(self, name, batch, length, t, compile_s, ms) -> dict:
    floor_bytes = self.floor_bytes(name, batch, length)
    floor_ms = 1e3 * floor_bytes / (self.peak * 1e9)
    return {"shape": name, "batch": batch, "context": length, "t": t, "ms": ms,
            "floor_ms": floor_ms, "x_floor": ms / floor_ms, "floor_bytes": floor_bytes,
            "compile_s": compile_s}

  def verify(self, name: str, t: int) -> None:
    s = self.s
    compile_s, ms = self.forward(name, "xla", 1, s.context + max(s.ts), s.context, t)
    row = self.floor_row(name, 1, s.context, t, compile_s, ms)
    self.report["verify"].append(row)
    say(f"verify {name} T={t}: {ms:.4g} ms (floor {row['floor_ms']:.4g} ms, "
        f"x{row['x_floor']:.2f}); compile {compile_s:.1f} s")
    if t == 1 and 1 in s.batches:  # the same program: batched AR at B = 1
      self.batched(name, 1)

  def batched(self, name: str, batch: int) -> None:
    s = self.s
    compile_s, ms = self.forward(name, "xla", batch, s.context + max(s.ts), s.context, 1)
    row = self.floor_row(name, batch, s.context, 1, compile_s, ms)
    row.update(tokens_per_s=batch * 1e3 / ms, floor_tokens_per_s=batch * 1e3 / row["floor_ms"])
    self.report["batched"].append(row)
    say(f"batched {name} B={batch}: {row['tokens_per_s']:.4g} tokens/s, step {ms:.4g} ms "
        f"(floor {row['floor_ms']:.4g} ms, x{row['x_floor']:.2f}); compile {compile_s:.1f} s")

  def kernel_attention(self, name: str, t: int) -> None:
    """The tree attention alone: Pallas kernel vs XLA path, on device-resident inputs."""
    s = self.s
    cfg, _ = self.model(name)
    args = attention_inputs(cfg, s.kernel_batch, s.kernel_context,
                            s.kernel_context - max(s.kernel_ts), t, self.dtype)
    read = kernel_bench.bytes_read(args)
    row = {"shape": name, "level": "attention", "batch": s.kernel_batch,
           "context": s.kernel_context - max(s.kernel_ts), "t": t, "bytes": read}
    outs = {}
    for impl in ("xla", "pallas"):
      carry = (jnp.float32(0), jnp.zeros(args[0].shape, args[0].dtype))
      compile_s, sec, (_, outs[impl]) = timed(attention_loop(impl, t, s.reps), args, carry,
                                              s.runs, donate=False)
      ms = 1e3 * sec / s.reps
      row.update({f"{impl}_ms": ms, f"{impl}_compile_s": compile_s,
                  f"{impl}_gbps": read / (ms * 1e-3) / 1e9})
    row["max_abs_diff"] = float(jnp.abs(outs["pallas"].astype(jnp.float32) -
                                        outs["xla"].astype(jnp.float32)).max())
    self._kernel_row(row)

  def kernel_forward(self, name: str) -> None:
    """The whole forward with the Pallas kernel vs with the XLA path."""
    s, t = self.s, self.s.kernel_forward_t
    length = s.kernel_context - max(s.kernel_ts)
    read = self.floor_bytes(name, s.kernel_batch, length)
    row = {"shape": name, "level": "forward", "batch": s.kernel_batch, "context": length,
           "t": t, "bytes": read}
    for impl in ("xla", "pallas"):
      compile_s, ms = self.forward(name, impl, s.kernel_batch, s.kernel_context, length, t)
      row.update({f"{impl}_ms": ms, f"{impl}_compile_s": compile_s,
                  f"{impl}_gbps": read / (ms * 1e-3) / 1e9})
    self._kernel_row(row)

  def _kernel_row(self, row: dict) -> None:
    row["speedup"] = row["xla_ms"] / row["pallas_ms"]
    row["pallas_peak_fraction"] = row["pallas_gbps"] / self.peak
    self.report["kernel"].append(row)
    say(f"kernel {row['shape']} {row['level']} B={row['batch']} context={row['context']} "
        f"T={row['t']}: pallas {row['pallas_ms']:.4g} ms ({row['pallas_gbps']:.4g} GB/s, "
        f"{100 * row['pallas_peak_fraction']:.4g}% of peak), xla {row['xla_ms']:.4g} ms, "
        f"x{row['speedup']:.2f}; compile {row['xla_compile_s']:.1f} / "
        f"{row['pallas_compile_s']:.1f} s")


def plan(bench: Bench, shapes) -> list:
  """[(name, group, fn)] in priority order: for every shape first the AR step (batched
  B = 1 too), the largest T, the largest batch and the long-T kernel comparison; then the
  rest."""
  s = bench.s
  first, rest = [], []
  for name in shapes:
    def job(kind, arg, name=name):
      fn = {"verify": bench.verify, "batched": bench.batched,
            "attention": bench.kernel_attention}[kind]
      return (f"{kind} {name} {'B' if kind == 'batched' else 'T'}={arg}", (kind, name),
              lambda: fn(name, arg))
    first += [job("verify", s.ts[0]), job("verify", s.ts[-1]), job("batched", s.batches[-1]),
              job("attention", s.kernel_ts[-1])]
    rest += ([job("verify", t) for t in s.ts[1:-1]] +
             [job("batched", b) for b in s.batches[:-1] if b != 1] +
             [job("attention", t) for t in s.kernel_ts[:-1]] +
             [(f"forward {name} pallas/xla T={s.kernel_forward_t}", ("forward", name),
               lambda name=name: bench.kernel_forward(name))])
  return first + rest


def run_jobs(jobs, budget_s: float, on_done, left_out: list, clock=time.perf_counter,
             start=None) -> list:
  """Runs the (name, (kind, shape), fn) jobs in order while the budget lasts; appends
  (name, why) of those not run or failed to `left_out` (and returns it). A job is skipped
  once the budget is spent, or when it would not fit in what is left, judged by the last
  job of its kind and shape (else the longest of its shape so far). `on_done` runs after
  every job that ran (it writes the report)."""
  start = clock() if start is None else start
  last = {}
  for name, group, fn in jobs:
    spent = clock() - start
    guess = last.get(group, max([s for g, s in last.items() if g[1] == group[1]] + [0.0]))
    if spent >= budget_s or spent + guess > budget_s:
      left_out.append((name, "budget"))
      continue
    t0 = clock()
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      left_out.append((name, f"error: {type(e).__name__}: {e}"[:2000]))
      say(f"FAILED {name}: {type(e).__name__}: {str(e)[:300]}")
      traceback.print_exc()
    last[group] = clock() - t0
    on_done()
  return left_out


# ---- report ----------------------------------------------------------------------------------


_T0 = time.perf_counter()


def say(msg: str) -> None:
  print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)


def _table(head: list, rows: list) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(report: dict) -> str:
  """One table per section, the command line and device on top."""
  order = {n: i for i, n in enumerate(report["shape_order"])}
  by = lambda rows, *keys: sorted(rows, key=lambda r: (order[r["shape"]],) + tuple(
      r[k] for k in keys))
  dev = report["device"]
  out = [f"# GPU benchmark ({'complete' if report['complete'] else 'partial'})", "",
         f"`{report['command']}`", "",
         f"Device: {dev['kind']} ({dev['platform']}, {dev['count']} device(s)); JAX "
         f"{report['jax_version']}; {report['dtype']} random weights; peak "
         f"{report['peak_gbps']:.0f} GB/s ({report['peak_source']}); {report['elapsed_s']:.0f} "
         f"s of a {report['budget_s']:.0f} s budget.", "",
         "Medians of timed calls after compile and warm-up; every call a jitted loop of "
         "forwards carrying the cache. floor = (weight bytes + KV bytes read) / peak.", ""]
  shapes = report["shapes"]
  out += ["## Shapes", "", _table(
      ["shape", "params (M)", "weight GB read per forward", "KV KB per token", "build s"],
      [[n, f"{i['params'] / 1e6:.4g}", f"{i['weight_bytes_read'] / 1e9:.4g}",
        f"{i['kv_bytes_per_token'] / 1e3:.4g}", f"{i['build_s']:.1f}"]
       for n, i in sorted(shapes.items(), key=lambda kv: order[kv[0]])]), ""]
  base = {r["shape"]: r["ms"] for r in report["verify"] if r["t"] == 1}
  out += ["## Verify: one forward of T tokens over the cache (batch 1; T = 1 is the AR step)",
          "", _table(
              ["shape", "context", "T", "ms", "floor ms", "x floor", "x (T=1)", "compile s"],
              [[r["shape"], str(r["context"]), str(r["t"]), f"{r['ms']:.4g}",
                f"{r['floor_ms']:.4g}", f"{r['x_floor']:.2f}",
                f"{r['ms'] / base[r['shape']]:.2f}" if r["shape"] in base else "-",
                f"{r['compile_s']:.1f}"] for r in by(report["verify"], "t")]), ""]
  out += ["## Pallas tree-attention kernel vs the XLA path", "",
          "attention: the attention alone, GB/s = bytes it must read (the prefix's KV, the "
          "tree's, q and the output) / time; forward: the whole forward with either, GB/s = "
          "floor bytes / time.", "", _table(
              ["shape", "level", "batch", "context", "T", "XLA ms", "Pallas ms",
               "XLA / Pallas", "XLA GB/s", "Pallas GB/s", "Pallas % of peak",
               "max abs diff", "compile s (XLA / Pallas)"],
              [[r["shape"], r["level"], str(r["batch"]), str(r["context"]), str(r["t"]),
                f"{r['xla_ms']:.4g}", f"{r['pallas_ms']:.4g}", f"{r['speedup']:.2f}",
                f"{r['xla_gbps']:.4g}", f"{r['pallas_gbps']:.4g}",
                f"{100 * r['pallas_peak_fraction']:.4g}",
                f"{r['max_abs_diff']:.2g}" if "max_abs_diff" in r else "-",
                f"{r['xla_compile_s']:.1f} / {r['pallas_compile_s']:.1f}"]
               for r in by(report["kernel"], "level", "t")]), ""]
  out += ["## Batched AR: one decode step at batch B", "", _table(
      ["shape", "context", "B", "step ms", "tokens/s", "floor ms", "floor tokens/s",
       "x floor", "compile s"],
      [[r["shape"], str(r["context"]), str(r["batch"]), f"{r['ms']:.4g}",
        f"{r['tokens_per_s']:.4g}", f"{r['floor_ms']:.4g}", f"{r['floor_tokens_per_s']:.4g}",
        f"{r['x_floor']:.2f}", f"{r['compile_s']:.1f}"] for r in by(report["batched"], "batch")]),
          ""]
  if report["left_out"]:
    out += ["## Not measured", ""] + [f"- {n}: {why.splitlines()[0]}"
                                       for n, why in report["left_out"]] + [""]
  return "\n".join(out)


def write(report: dict, out: str) -> None:
  """gpu_bench.json and gpu_bench.md, each replaced whole (write, then rename)."""
  os.makedirs(out, exist_ok=True)
  report["elapsed_s"] = time.perf_counter() - report["_start"]
  data = {k: v for k, v in report.items() if not k.startswith("_")}
  for file, text in (("gpu_bench.json", json.dumps(data, indent=1)),
                     ("gpu_bench.md", markdown(report))):
    path = os.path.join(out, file)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="folder for gpu_bench.json and gpu_bench.md")
  ap.add_argument("--tiny", action="store_true",
                  help="a tiny shape and small sizes (a CPU check in seconds)")
  ap.add_argument("--shapes", default=None,
                  help=f"comma-separated, of {sorted(SHAPES)} (default: "
                       f"{','.join(DEFAULT_SHAPES)}; with --tiny: tiny)")
  ap.add_argument("--budget-s", type=float, default=420.0,
                  help="stop starting measurements after this many seconds")
  ap.add_argument("--peak-gbps", type=float, default=None,
                  help="peak HBM bandwidth (default: the device kind's, from "
                       f"kernels/bench.py, else {FALLBACK_PEAK_GBPS:.0f}: an H200)")
  ap.add_argument("--dtype", default="bfloat16", choices=sorted(models.model.DTYPES))
  argv = sys.argv[1:] if argv is None else list(argv)
  args = ap.parse_args(argv)
  global _T0
  _T0 = start = time.perf_counter()  # the budget counts from here (backend start included)
  shapes = (args.shapes.split(",") if args.shapes else
            ["tiny"] if args.tiny else list(DEFAULT_SHAPES))
  unknown = [n for n in shapes if n not in SHAPES]
  if unknown:
    ap.error(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
  settings = TINY if args.tiny else FULL
  dev = jax.devices()[0]
  peak, source = peak_gbps(dev.device_kind, args.peak_gbps)
  prog = "python eval/bench_gpu.py" if _SCRIPT else "python -m specjax.evaluation.bench_gpu"
  report = {
      "_start": start, "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
      "device": {"kind": dev.device_kind, "platform": dev.platform,
                 "count": jax.device_count()},
      "jax_version": jax.__version__, "python": platform.python_version(),
      "dtype": args.dtype, "peak_gbps": peak, "peak_source": source,
      "budget_s": args.budget_s, "settings": dataclasses.asdict(settings),
      "shape_order": shapes, "complete": False, "shapes": {}, "verify": [], "kernel": [],
      "batched": [], "left_out": []}
  say(f"{report['command']}: {dev.device_kind}, JAX {jax.__version__}, peak {peak:.0f} GB/s "
      f"({source}), budget {args.budget_s:.0f} s")
  bench = Bench(shapes, settings, models.parse_dtype(args.dtype), peak, report)
  # A kill (a timeout's SIGTERM) still leaves the last written report; make it exit cleanly.
  old_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  try:
    write(report, args.out)
    left_out = run_jobs(plan(bench, shapes), args.budget_s, lambda: write(report, args.out),
                        report["left_out"], start=report["_start"])
  finally:
    signal.signal(signal.SIGTERM, old_handler)
  report["complete"] = not left_out
  write(report, args.out)
  print(markdown(report), flush=True)
  say(f"wrote {os.path.join(args.out, 'gpu_bench.json')} and gpu_bench.md "
      f"({len(left_out)} measurement(s) not taken)")
  return report


if __name__ == "__main__":
  main()
