"""Micro-benchmarks behind the README's performance numbers (`make bench`).

In one process, after warm-up, medians of several runs:
  floor      XLA streaming every weight of the model once through the matmuls of one decode
             step (q/k/v/o, MLP, LM head for 1 token; no attention, cache, sampling, loop)
  specjax    batch-1 greedy AR decoding, tokens/s and ms per step
  hf         transformers' greedy `generate` on the same weights (PyTorch CPU)
  verify     one target forward of T tokens against a cache, relative to T = 1: what
             verifying a draft tree of T-1 nodes costs on this device; and at batch 1, 8,
             16 and 32 for T up to 5, with an EAGLE draft forward at each (the per-batch
             tables SmartSpec's goodput policy weighs, `drafters.goodput`)
  forward vs matmul   that forward (in a jitted loop, as in decoding) beside the same run's
             matmul-only floors for the same B*T rows (chained, as a forward runs them, and
             independent), at 300 and 1,400 tokens of context and at batch 16
  batched    greedy AR `generate` tokens/s at batch 1, 8, 16, 32, and its step time over
             the matmul-only floor at M = batch
  draft      one EAGLE head forward (1 token against a cache, + the LM head): the draft_ms
             `drafters.budget` weighs against the verify costs
  train      tokens/s of each head recipe's train step (frozen target forward + head loss +
             update; `--train eagle,dflash,...`, or all of TRAIN_RECIPES with `--train all`
             alone) beside the target's matmul-only forward at the same rows
  compile    seconds to compile one decode program (AR, the committed EAGLE-3 head as a
             chain of 3, the committed EAGLE head as an EAGLE-2 tree), persistent cache off,
             beside the run time of that call
  goodput    `--goodput COSTS_JSON`: greedy tokens/s at batch 1, 8, 16, 32 for AR, fixed
             EAGLE-3 chains and SmartSpec's goodput policy (`goodput_table`)
  parallel   `--parallel`: PEARL, EasySpec and Mirror SD beside AR and a plain self-draft
             chain at batch 1, with the cost model's speedup for separate devices
             (`parallel_table`)
  quant      `--quant`: the float target beside its int8 and int4 weight-only versions:
             logit error, AR and EAGLE-3 tokens/s and tau (`quant_table`)
  hier       `--hier`: hierarchical drafting for the int4 target beside EAGLE chains and
             trees verified by it directly (`hier_table`)
  stree      `--stree`: chain vs tree tau at equal node budgets on a tiny hybrid
             (attention + Mamba-2) target (`stree_table`)
  moe        `--moe`: all-to-all bytes per token of the routed expert-parallel MoE, with
             speculative token shuffling and expert grouping, on 8 forced host devices
             (`moe_table`)
  profile    `--profile`: where the batch-16 single-token forward after 300 tokens of
             context spends its time, by class of XLA op (`forward_profile`)
  AR floor   the AR step of `generate` after a 300-token prompt beside both matmul floors
             (chained as a forward's layers are, and independent)
Writes bench.json and costs.json (the verify and draft costs `drafters.budget` sizes drafts
from; `--costs-only` measures just those) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from specjax import decode, models, registry, runtime, sharding

from . import peers


def _median_time(fn, runs: int) -> float:
  jax.block_until_ready(fn())  # compile + warm-up
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _step_ms(run, new_tokens: int, runs: int) -> tuple[float, float]:
  """(ms per decode step with the prefill amortised out, seconds of the whole run), from
  `run(n)` generating n tokens: the difference of a long and an 8-token run."""
  long_s = _median_time(lambda: run(new_tokens), runs)
  short_s = _median_time(lambda: run(8), runs)
  return 1e3 * (long_s - short_s) / (new_tokens - 8), long_s


def decode_ms(model: models.Model, prompt: list[int], batch: int, new_tokens: int,
              runs: int) -> tuple[float, float]:
  """(ms per step, tokens/s) of greedy AR `generate` on `batch` copies of a prompt."""
  run = lambda n: decode.generate(model, [prompt] * batch, max_new_tokens=n, eos=None)
  step_ms, long_s = _step_ms(run, new_tokens, runs)
  return step_ms, batch * new_tokens / long_s


def hf_ms(path: str, prompt: list[int], new_tokens: int, runs: int) -> float:
  """ms per generated token of transformers' greedy generate (prefill amortised out)."""
  import torch  # pylint: disable=g-import-not-at-top

  hf = peers.load(path).model
  ids = torch.tensor([prompt])

  def run(n):
    with torch.no_grad():
      return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

  return _step_ms(run, new_tokens, runs)[0]


