"""PEARL: drafting and verification at the same time, with an adaptive draft length.

After "PEARL: Parallel Speculative Decoding with Adaptive Draft Length". Plain speculative
decoding alternates: the target waits while the draft drafts gamma tokens, then the draft
waits while the target verifies them. PEARL overlaps the two:

  pre-verify   while the draft drafts gamma tokens, the target already runs on the
               current token (an AR step), which checks the first draft early: if it
               disagrees, the rest is dropped and the target's token is kept
  post-verify  while the target verifies gamma pending drafts, the draft goes on
               drafting the next gamma tokens as if all were accepted; if they were, and
               the target's next token equals the first new draft, the remaining new
               drafts become the pending ones and no drafting phase is needed

Both are one rule in this loop's steps: each step verifies the drafts *pending* from the
previous step (none after a rejection: an AR step, pre-verify) while the draft drafts
`gamma` tokens past them. In `commit`, if every pending draft was accepted and the
target's next token (bonus or correction) equals the first new draft, the other gamma - 1
become the next step's pending drafts (post-verify); otherwise there are none. A row
running well verifies gamma - 1 drafts a step and pays no drafting phase; a row running
badly falls back to AR steps: the draft length adapts per row, as in the paper.

The step's two halves read the same inputs (the committed tokens and the pending drafts)
and nothing of each other, so on hardware that runs the draft and the target on separate
devices a step costs max(draft, verify) rather than their sum (`predicted_speedup`; the
paper puts them on separate GPUs). Run on one device, as here, they run one after the
other: the loop checks the algorithm (outputs equal to AR, tau), not the overlap.

Lossless at any temperature: pending drafts are verified by the step's rule against the
draft distributions they were sampled from, and a new draft is kept only when it equals
the target's own next token, which is drawn exactly as without it.

The draft is an LM with its own KV cache (an independent model sharing the vocabulary,
or the target's first layers). Its cache holds the committed tokens; each step forwards
the ones it lacks together with the pending drafts (one forward of up to 2 gamma - 1
tokens) and then drafts gamma - 1 more, one token a forward.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import models, registry
from specjax import sampling as sampling_lib
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import Model, causal, forward, param_dtype, prefill
from specjax.tree import DraftTree


def _pending_tree(pending_BxG, num_pending_B, pending_q, sampling) -> DraftTree:
  """The chain a step verifies: the first num_pending of the pending drafts."""
  valid = jnp.arange(pending_BxG.shape[1])[None, :] < num_pending_B[:, None]
  return DraftTree.chain(pending_BxG, valid, None if sampling.greedy else pending_q,
                         sampled=not sampling.greedy)


@flax.struct.dataclass
class PearlState:
  cache: KVCache  # the draft's: the committed tokens (root included) after a propose
  pending: jax.Array  # int32[B, gamma - 1]: drafts the next step verifies
  num_pending: jax.Array  # int32[B]
  pending_q: jax.Array  # float32[B, gamma - 1, V]: their draft distributions (sampling)
  drafts: jax.Array  # int32[B, gamma]: this step's new drafts (past the pending ones)
  drafts_q: jax.Array  # float32[B, gamma, V] (zeros when greedy)


@flax.struct.dataclass
class Pearl:
  params: Any
  config: ModelConfig = flax.struct.field(pytree_node=False)
  gamma: int = flax.struct.field(pytree_node=False, default=4)
  takes_stop_policy = False
  drafts_vary = True  # no pending drafts: an AR step
  features = ()

  @property
  def num_nodes(self) -> int:
    return self.gamma - 1

  def validate(self, target_config: ModelConfig) -> None:
    if self.config.vocab_size != target_config.vocab_size:
      raise ValueError(f"PEARL's draft has vocab size {self.config.vocab_size}, the target "
                       f"{target_config.vocab_size}: they must share a tokenizer.")
    if not isinstance(self.gamma, (int, np.integer)) or self.gamma < 2:
      raise ValueError(f"PEARL's gamma (tokens drafted a step) must be an integer >= 2; got "
                       f"{self.gamma!r}.")

  def init(self, ctx, max_len: int, features) -> PearlState:
    del features
    b, g, v = ctx.history.shape[0], self.gamma, self.config.vocab_size
    # Room past the committed tokens for a step's window and new drafts.
    cache = KVCache.for_config(self.config, b, max_len + 3 * g, param_dtype(self.params))
    cache, _ = prefill(self.config, self.params, cache, ctx.history, ctx.length - 1)
    zeros = lambda *s: jnp.zeros((b,) + s, jnp.int32)
    q = lambda n: jnp.zeros((b, n, v), jnp.float32)
    return PearlState(cache, zeros(g - 1), zeros(), q(g - 1), zeros(g), q(g))

  def draft(self, cache: KVCache, history_BxL, length_B, pending_BxG, num_pending_B,
            sampling, key):
    """The draft half of a step: the committed tokens the draft's cache lacks and the
    pending drafts in one forward, then gamma - 1 more drafts one forward each. Reads
    nothing the step's verification makes. Returns (drafts [B, gamma], their q [B, gamma,
    V] or None when greedy, the cache holding the committed tokens)."""
    g = self.gamma
    b, width = history_BxL.shape[0], 2 * g - 1
    # The window: committed tokens the cache lacks (root included), then the pending drafts.
    lag = length_B - cache.lengths  # 1..gamma for live rows
    j = jnp.arange(width)[None, :]
    from_history = jnp.take_along_axis(
        history_BxL, jnp.minimum(cache.lengths[:, None] + j, history_BxL.shape[1] - 1), 1)
    from_pending = jnp.take_along_axis(pending_BxG, jnp.clip(j - lag[:, None], 0, g - 2), 1)
    window = jnp.where(j < lag[:, None], from_history, from_pending)
    used = lag + num_pending_B
    out = forward(self.config, self.params, window, cache.lengths[:, None] + j,
                  causal(width), cache)
    last = jnp.take_along_axis(out.logits, jnp.maximum(used - 1, 0)[:, None, None], 1)[:, 0]
    cache = out.cache.advance(used)

    keys = jax.random.split(key, g)
    tok, q = sampling_lib.draw(keys[0], last, sampling)
    toks, qs = [tok], [q]
    for i in range(1, g):  # gamma - 1 more drafts, one forward each
      step = forward(self.config, self.params, tok[:, None], cache.lengths[:, None],
                     causal(1), cache)
      cache = step.cache.advance(jnp.ones((b,), jnp.int32))
      tok, q = sampling_lib.draw(keys[i], step.logits[:, 0], sampling)
      toks.append(tok)
      qs.append(q)
    # The cache keeps the committed tokens; what lies past them is rewritten next step.
    return (jnp.stack(toks, 1), None if sampling.greedy else jnp.stack(qs, 1),
            cache.replace(lengths=length_B))

  def propose(self, state: PearlState, ctx, stop, sampling, key):
    del stop
    b, g = ctx.history.shape[0], self.gamma
    drafts, drafts_q, cache = self.draft(state.cache, ctx.history, ctx.length,
                                         state.pending, state.num_pending, sampling, key)
    tree = _pending_tree(state.pending, state.num_pending, state.pending_q, sampling)
    state = state.replace(cache=cache, drafts=drafts,
                          drafts_q=state.drafts_q if drafts_q is None else drafts_q)
    return tree, state, jnp.full((b,), g, jnp.int32)

  def commit(self, state: PearlState, ctx, verdict, features) -> PearlState:
    del ctx, features
    hit = (verdict.accepted_drafts == state.num_pending) & (
        verdict.next_token == state.drafts[:, 0])
    n = jnp.where(hit, self.gamma - 1, 0).astype(jnp.int32)
    return state.replace(pending=state.drafts[:, 1:], num_pending=n,
                         pending_q=state.drafts_q[:, 1:])

  def predicted_speedup(self, tau: float, verify_ms: float, draft_ms: float,
                        ar_ms: float) -> tuple[float, float]:
    """(sequential, parallel) speedup over AR for a measured tau: a step costs
    verify + gamma draft forwards on one device, max of the two on two."""
    steps = self.gamma * draft_ms
    return (tau * ar_ms / (verify_ms + steps), tau * ar_ms / max(verify_ms, steps))


@flax.struct.dataclass
class PendingState:
  pending: jax.Array  # int32[B, gamma - 1]
  num_pending: jax.Array  # int32[B]
  pending_q: jax.Array  # float32[B, gamma - 1, V]


@flax.struct.dataclass
class _Verifier:
  """PEARL's target half when the draft runs on other devices (`generate_on_groups`): it
  verifies the pending drafts in its state, which the host sets between steps."""
  gamma: int = flax.struct.field(pytree_node=False)
  vocab_size: int = flax.struct.field(pytree_node=False)
  takes_stop_policy = False
  drafts_vary = True
  features = ()

  @property
  def num_nodes(self) -> int:
    return self.gamma - 1

  def validate(self, target_config) -> None:
    del target_config

  def init(self, ctx, max_len, features) -> PendingState:
    del max_len, features
    b, g = ctx.history.shape[0], self.gamma
    return PendingState(jnp.zeros((b, g - 1), jnp.int32), jnp.zeros((b,), jnp.int32),
                        jnp.zeros((b, g - 1, self.vocab_size), jnp.float32))

  def propose(self, state: PendingState, ctx, stop, sampling, key):
    del stop, key
    tree = _pending_tree(state.pending, state.num_pending, state.pending_q, sampling)
    # The draft group's forwards: gamma a step, beside this one.
    return tree, state, jnp.full(ctx.length.shape, self.gamma, jnp.int32)

  def commit(self, state, ctx, verdict, features):
    del ctx, verdict, features
    return state


def generate_on_groups(target: Model, pearl: Pearl, prompts, *, target_plan, draft_plan,
                       max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                       eos="default") -> "decode.Output":
  """PEARL with the target and the draft on disjoint device groups: `target_plan`'s mesh
  holds the target, its KV cache and the loop's state, `draft_plan`'s mesh the draft and
  its cache. Each step the host launches the target's verification of the pending drafts
  and the draft's next gamma tokens, two programs that read the same inputs and run on
  their own devices at the same time (JAX dispatches both before waiting on either); then
  a small program on the target's devices keeps the new drafts as pending when the step
  confirmed the first of them. Only token ids (and draft distributions when sampling)
  cross between the groups. Greedy, the same outputs as `generate(..., drafter=pearl)`;
  sampled, the same distribution (the draft half draws with its own key). The batch is
  padded to the target mesh's batch split like `generate`'s."""
  from specjax import decode  # pylint: disable=g-import-not-at-top
  if not decode._is_int(max_new_tokens) or max_new_tokens < 1:  # pylint: disable=protected-access
    raise ValueError(f"max_new_tokens must be >= 1 and an integer; got {max_new_tokens!r}.")
  sampling, rule, stop, eos_ids = decode.setup(target, pearl, None, None, temperature,
                                               eos=eos)
  tokens = decode.encode_prompts(target, prompts)
  rows = len(tokens)
  tokens = tokens + [tokens[0]] * (-rows % target_plan.batch_size_multiple)
  g, lens = pearl.gamma, np.asarray([len(t) for t in tokens], np.int32)
  overflow = decode.context_overflow(int(lens.max()), max_new_tokens, g - 1, target.config)
  if overflow:
    raise ValueError(f"Prompt too long: {overflow}.")
  max_len = decode.bucketed_cache_size(int(lens.max()), max_new_tokens, g - 1)
  history = np.zeros((len(tokens), max_len), np.int32)
  for i, t in enumerate(tokens):
    history[i, :len(t)] = t
  verifier = _Verifier(g, pearl.config.vocab_size)
  on_t = lambda x: jax.device_put(x, target_plan.replicated())
  on_d = lambda x: jax.device_put(x, draft_plan.replicated())
  params_t = decode._place_tree(target_plan, target.params)  # pylint: disable=protected-access
  # A truncated draft shares the target's tree: only its own layers go to the draft group.
  layers = pearl.config.num_layers
  own = {k: v for k, v in pearl.params.items()
         if not (k.startswith("layers_") and int(k.split("_")[1]) >= layers)}
  params_d = decode._place_tree(draft_plan, own)  # pylint: disable=protected-access
  key = jax.random.key(seed)
  cfg = target.config

  start = jax.jit(lambda p, h, n: decode.start(
      cfg, p, verifier, stop, h, n, jnp.full(n.shape, max_new_tokens, jnp.int32), key,
      sampling=sampling, max_new_tokens=max_new_tokens, plan=target_plan))
  step = jax.jit(lambda p, st: decode.step(cfg, p, verifier, stop, st, key, sampling=sampling,
                                           rule=rule, eos=eos_ids, plan=target_plan))

  @jax.jit
  def draft_init(p, h, n):
    cache = KVCache.for_config(pearl.config, h.shape[0], max_len + 3 * g, param_dtype(p))
    return prefill(pearl.config, p, cache, h, n - 1)[0]

  @jax.jit
  def draft(p, cache, h, n, pending, num_pending, step_count):
    return pearl.replace(params=p).draft(cache, h, n, pending, num_pending, sampling,
                                         jax.random.fold_in(jax.random.key(seed + 1),
                                                            step_count))

  @jax.jit
  def merge(old, new, drafts, drafts_q):
    """The next pending drafts: the new ones past the first, when every pending draft was
    accepted and the next token is the first new draft (PEARL's post-verify)."""
    rows = jnp.arange(drafts.shape[0])
    hit = ((new.length - old.length - 1 == old.drafter.num_pending)
           & (new.history[rows, new.length - 1] == drafts[:, 0]) & ~new.done)
    q = old.drafter.pending_q if drafts_q is None else drafts_q[:, 1:]
    return new.replace(drafter=PendingState(drafts[:, 1:], jnp.where(hit, g - 1, 0)
                                            .astype(jnp.int32), q))

  st = start(params_t, on_t(history), on_t(lens))
  cache_d = draft_init(params_d, on_d(history), on_d(lens))
  while not bool(st.done.all()) and int(st.step) < max_new_tokens:
    inputs = (st.history, st.length, st.drafter.pending, st.drafter.num_pending, st.step)
    drafts, drafts_q, cache_d = draft(params_d, cache_d, *map(on_d, inputs))  # group D
    new = step(params_t, st)  # group T, at the same time
    st = merge(st, new, on_t(drafts), None if drafts_q is None else on_t(drafts_q))
  out = decode.finish(verifier, st, on_t(lens), max_new_tokens)
  return jax.tree.map(lambda x: x[:rows], out)


@registry.DRAFTERS.register("pearl", takes_stop_policy=False)
def _build(target: Model, *, gamma: int = 4, layers: int | None = None,
           checkpoint: str | None = None) -> Pearl:
  """PEARL with the target's first `layers` layers or the model at `checkpoint` as the
  draft, `gamma` tokens drafted a step."""
  draft = models.draft_lm(target, "pearl", layers, checkpoint)
  return Pearl(draft.params, draft.config, gamma)