def matmul_ms(model: models.Model, rows: int, runs: int, chain: bool = False) -> float:
  """ms for XLA's matmuls streaming every weight once for `rows` token rows (the floor of a
  forward of that many tokens: no attention, cache, norms or sampling).

  Independent matmuls may run side by side on a multi-core CPU, which no forward can do
  (its layers depend on each other); `chain=True` runs them one after another, each input
  cut or tiled from the previous output: the floor for matmuls in a forward's order.
  """
  mats = [w for w in jax.tree.leaves(model.params) if w.ndim == 2]
  if model.config.tie_embeddings:  # the LM head reads the embedding as [H, V]
    mats = [w.T if w.shape[0] == model.config.vocab_size else w for w in mats]

  @jax.jit
  def step(x, mats):
    if not chain:
      return [jnp.ones((rows, w.shape[0]), w.dtype) @ w + x.sum() for w in mats]
    h = jnp.ones((rows, mats[0].shape[0]), x.dtype) * x
    for w in mats:
      n = w.shape[0]
      h = (jnp.tile(h, (1, -(-n // h.shape[1]))) if h.shape[1] < n else h)[:, :n] @ w
    return h.sum()

  x = jnp.ones((1,), model.dtype)
  return 1e3 * _median_time(lambda: step(x, mats), runs)


def _forward_loop(model: models.Model, batch: int, t: int, context: int, reps: int):
  """(a call running `reps` cached forwards of t tokens per sequence after `context`
  committed tokens inside one jitted fori_loop carrying the cache, as the decode loop runs
  them; the jitted function and its arguments, for its compiled text)."""
  cfg = model.config

  @jax.jit
  def fwd(params, tokens, cache):
    pos = cache.lengths[:, None] + jnp.arange(t)

    def body(_, carry):
      cache, acc = carry
      # Tokens that depend on the carry, so XLA cannot hoist the first layer out of the loop.
      tok = tokens + (acc > 1e30).astype(jnp.int32)
      out = models.forward(cfg, params, tok, pos, models.causal(t), cache)
      return out.cache, acc + out.logits[:, -1, 0].sum()

    return jax.lax.fori_loop(0, reps, body, (cache, jnp.float32(0)))[1]

  cache = model.init_cache(batch, context + 64).advance(jnp.full((batch,), context, jnp.int32))
  args = (model.params, jnp.ones((batch, t), jnp.int32), cache)
  return (lambda: fwd(*args)), fwd, args


def forward_ms(model: models.Model, batch: int, t: int, context: int, runs: int,
               reps: int = 8) -> float:
  """ms of one cached forward of t tokens per sequence after `context` committed tokens, as
  the decode loop runs it: `reps` forwards inside one jitted fori_loop carrying the cache
  (separate jitted calls, even with the cache donated, add a copy of the cache per call)."""
  run, _, _ = _forward_loop(model, batch, 1 if t is None else t, context, reps)
  return 1e3 * _median_time(run, runs) / reps


def forward_profile(model: models.Model, batch: int = 16, context: int = 300,
                    runs: int = 3, reps: int = 8) -> dict:
  """Where a batch-`batch` single-token forward's time goes, from `jax.profiler`'s trace of
  XLA's ops: ms a forward in the weight matmuls (2-D dots), attention's score dot q.K over
  the cache (a dot whose last output axis is the cache's slots), its value dot p.V (the
  other batched dots) and everything else, beside the forward's wall ms and the chained
  matmul floor. Ops may overlap on a multi-core CPU, so the classes can sum past the wall
  time; the input cache's copy into the loop is left out (once a call, not a forward)."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  run, fwd, args = _forward_loop(model, batch, 1, context, reps)
  wall = 1e3 * _median_time(run, runs) / reps
  text = fwd.lower(*args).compile().as_text()
  slots = context + 64
  # HLO op name -> its class, from the dots inside it (a fusion's called computation).
  bodies, cur = collections.defaultdict(list), None
  for line in text.splitlines():
    if line and not line.startswith(" "):
      cur = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
    elif cur:
      bodies[cur].append(line)
  kind = {}
  for lines in bodies.values():
    for line in lines:
      m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w+)\((.*)", line)
      if not m:
        continue
      name, dims, op, rest = m.groups()
      dots = []
      if op == "dot":
        dots = [dims]
      elif op == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", rest)
        dots = [d.group(1) for l in bodies.get(called.group(1) if called else "", [])
                for d in [re.search(r"= \w+\[([\d,]*)\]\S* dot\(", l)] if d]
      if not dots:
        kind[name] = "other"
      elif dots[0].count(",") == 1:
        kind[name] = "weight matmuls"
      elif dots[0].split(",")[-1] == str(slots):
        kind[name] = "attention q.K (cache)"
      else:
        kind[name] = "attention p.V (cache)"
  folder = tempfile.mkdtemp()
  jax.profiler.start_trace(folder)
  for _ in range(runs):
    jax.block_until_ready(run())
  jax.profiler.stop_trace()
  trace = sorted(glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True))[-1]
  ms = collections.Counter()
  for e in json.load(gzip.open(trace))["traceEvents"]:
    name = e.get("name", "")
    if e.get("ph") == "X" and name in kind and not name.startswith("copy"):
      ms[kind[name]] += e["dur"] / 1e3 / (runs * reps)
  chained = matmul_ms(model, batch, runs, chain=True)
  return {"batch": batch, "context": context, "forward_ms": wall, "chained_matmul_ms": chained,
          **{k: ms[k] for k in ("weight matmuls", "attention q.K (cache)",
                                "attention p.V (cache)", "other")}}


def draft_ms(model: models.Model, runs: int, context: int = 256, batch: int = 1) -> float:
  """ms of one EAGLE draft forward: 1 token per row through the head against its cache +
  LM head, for `batch` rows."""
  from specjax.drafters import EagleHead  # pylint: disable=g-import-not-at-top
  cfg = model.config
  head = EagleHead(cfg)
  params = head.init(jax.random.key(0))
  shared = models.shared_params(cfg, model.params)
  cache = models.KVCache.create(1, batch, context + 8, cfg.num_kv_heads, cfg.head_dim).advance(
      jnp.full((batch,), context, jnp.int32))

  @jax.jit
  def step(params, feat, tokens, cache):
    g, cache = head.net(params, shared, feat, tokens, cache.lengths[:, None],
                        models.causal(1), cache)
    return models.lm_head(cfg, shared, g), cache

  feat, tokens = jnp.ones((batch, 1, cfg.hidden_size)), jnp.ones((batch, 1), jnp.int32)
  return 1e3 * _median_time(lambda: step(params, feat, tokens, cache), runs)


# head -> (configs module, argument): the SmolLM2 recipes whose train steps `--train` times.
TRAIN_RECIPES = {
    "eagle": ("eagle", None), "fspad": ("eagle", "fspad"), "eagle3": ("eagle3", None),
    "medusa": ("medusa", None), "hydra": ("hydra", None), "falcon": ("falcon", None),
    "dflash": ("dflash", None), "dspark": ("dspark", None), "ppd": ("ppd", None),
    "draft_lm": ("fastdraft", "align"),
}


def train_tokens_per_s(model: models.Model, recipe: str = "eagle", batch: int = 4,
                       seq: int = 512, runs: int = 3) -> float:
  """Tokens/s of a recipe's train step with online features (the frozen target's forward,
  the head's loss, backward and optimizer update) on random tokens, after compiling."""
  from specjax.training import trainer  # pylint: disable=g-import-not-at-top
  module, arg = TRAIN_RECIPES[recipe]
  c = importlib.import_module(f"specjax.configs.{module}").get_config(arg)
  head = registry.HEADS.build(c.head, model.config, **c.head_kwargs)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, model.config.vocab_size)
  mask = jnp.ones((batch, seq))
  shared = models.shared_params(model.config, model.params)
  head, params = head.fit(head.init(jax.random.key(0), model.dtype), np.asarray(tokens),
                          np.asarray(mask), shared)
  tx = trainer.optimizer(c, params)
  step, _ = trainer.make_steps(model, head, tx, 0, 1, loss=c.loss)
  state = [trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))]

  def run():
    state[0], m = step(state[0], model.params, tokens, mask)
    return m["loss"]
  return batch * seq / _median_time(run, runs)


def train_table(model: models.Model, recipes, batch: int = 4, seq: int = 512,
                runs: int = 3) -> list[dict]:
  """Each recipe's train tokens/s beside the target's matmul-only forward over the same
  rows, measured in this run (the share says what the head adds to the target's work)."""
  rows = batch * seq
  matmul = rows / (1e-3 * matmul_ms(model, rows, runs, chain=True))
  print(f"the target's matmuls alone at M={rows}: {matmul:.0f} tokens/s\n\n"
        "| recipe | head | train tokens/s | share of target matmul tokens/s |\n"
        "|---|---|---|---|", flush=True)
  out = []
  for r in recipes:
    tps = train_tokens_per_s(model, r, batch, seq, runs)
    out.append({"recipe": r, "train_tokens_per_s": tps, "matmul_tokens_per_s": matmul})
    print(f"| {r} | {TRAIN_RECIPES[r][0]}{':' + TRAIN_RECIPES[r][1] if TRAIN_RECIPES[r][1] else ''}"
          f" | {tps:.0f} | {tps / matmul:.2f} |", flush=True)
  return out


def compile_seconds(model: models.Model, prompt: list[int], new_tokens: int,
                    **generate_kwargs) -> tuple[float, float]:
  """(seconds to compile the decode program of this `generate` call, seconds of a call once
  compiled), with JAX's persistent compilation cache off and no program in memory: the
  compile is the first call's time less a compiled call's."""
  jax.clear_caches()
  was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    run = lambda: decode.generate(model, [prompt], max_new_tokens=new_tokens, eos=None,
                                  **generate_kwargs)
    start = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - start
    again = _median_time(run, 3)
  finally:
    jax.config.update("jax_enable_compilation_cache", was)
    jax.clear_caches()
  return first - again, again


def compile_table(model: models.Model, prompt: list[int], new_tokens: int) -> list[dict]:
  """`compile_seconds` of the decode programs a sweep compiles most: AR, an EAGLE-3 chain of
  3 and an EAGLE-2 tree (the committed SmolLM2 heads; random heads of the same shape for
  another target)."""
  from specjax import registry  # pylint: disable=g-import-not-at-top
  from specjax.configs import common  # pylint: disable=g-import-not-at-top

  programs = [("AR", None)]
  if model.name.startswith(models.DEFAULT):
    programs += [
        ("EAGLE-3 chain of 3", registry.DRAFTERS.build(
            "eagle3", model, checkpoint=common.EAGLE3_SMOLLM2, depth=3, top_k=1)),
        ("EAGLE-2 tree (top_k 3, depth 4, 7 nodes)", registry.DRAFTERS.build(
            "eagle", model, checkpoint=common.EAGLE_SMOLLM2, top_k=3, depth=4, num_nodes=7))]
  rows = []
  for name, drafter in programs:
    compile_s, run_s = compile_seconds(model, prompt, new_tokens, drafter=drafter)
    rows.append({"program": name, "compile_s": compile_s, "run_s": run_s})
    print(f"| {name} | {compile_s:.1f} | {run_s:.2f} |", flush=True)
  return rows


def _mt_bench_chats(model: models.Model, limit: int | None = None) -> list[list[int]]:
  """MT-Bench first turns rendered with the model's chat template (the first `limit`)."""
  from specjax.evaluation import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  return [model.tokenizer.encode_chat([{"role": "user", "content": p.turns[0]}])
          for p in prompts_lib.load("mt_bench", limit=limit)]


def _batch1(model: models.Model, chats, drafter, new_tokens: int, runs: int):
  """Each prompt alone through greedy `generate` (no EOS): (tokens/s over the medians of
  `runs` timed calls, tau, the outputs)."""
  outs, seconds = [], 0.0
  for p in chats:
    run = lambda: decode.generate(model, [p], max_new_tokens=new_tokens, eos=None,
                                  drafter=drafter)
    seconds += _median_time(run, runs)
    outs.append(run())
  tau = float(sum(int(o.lengths[0]) for o in outs) /
              sum(int(o.stats.target_calls[0]) for o in outs))
  return len(chats) * new_tokens / seconds, tau, outs


def _distill_rows(model: models.Model, eval_rows: int):
  """The committed self-distilled training data (never evaluation prompts), as 256-token
  rows (`training.data.Data`)."""
  from specjax.training import data as data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.load("assets/distill/smollm2-135m", seq_len=256,
                       vocab=model.config.vocab_size, eval_rows=eval_rows)


def goodput_table(model: models.Model, costs: dict, batches=(1, 8, 16, 32), depth: int = 3,
                  new_tokens: int = 64, runs: int = 2, checkpoint: str | None = None) -> list:
  """Greedy tokens/s of `generate` at each batch size (MT-Bench first turns, repeated to
  fill the batch) for AR, the committed EAGLE-3 head as a fixed chain of 1..depth, and
  that chain under SmartSpec's goodput policy (`drafters.goodput`, with `costs`). Every
  output is checked equal to AR's."""
  from specjax.drafters import goodput  # pylint: disable=g-import-not-at-top
  from specjax.configs import common  # pylint: disable=g-import-not-at-top
  checkpoint = checkpoint or common.EAGLE3_SMOLLM2
  chats = _mt_bench_chats(model)
  chain = lambda d: registry.DRAFTERS.build("eagle3", model, checkpoint=checkpoint, top_k=1,
                                            depth=d)
  methods = [("ar", None)] + [(f"chain {d}", chain(d)) for d in range(1, depth + 1)] + [
      ("goodput", goodput.create(chain(depth), costs))]
  rows = []
  print("\n| batch | method | tokens/s | tau | x AR |\n|---|---|---|---|---|", flush=True)
  for b in batches:
    prompts = [chats[i % len(chats)] for i in range(b)]
    ar_out, ar_tps = None, None
    for name, drafter in methods:
      run = lambda: decode.generate(model, prompts, max_new_tokens=new_tokens, eos=None,
                                    drafter=drafter)
      seconds = _median_time(run, runs)
      out = run()
      if ar_out is None:
        ar_out = out.token_lists()
      elif out.token_lists() != ar_out:
        raise AssertionError(f"{name} at batch {b}: outputs differ from AR")
      tps = b * new_tokens / seconds
      ar_tps = ar_tps or tps
      tau = float(np.sum(out.lengths) / np.sum(out.stats.target_calls))
      rows.append({"batch": b, "method": name, "tokens_per_s": tps, "tau": tau,
                   "speedup": tps / ar_tps})
      print(f"| {b} | {name} | {tps:.1f} | {tau:.2f} | {tps / ar_tps:.2f} |", flush=True)
  return rows


def parallel_table(model: models.Model, layers: int = 8, new_tokens: int = 64,
                   num_prompts: int = 4, runs: int = 2, only: tuple[str, ...] = ()) -> list:
  """Batch-1 greedy tokens/s and tau on MT-Bench first turns for AR, the target's first
  `layers` layers as a plain chain draft, PEARL and EasySpec with that draft, each output
  checked equal to AR's; with the cost model's speedup for hardware where draft and
  target run on separate devices (PEARL: a step costs max(draft, verify)), where
  EasySpec's groups run on separate devices (ceil(L / group) layers a draft forward) and
  where Mirror SD's branches roll out beside the target's layers past its exit (its exit
  head and stream embeddings trained here on the self-distilled training rows,
  `mirror_heads`). `only`: the methods whose names start with one of these (AR always)."""
  chats = _mt_bench_chats(model, num_prompts)
  build = lambda name, **kw: registry.DRAFTERS.build(name, model, layers=layers, **kw)
  keep = lambda name: name == "ar" or not only or name.startswith(tuple(only))
  exit_params, stream_params = (mirror_heads(model, layers) if keep("mirror")
                                else (None, None))
  methods = [("ar", None), ("self_draft chain 3", build("self_draft", depth=3)),
             ("pearl gamma 4", build("pearl", gamma=4))] + [
                 (f"easyspec chain 3, group {g}", build("easyspec", depth=3, group=g))
                 for g in (1, 2, 4)] + [
                 (f"mirror gamma 4, kappa {k}", build("mirror", gamma=4, kappa=k,
                                                      exit_params=exit_params))
                 for k in (1, 4)] + [
                 ("mirror gamma 4, kappa 4, stream 2", build(
                     "mirror", gamma=4, kappa=4, exit_params=exit_params,
                     stream_params=stream_params))]
  methods = [(name, d) for name, d in methods if keep(name)]
  draft = model.truncated(layers)
  draft_ms = forward_ms(draft, 1, 1, 256, runs * 2)
  layer_ms = (draft_ms - forward_ms(model.truncated(1), 1, 1, 256, runs * 2)) / (layers - 1)
  head_ms = draft_ms - layers * layer_ms
  verify = {t: forward_ms(model, 1, t, 256, runs * 2) for t in (1, 4, 5)}
  rows, ar_tps, ar_out = [], None, None
  print(f"\ndraft forward {draft_ms:.1f} ms ({layer_ms:.2f} ms a layer), target T=1 "
        f"{verify[1]:.1f} ms, T=4 {verify[4]:.1f} ms\n\n| method | tokens/s | tau | x AR | "
        "predicted x AR, separate devices |\n|---|---|---|---|---|", flush=True)
  for name, drafter in methods:
    tps, tau, outs = _batch1(model, chats, drafter, new_tokens, runs)
    toks = [o.token_lists()[0] for o in outs]
    if ar_out is None:
      ar_out = toks
    elif toks != ar_out:
      raise AssertionError(f"{name}: outputs differ from AR")
    ar_tps = ar_tps or tps
    predicted = ""
    if name.startswith("pearl"):
      predicted = f"{drafter.predicted_speedup(tau, verify[4], draft_ms, verify[1])[1]:.2f}"
    elif name.startswith("easyspec"):
      fast = drafter.predicted_draft_ms(layer_ms, head_ms)
      predicted = f"{tau * verify[1] / (verify[4] + fast * drafter.depth):.2f}"
    elif name.startswith("mirror"):
      g, f, st = drafter.gamma, drafter.draft_forwards, drafter.stream
      # A round without a matching branch spends f draft forwards (ceil(gamma / stream)).
      reuse = 1 - sum(int(o.stats.draft_calls[0]) for o in outs) / (
          f * sum(int(o.stats.target_calls[0]) for o in outs))
      # The rollouts: f forwards of every branch row, each of stream real tokens and
      # stream - 1 stream tokens (the first carries the guess in place of real tokens).
      rollout = f * forward_ms(draft, drafter.branches, 2 * st - 1, 256, runs * 2)
      exit_ms = verify[g + 1] * drafter.exit_layer / model.config.num_layers
      ms = drafter.predicted_ms(reuse, verify[g + 1], exit_ms, draft_ms, rollout)
      predicted = f"{tau * verify[1] / ms:.2f} (reuse {reuse:.2f})"
    rows.append({"method": name, "tokens_per_s": tps, "tau": tau, "speedup": tps / ar_tps,
                 "predicted_parallel_speedup": predicted})
    print(f"| {name} | {tps:.1f} | {tau:.2f} | {tps / ar_tps:.2f} | {predicted} |", flush=True)
  return rows


def quant_table(model: models.Model, new_tokens: int = 64, num_prompts: int = 4,
                runs: int = 2, group: int = 64) -> list[dict]:
  """The float target beside its int8 and int4 weight-only versions (`models.quant`,
  `group` input rows a scale): stored weight bytes, the logit error against float over 8
  self-distilled rows of a full 256 tokens (no padding, whose positions would dominate
  the error), and batch-1 greedy tokens/s of AR and of the
  committed EAGLE-3 head (chain of 3) on MT-Bench first turns, with its tau. Every
  speculative output is checked equal to AR of the same (quantized) target: lossless
  relative to the target being verified with."""
  from specjax.configs import common  # pylint: disable=g-import-not-at-top
  from specjax.models import quant  # pylint: disable=g-import-not-at-top
  d = _distill_rows(model, 8)
  rows = d.tokens[d.lengths == 256][:8]
  chats = _mt_bench_chats(model, num_prompts)
  out = []
  print("\n| target | weight MB | max abs logit error | KL | top-1 agreement | AR tokens/s | "
        "EAGLE-3 tokens/s | tau | x AR |\n|---|---|---|---|---|---|---|---|---|", flush=True)
  for bits in (None, 8, 4):
    target = model if bits is None else model.quantized(bits, group)
    label = "float32" if bits is None else f"int{bits} (g{group})"
    err = quant.logit_error(model, target, rows)
    head = registry.DRAFTERS.build("eagle3", target, checkpoint=common.EAGLE3_SMOLLM2,
                                   top_k=1, depth=3)
    ar_tps, _, ar_outs = _batch1(target, chats, None, new_tokens, runs)
    tps, tau, outs = _batch1(target, chats, head, new_tokens, runs)
    if [o.token_lists() for o in outs] != [o.token_lists() for o in ar_outs]:
      raise AssertionError(f"{label}: EAGLE-3's output differs from that target's AR")
    row = {"target": label, "weight_mb": quant.weight_bytes(target.params) / 2**20, **err,
           "ar_tokens_per_s": ar_tps, "eagle3_tokens_per_s": tps, "tau": tau,
           "speedup": tps / ar_tps}
    out.append(row)
    print(f"| {label} | {row['weight_mb']:.0f} | {err['max_abs_logit']:.3f} | "
          f"{err['kl']:.2e} | {err['top1_agreement']:.3f} | {ar_tps:.1f} | {tps:.1f} | "
          f"{tau:.2f} | {row['speedup']:.2f} |", flush=True)
  return out


# The speculative-MoE table's target: a tiny random MoE (16 experts, top 2, every layer),
# on 2 data x 4 expert shards of 8 forced host devices (4 experts a device).
MOE_BENCH = models.ModelConfig(
    "llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=16, num_experts=16, experts_per_token=2, moe_intermediate_size=32,
    moe_layers=(0, 1, 2, 3), max_position_embeddings=512)
MOE_MESH = "data=2,expert=4"


def _twin_experts(params, cfg: models.ModelConfig, seed: int = 0):
  """Synthetic co-activation: expert e + E/2's router column is expert e's plus 5% noise,
  so a token that picks one mostly picks its twin, which starts on another device."""
  rng = np.random.default_rng(seed)
  half = cfg.num_experts // 2
  params = jax.tree.map(lambda x: x, params)
  for i in cfg.moe_layers:
    r = np.asarray(params[f"layers_{i}"]["mlp"]["router"]).copy()
    r[:, half:] = r[:, :half] + 0.05 * np.abs(r[:, :half]).mean() * rng.standard_normal(
        r[:, :half].shape)
    params[f"layers_{i}"]["mlp"]["router"] = jnp.asarray(r, params[f"layers_{i}"]["mlp"][
        "router"].dtype)
  return params


def _moe_workloads(cfg: models.ModelConfig, seed: int, batch: int = 4, prompt: int = 24,
                   nodes: int = 16):
  """{"tree": a 16-node draft tree per row after a 24-token prompt, "ar": one token per
  row, "prefill chunk": 64 tokens per row}: (tokens, positions, visible) and the prompt,
  random tokens."""
  rng = np.random.default_rng(seed)
  prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt)))
  parents = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, nodes)])
  from specjax import tree as tree_lib  # pylint: disable=g-import-not-at-top
  anc = tree_lib.ancestor_mask(jnp.asarray(parents))
  depth = jnp.sum(anc, -1) - 1
  tree = (jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, nodes))),
          jnp.broadcast_to(prompt + depth, (batch, nodes)), anc[None])
  ar = (jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, 1))),
        jnp.full((batch, 1), prompt), models.causal(1))
  chunk = models.model.PREFILL_CHUNK
  prefill = (jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, chunk))),
             jnp.broadcast_to(prompt + jnp.arange(chunk), (batch, chunk)), models.causal(chunk))
  return prompts, {"tree": tree, "ar": ar, "prefill chunk": prefill}


def _moe_step(cfg, params, cache, work, plan):
  """One cached forward of `work` under `plan`: (per-layer dispatch counts, collective
  bytes of the compiled per-device program)."""
  from specjax.models import moe_parallel  # pylint: disable=g-import-not-at-top
  tokens, positions, visible = work

  def f(p, c, tok, pos):
    _, state = models.model.module(cfg).apply(
        {"params": p}, tok, pos, visible, c, c.prefix_mask(tok.shape[1]),
        mutable=["intermediates"])
    return state["intermediates"]

  with sharding.use(plan):
    fn = jax.jit(f)
    args = (jax.device_put(params, plan.param_shardings(params)),
            jax.device_put(cache, plan.cache_shardings(cache)),
            jax.device_put(tokens, plan.batch_sharding(tokens.shape)),
            jax.device_put(positions, plan.batch_sharding(positions.shape)))
    hlo = fn.lower(*args).compile().as_text()
    stats = moe_parallel.dispatch_stats(fn(*args)) if plan.moe is not None else []
  return stats, moe_parallel.collective_bytes(hlo)


def moe_table(seed: int = 0) -> list[dict]:
  """Speculative MoE's all-to-all bytes per token (`models.moe_parallel`) on 8 forced host
  devices (`MOE_MESH`), for a 16-node tree verified at batch 4, an AR step at batch 4 and
  a 64-token prefill chunk at batch 4, in every MoE layer of `MOE_BENCH` together: the dense form (all-reduce, no all-to-
  all), the routed form, with speculative token shuffling (this layer's gate, or the
  previous layer's routing), with expert grouping (`moe_grouping`, calibrated on other
  tokens), and both. Each routed setting runs at full capacity (C = L, every local token
  fits) on a calibration step of the same shape, then at the capacity that step needed
  (its largest per-pair demand; what overflows on the measured step goes through the exact
  overflow round). Compiled bytes: the per-device HLO's all-to-all results x devices /
  tokens (the overflow round's, inside a conditional, apart); needed: the rows that crossed
  devices x (2 H + E/D) x 4 bytes / tokens. Done for the random router and for synthetic
  twin experts (`_twin_experts`). Every routed step's dispatch counts are checked against
  its shapes (no drop)."""
  from specjax.models import moe_grouping, moe_parallel  # pylint: disable=g-import-not-at-top
  from specjax.models.moe_parallel import Routed  # pylint: disable=g-import-not-at-top
  if jax.device_count() != 8:
    raise SystemExit(f"--moe needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_"
                     f"count=8 before JAX starts); there are {jax.device_count()}.")
  cfg, devices = MOE_BENCH, jax.device_count()
  d = sharding.Plan.create(MOE_MESH).mesh.shape["expert"]
  row_bytes = (2 * cfg.hidden_size + cfg.num_experts // d) * 4
  out = []
  print("\n| router | step | MoE form | capacity C / L | compiled all-to-all B/token | "
        "overflow round B/token (ran) | needed B/token | rows crossing / token | "
        "other collectives B/token |\n|---|---|---|---|---|---|---|---|---|", flush=True)
  for router in ("random", "twin experts"):
    params = models.init_params(cfg, jax.random.key(seed))
    if router != "random":
      params = _twin_experts(params, cfg, seed)
    model = models.Model(cfg, params, name="moe-bench")
    calib = np.random.default_rng(seed + 1).integers(0, cfg.vocab_size, (16, 64))
    grouped, _ = moe_grouping.grouped(model, calib, d)
    prompts, works = _moe_workloads(cfg, seed + 2)
    cal = [_moe_workloads(cfg, seed + 3 + i) for i in range(2)]

    def prefilled(tok):
      cache = models.KVCache.for_config(cfg, tok.shape[0], 128, jnp.float32)
      return models.prefill(cfg, params, cache, tok, jnp.full((tok.shape[0],), tok.shape[1]))[0]

    cache = prefilled(prompts)
    cal = [(prefilled(tok), w) for tok, w in cal]
    forms = [("dense", params, None), ("routed", params, Routed()),
             ("routed + s-TS (gate)", params, Routed(shuffle="gate")),
             ("routed + s-TS (previous layer)", params, Routed(shuffle="previous")),
             ("routed + s-EG", grouped.params, Routed()),
             ("routed + s-TS (gate) + s-EG", grouped.params, Routed(shuffle="gate"))]
    for step, work in works.items():
      tokens = work[0].size
      for label, p, opts in forms:
        if opts is None:
          _, coll = _moe_step(cfg, p, cache, work, sharding.Plan.create(MOE_MESH))
          settings = [(None, coll, [])]
        else:
          seen = [_moe_step(cfg, p, c, w[step], sharding.Plan.create(MOE_MESH, moe=opts))[0]
                  for c, w in cal]
          per_device = seen[0][0]["per_device"]
          need = max(max(s["max_pair_rows"] for s in stats) for stats in seen + [[{
              "max_pair_rows": 1}]])
          settings = []
          for factor in sorted({1.0, need / per_device}, reverse=True):
            o = dataclasses.replace(opts, capacity_factor=factor)
            stats, coll = _moe_step(cfg, p, cache, work, sharding.Plan.create(MOE_MESH, moe=o))
            if any(s["dropped_rows"] or s["tokens"] != tokens for s in stats):
              raise AssertionError(f"{label}: dispatch counts off: {stats}")
            settings.append((o, coll, stats))
        for o, coll, stats in settings:
          a2a = coll["all-to-all"]
          other = sum(v["main"] + v["conditional"] for k, v in coll.items() if k != "all-to-all")
          crossing = sum(s["remote_rows"] for s in stats)
          ran = sum(s["overflow_rows"] for s in stats)
          cap = "-" if o is None else (f"{stats[0]['capacity']} / {stats[0]['per_device']}")
          row = {"router": router, "step": step, "form": label, "capacity": cap,
                 "a2a_bytes_per_token": a2a["main"] * devices / tokens,
                 "overflow_bytes_per_token": a2a["conditional"] * devices / tokens,
                 "overflow_rows": ran,
                 "needed_bytes_per_token": crossing * row_bytes / tokens,
                 "rows_crossing_per_token": crossing / tokens,
                 "other_bytes_per_token": other * devices / tokens}
          out.append(row)
          print(f"| {router} | {step} | {label} | {cap} | {row['a2a_bytes_per_token']:.0f} | "
                f"{row['overflow_bytes_per_token']:.0f} ({'yes' if ran else 'no'}) | "
                f"{row['needed_bytes_per_token']:.0f} | {row['rows_crossing_per_token']:.2f} | "
                f"{row['other_bytes_per_token']:.0f} |", flush=True)
  return out


def hier_table(model: models.Model, layers=(10, 20, None), new_tokens: int = 64,
               num_prompts: int = 4, runs: int = 2, bits: int = 4, group: int = 64) -> list:
  """Hierarchical drafting for a quantized target (`drafters.selfdraft.hierarchical`):
  batch-1 greedy tokens/s and tau on MT-Bench first turns of the int`bits` target's AR,
  the committed EAGLE head as a chain of 3 and as an EAGLE-2 tree (top 3, 3 deep, 8 nodes)
  verified by the quantized target directly, and the same tree verified by an
  intermediate, the float target's first `layers` layers (None: all of them), whose
  first 6 accepted tokens the quantized target verifies as a chain. Every output is checked equal to the
  quantized target's AR: lossless relative to it."""
  from specjax.configs import common  # pylint: disable=g-import-not-at-top
  from specjax.drafters.selfdraft import hierarchical  # pylint: disable=g-import-not-at-top
  target = model.quantized(bits, group)
  chats = _mt_bench_chats(model, num_prompts)
  tree = dict(top_k=3, depth=3, num_nodes=8)
  ar_tps, _, ar_outs = _batch1(target, chats, None, new_tokens, runs)
  rows = [{"method": f"AR (int{bits})", "tokens_per_s": ar_tps, "tau": 1.0, "speedup": 1.0,
           "rounds": 0.0}]
  cases = [(f"EAGLE chain 3 -> int{bits}", registry.DRAFTERS.build(
      "eagle", target, checkpoint=common.EAGLE_SMOLLM2, top_k=1, depth=3)),
           (f"EAGLE-2 tree 8 -> int{bits}", registry.DRAFTERS.build(
               "eagle", target, checkpoint=common.EAGLE_SMOLLM2, **tree))]
  for n in layers:  # None: the whole float model
    mid = model if n is None else model.truncated(n)
    inner = registry.DRAFTERS.build("eagle", mid, checkpoint=common.EAGLE_SMOLLM2, **tree)
    where = f"all {model.config.num_layers} layers" if n is None else f"[:{n}]"
    cases.append((f"EAGLE-2 tree 8 -> float {where} -> chain 6 -> int{bits}",
                  hierarchical.create(mid, inner, depth=6)))
  print(f"\n| method (lossless against int{bits}) | tokens/s | tau | x AR | intermediate "
        "rounds / step |\n|---|---|---|---|---|", flush=True)
  print(f"| {rows[0]['method']} | {ar_tps:.1f} | 1.00 | 1.00 | |", flush=True)
  for name, drafter in cases:
    tps, tau, outs = _batch1(target, chats, drafter, new_tokens, runs)
    if [o.token_lists() for o in outs] != [o.token_lists() for o in ar_outs]:
      raise AssertionError(f"{name}: the output differs from the int{bits} target's AR")
    calls = sum(int(o.stats.target_calls[0]) for o in outs)
    rounds = (sum(int(o.stats.draft_calls[0]) for o in outs) / calls
              if isinstance(drafter, hierarchical.Hierarchical) else 0.0)
    rows.append({"method": name, "tokens_per_s": tps, "tau": tau, "speedup": tps / ar_tps,
                 "rounds": rounds})
    print(f"| {name} | {tps:.1f} | {tau:.2f} | {tps / ar_tps:.2f} | "
          f"{f'{rounds:.2f}' if rounds else ''} |", flush=True)
  return rows


def tiny_bamba(path: str, seed: int = 0) -> models.Model:
  """A random 4-layer Bamba checkpoint written by transformers (attention at layers 0
  and 2, Mamba-2 mixers at 1 and 3, vocabulary 96), loaded."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  cfg = transformers.BambaConfig(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[0, 2],
      mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
      mamba_chunk_size=16, max_position_embeddings=512, initializer_range=0.2,
      tie_word_embeddings=False)
  transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(
      path, safe_serialization=True)
  return models.load(path)


def damped(model: models.Model, factor: float) -> models.Model:
  """`model` with every layer after the first adding `factor` x its output to the
  residual (out_proj, o_proj, down_proj scaled): a target its first layer predicts
  better, so a truncated draft is accepted at rates closer to a trained draft's."""
  def scale(path, x):
    keys = [getattr(k, "key", "") for k in path]
    late = keys[0].startswith("layers_") and keys[0] != "layers_0"
    return x * factor if late and {"out_proj", "o_proj", "down_proj"} & set(keys) else x
  return models.Model(model.config, jax.tree_util.tree_map_with_path(scale, model.params))


def stree_tau(target: models.Model, shapes: dict, prompt_batches, max_new_tokens: int,
              want=None) -> dict:
  """{name: (nodes, tau)}: greedy tau of a one-layer truncated draft of `target` in each
  shape (DraftModel knobs) over every batch of prompts, the target verifying each tree in
  one forward (through its Mamba-2 layers' tree form on a hybrid target). With `want`
  (each batch's AR token lists), every output is checked equal to it."""
  from specjax.drafters import DraftModel  # pylint: disable=g-import-not-at-top
  out = {}
  for name, shape in shapes.items():
    drafter = DraftModel.truncated(target, 1, **shape)
    new = calls = 0
    for i, prompts in enumerate(prompt_batches):
      o = decode.generate(target, prompts, max_new_tokens=max_new_tokens, eos=None,
                          drafter=drafter)
      if want is not None and o.token_lists() != want[i]:
        raise AssertionError(f"{name}: the output differs from AR")
      new, calls = new + int(np.sum(o.lengths)), calls + int(np.sum(o.stats.target_calls))
    out[name] = (drafter.num_nodes, new / calls)
  return out


STREE_SHAPES = {  # node budget -> {shape: DraftModel knobs}
    3: {"chain": dict(depth=3), "tree": dict(tree=[[0], [1], [0, 0]])},
    6: {"chain": dict(depth=6),
        "tree a": dict(tree=[[0], [1], [0, 0], [0, 0, 0], [0, 0, 0, 0], [1, 0]]),
        "tree b": dict(tree=[[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0]]),
        "tree c": dict(tree=[[0], [1], [2], [0, 0], [0, 0, 0], [0, 0, 0, 0]])},
    10: {"chain": dict(depth=10),
         "tree": dict(tree=[[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1],
                            [0, 0, 0, 0], [0, 0, 0, 0, 0]])},
}


def stree_table(workdir: str, new_tokens: int = 48) -> list[dict]:
  """STree on a hybrid target: greedy tau of a chain and of trees of the same node budget
  (`STREE_SHAPES`), drafted by the target's first layer (attention) and verified through
  its Mamba-2 layers' tree form, on a random tiny Bamba (`tiny_bamba`) as written and
  with its later layers damped (`damped`: acceptance nearer a trained draft's); 8 prompts
  of 16 tokens in batches of 4. Every output is checked equal to AR."""
  import tempfile  # pylint: disable=g-import-not-at-top
  bamba = tiny_bamba(tempfile.mkdtemp(dir=workdir))
  rng = np.random.default_rng(0)
  batches = [[rng.integers(0, 96, 16).tolist() for _ in range(4)] for _ in range(2)]
  rows = []
  print("\n| target | nodes | shape | tau |\n|---|---|---|---|", flush=True)
  for label, factor in (("as written", 1.0), ("later layers x0.5", 0.5),
                        ("later layers x0.3", 0.3)):
    target = bamba if factor == 1.0 else damped(bamba, factor)
    want = [decode.generate(target, b, max_new_tokens=new_tokens, eos=None).token_lists()
            for b in batches]
    for nodes, shapes in STREE_SHAPES.items():
      for name, (n, tau) in stree_tau(target, shapes, batches, new_tokens, want).items():
        assert n == nodes
        rows.append({"target": label, "nodes": nodes, "shape": name, "tau": tau})
        print(f"| {label} | {nodes} | {name} | {tau:.3f} |", flush=True)
  return rows


def mirror_heads(model: models.Model, layers: int, rows: int = 64, held: int = 16,
                 steps: int = 400):
  """Mirror SD's trained parts for `model` and its first `layers` layers as the draft,
  on the self-distilled training rows (never evaluation prompts): the early-exit adapter
  at half the target's depth and one stream embedding (2 draft tokens a forward). Prints
  the exit's top-1 agreement with the target's next token and the stream token's top-1
  accuracy on held-out rows, before and after training."""
  from specjax.drafters.selfdraft import mirror  # pylint: disable=g-import-not-at-top
  d = _distill_rows(model, held)
  full = d.tokens[d.lengths == 256]
  train, test = full[:rows], d.eval_tokens[d.eval_lengths >= 128][:, :128]  # no padding
  layer = model.config.num_layers // 2
  params = mirror.train_exit(model, layer, train, steps=steps, positions=256, log_every=100)
  fresh = mirror.init_exit(model.config, 1, jax.random.key(0))
  print(f"exit head at layer {layer}: held-out top-1 agreement "
        f"{mirror.exit_agreement(model, layer, fresh, test):.3f} (LM head alone) -> "
        f"{mirror.exit_agreement(model, layer, params, test):.3f} (trained), top-4 "
        f"{mirror.exit_agreement(model, layer, params, test, 4):.3f}", flush=True)
  draft = model.truncated(layers)
  start = mirror.train_stream(draft, train, 1, steps=0)
  stream = mirror.train_stream(draft, train, 1, steps=steps // 2, log_every=100)
  print(f"stream embedding for the {layers}-layer draft: held-out top-1 two tokens ahead "
        f"{mirror.stream_fit(draft, start, test)[1]:.3f} (mean embedding) -> "
        f"{mirror.stream_fit(draft, stream, test)[1]:.3f} (trained)", flush=True)
  return params, stream


def verify_cost(model: models.Model, sizes, runs: int, context: int = 256,
                batch: int = 1) -> dict:
  """Median ms of one cached forward of T tokens per row, for each T."""
  return {t: forward_ms(model, batch, t, context, runs) for t in sizes}


# Batch sizes and widths of the per-batch cost tables (`drafters.goodput` reads them).
COST_BATCHES, COST_WIDTHS = (1, 8, 16, 32), (1, 2, 3, 4, 5)


def batch_costs(model: models.Model, runs: int, batches=COST_BATCHES,
                widths=COST_WIDTHS) -> dict:
  """{B: {"verify_ms": {T: ms}, "draft_ms": ms}}: a step's verification of T tokens per
  row and one draft forward, at each batch size (what SmartSpec's goodput weighs)."""
  out = {}
  for b in batches:
    out[b] = {"verify_ms": verify_cost(model, widths, runs, batch=b),
              "draft_ms": draft_ms(model, runs, batch=b)}
    print(f"batch {b}: verify ms " + ", ".join(f"T={t} {ms:.1f}" for t, ms in
                                                out[b]["verify_ms"].items())
          + f"; draft {out[b]['draft_ms']:.1f} ms", flush=True)
  return out


def write_costs(res: dict, out: str) -> None:
  """costs.json: what `drafters.budget` sizes drafts from (a sweep's `budget=` knob)."""
  os.makedirs(out, exist_ok=True)
  costs = {k: res[k] for k in ("model", "device", "verify_ms", "draft_ms", "batches")
           if k in res}
  with open(os.path.join(out, "costs.json"), "w", encoding="utf-8") as f:
    json.dump(costs, f, indent=1)


def _save(args, key: str, rows, file: str | None = None) -> dict:
  """{model, device, key: rows}, written to the output folder as FILE (default key.json)."""
  res = {"model": args.model, "device": str(jax.devices()[0]), key: rows}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, file or f"{key}.json"), "w", encoding="utf-8") as f:
    json.dump(res, f, indent=1)
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default=models.DEFAULT)
  ap.add_argument("--new-tokens", type=int, default=128)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
  ap.add_argument("--out", default="workdir/bench")
  ap.add_argument("--costs-only", action="store_true",
                  help="measure only the verify and draft costs (costs.json, minutes)")
  ap.add_argument("--compile-only", action="store_true",
                  help="print only the compile seconds per decode program (a few minutes)")
  ap.add_argument("--train", default=None,
                  help="only the train-throughput table for these recipes (comma-separated "
                       f"of {', '.join(TRAIN_RECIPES)}, or 'all')")
  ap.add_argument("--goodput", default=None, metavar="COSTS_JSON",
                  help="only the goodput table (AR, fixed EAGLE-3 chains, SmartSpec's "
                       "policy at batch 1, 8, 16, 32) with this cost file")
  ap.add_argument("--parallel", action="store_true",
                  help="only the PEARL / EasySpec / Mirror SD table (batch 1, with the "
                       "cost model's prediction for separate devices)")
  ap.add_argument("--only", default="",
                  help="with --parallel: only AR and the methods whose names start with "
                       "these (comma-separated, e.g. 'mirror,pearl')")
  ap.add_argument("--quant", action="store_true",
                  help="only the quantized-target table (float, int8, int4: logit error, "
                       "AR and EAGLE-3 tokens/s, tau)")
  ap.add_argument("--profile", action="store_true",
                  help="only the op-class profile of the batch-16 forward at 300 tokens of "
                       "context")
  ap.add_argument("--hier", action="store_true",
                  help="only the hierarchical-drafting table for the int4 target (EAGLE "
                       "chain and tree beside a float intermediate turning the tree into a "
                       "chain)")
  ap.add_argument("--stree", action="store_true",
                  help="only the STree table: chain vs tree tau at equal node budgets on a "
                       "tiny random hybrid (Bamba) target")
  ap.add_argument("--moe", action="store_true",
                  help="only the speculative-MoE table: all-to-all bytes per token of the "
                       "routed expert-parallel MoE with token shuffling / expert grouping "
                       "on 8 forced host devices")
  args = ap.parse_args(argv)
  if args.moe:  # before JAX starts its backend: 8 host devices
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
    args.model = "moe-bench"
    return _save(args, "moe", moe_table())
  if args.stree:
    os.makedirs(args.out, exist_ok=True)
    args.model = "tiny-random-bamba"
    return _save(args, "stree", stree_table(args.out))
  recipes = None
  if args.train:
    recipes = list(TRAIN_RECIPES) if args.train == "all" else args.train.split(",")
    unknown = [r for r in recipes if r not in TRAIN_RECIPES]
    if unknown:
      raise SystemExit(f"--train: unknown recipe(s) {unknown}; known: {list(TRAIN_RECIPES)}")
  runtime.enable_compilation_cache()
  model = models.load(args.model)
  if args.parallel:
    return _save(args, "parallel", parallel_table(
        model, runs=max(2, args.runs // 2),
        only=tuple(args.only.split(",")) if args.only else ()))
  if args.quant:
    return _save(args, "quant", quant_table(model, runs=max(2, args.runs // 2)))
  if args.hier:
    return _save(args, "hier", hier_table(model, runs=max(2, args.runs // 2)))
  if args.profile:
    row = forward_profile(model, runs=max(2, args.runs // 2))
    print("\n| " + " | ".join(row) + " |\n|" + "---|" * len(row) + "\n| " + " | ".join(
        f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return _save(args, "profile", [row])
  if args.goodput:
    from specjax.drafters import budget as budget_lib  # pylint: disable=g-import-not-at-top
    costs = budget_lib.read_costs(args.goodput)
    if "batches" not in costs:
      raise SystemExit(f"{args.goodput} has no per-batch tables: re-run "
                       "`python -m specjax.evaluation.bench --costs-only`.")
    return _save(args, "goodput", goodput_table(model, costs, runs=max(2, args.runs // 2)))
  if recipes:
    return _save(args, "train", train_table(model, recipes, runs=max(2, args.runs // 2)),
                 "train_throughput.json")
  prompt = model.tokenizer.encode_chat([{"role": "user", "content": "Tell me about the sea."}])
  if args.compile_only:
    print("| decode program | compile s | run s |\n|---|---|---|")
    return {"compile": compile_table(model, prompt, args.new_tokens)}
  res = {"model": args.model, "device": str(jax.devices()[0]),
         "floor_ms": matmul_ms(model, 1, args.runs * 4)}
  print(f"floor: {res['floor_ms']:.1f} ms/step", flush=True)
  if not args.costs_only:
    res["specjax_ms"] = decode_ms(model, prompt, 1, args.new_tokens, args.runs)[0]
    print(f"specjax AR: {res['specjax_ms']:.1f} ms/token", flush=True)
  if not args.no_hf and not args.costs_only:
    path = models.preset_path(args.model) if args.model in models.PRESETS else args.model
    res["hf_ms"] = hf_ms(path, prompt, args.new_tokens, args.runs)
    print(f"transformers AR: {res['hf_ms']:.1f} ms/token", flush=True)
  sizes = (1, 2, 4, 8, 16, 32, 64)
  res["verify_ms"] = verify_cost(model, sizes, args.runs * 2)
  base = res["verify_ms"][1]
  res["draft_ms"] = draft_ms(model, args.runs * 4)
  print(f"EAGLE draft forward: {res['draft_ms']:.1f} ms (target T=1: {base:.1f} ms)",
        flush=True)
  res["batches"] = batch_costs(model, args.runs)
  write_costs(res, args.out)
  if args.costs_only:
    return
  print("\n| decode program | compile s | run s |\n|---|---|---|")
  res["compile"] = compile_table(model, prompt, args.new_tokens)
  long_prompt = (prompt * (300 // len(prompt) + 1))[:300]
  ar_ms = decode_ms(model, long_prompt, 1, args.new_tokens, args.runs)[0]
  chained, independent = (matmul_ms(model, 1, args.runs * 4, chain=c) for c in (True, False))
  res["ar_floor"] = {"step_ms": ar_ms, "chained_matmul_ms": chained,
                     "matmul_ms": independent}
  print(f"\n| AR step after 300 prompt tokens | ms | x chained floor | x independent floor |"
        f"\n|---|---|---|---|\n| generate | {ar_ms:.1f} | {ar_ms / chained:.2f} | "
        f"{ar_ms / independent:.2f} |", flush=True)
  rows = 4 * 512
  res["train_tokens_per_s"] = train_tokens_per_s(model, "eagle", 4, 512,
                                                 max(2, args.runs // 2))
  res["matmul_tokens_per_s"] = rows / (1e-3 * matmul_ms(model, rows, 3, chain=True))
  print(f"EAGLE train step: {res['train_tokens_per_s']:.0f} tokens/s; the target's "
        f"matmuls alone at M={rows}: {res['matmul_tokens_per_s']:.0f} tokens/s", flush=True)
  res["forward_vs_matmul"] = []
  print("\n| batch | context | T | forward ms | matmul ms (chained) | ratio | matmul ms "
        "(independent) | ratio |\n|---|---|---|---|---|---|---|---|")
  for b, context, t in [(1, 300, 1), (1, 300, 4), (1, 300, 8), (1, 1400, 1), (1, 1400, 4),
                        (1, 1400, 8), (16, 30, 1), (16, 300, 1)]:
    f_ms = forward_ms(model, b, t, context, args.runs * 2)
    c_ms = matmul_ms(model, b * t, args.runs * 2, chain=True)
    m_ms = matmul_ms(model, b * t, args.runs * 2)
    res["forward_vs_matmul"].append({"batch": b, "context": context, "t": t,
                                     "forward_ms": f_ms, "chained_matmul_ms": c_ms,
                                     "matmul_ms": m_ms})
    print(f"| {b} | {context} | {t} | {f_ms:.1f} | {c_ms:.1f} | {f_ms / c_ms:.2f} | "
          f"{m_ms:.1f} | {f_ms / m_ms:.2f} |", flush=True)
  res["batched"] = []
  print("\n| batch | tokens/s | step ms | matmul ms (M=batch) | step / matmul |\n"
        "|---|---|---|---|---|")
  for b in (1, 8, 16, 32):
    step_ms, tps = decode_ms(model, prompt, b, args.new_tokens, max(2, args.runs // 2))
    m_ms = matmul_ms(model, b, args.runs * 2)
    res["batched"].append({"batch": b, "tokens_per_s": tps, "step_ms": step_ms,
                           "matmul_ms": m_ms})
    print(f"| {b} | {tps:.1f} | {step_ms:.1f} | {m_ms:.1f} | {step_ms / m_ms:.2f} |", flush=True)
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
