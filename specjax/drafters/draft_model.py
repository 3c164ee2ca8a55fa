"""Draft model: an independent LM sharing the target's vocabulary, or the target's own
first layers (`DraftModel.truncated`, a training-free self-speculative drafter). It drafts
a chain (`num_draft` tokens) or a static tree (a Medusa-style choice list: top-k branching).

The drafter keeps its own KV cache. Its invariant: the cache holds a prefix of the
committed history. Each draft first "catches up" on the 1 or 2 committed tokens it has not
seen (the last accepted draft token, if every draft was accepted, and the new root), which
gives the root's next-token distribution; then it expands the tree one level per forward:
level d's nodes (all of one depth, padded to the tree's width) go through the draft model
together, written past the committed cache with an ancestor mask, and their children are
their top-ranked tokens (greedy) or i.i.d. samples (sampling). A chain is a tree of width 1.
After verification the accepted path's entries are gathered into contiguous slots and
everything else is cut off.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import registry, stopping
from specjax import sampling as sampling_lib
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import Model, causal, forward, param_dtype, prefill
from specjax.tree import DraftTree, StaticTree, ancestor_mask

_CATCH_UP = 2  # committed tokens the draft may lag behind after a verification


@flax.struct.dataclass
class DraftState:
  cache: KVCache
  levels: jax.Array  # int32[]: tree levels the last propose forwarded (their K/V is cached)


@flax.struct.dataclass
class DraftModel:
  params: Any
  config: ModelConfig = flax.struct.field(pytree_node=False)
  tree: StaticTree = flax.struct.field(pytree_node=False, default=StaticTree.chain(4))
  takes_stop_policy = True
  features = ()

  @classmethod
  def from_model(cls, model: Model, num_draft: int = 4,
                 tree: Sequence[Sequence[int]] | None = None) -> "DraftModel":
    """Drafts with `model`: a chain of `num_draft` tokens, or the tree of choice paths."""
    shape = StaticTree.chain(num_draft) if tree is None else StaticTree.from_choices(tree)
    return cls(model.params, model.config, shape)

  @classmethod
  def truncated(cls, target: Model, num_layers: int, num_draft: int = 4,
                tree: Sequence[Sequence[int]] | None = None) -> "DraftModel":
    """The target's first `num_layers` layers + its final norm and LM head."""
    return cls.from_model(target.truncated(num_layers), num_draft, tree)

  @property
  def num_nodes(self) -> int:
    return self.tree.num_nodes

  def validate(self, target_config: ModelConfig) -> None:
    if self.config.vocab_size != target_config.vocab_size:
      raise ValueError(f"Draft vocab size {self.config.vocab_size} != target vocab size "
                       f"{target_config.vocab_size}: draft and target must share a tokenizer.")
    if self.tree.max_rank >= self.config.vocab_size:
      raise ValueError(f"Tree rank {self.tree.max_rank} exceeds the vocabulary.")

  def init(self, ctx, max_len: int, features) -> DraftState:
    b = ctx.history.shape[0]
    # Room for the tree's padded levels past the committed context.
    cache = KVCache.for_config(self.config, b, max_len + self.tree.depth * self.tree.width,
                               param_dtype(self.params))
    cache, _ = prefill(self.config, self.params, cache, ctx.history, ctx.length - 1)
    return DraftState(cache, jnp.zeros((), jnp.int32))

  def _catch_up(self, cache: KVCache, ctx):
    """Forwards the committed tokens the cache lacks; returns the root's logits/hidden."""
    lag_B = ctx.length - cache.lengths  # 1 or 2 for live sequences
    idx = jnp.minimum(cache.lengths[:, None] + jnp.arange(_CATCH_UP), ctx.history.shape[1] - 1)
    tokens = jnp.take_along_axis(ctx.history, idx, 1)
    positions = cache.lengths[:, None] + jnp.arange(_CATCH_UP)
    out = forward(self.config, self.params, tokens, positions, causal(_CATCH_UP), cache)
    last = jnp.clip(lag_B - 1, 0, _CATCH_UP - 1)[:, None, None]
    pick = lambda x: jnp.take_along_axis(x, last, 1)  # [B, 1, ...]
    return pick(out.logits), pick(out.hidden), out.cache.advance(jnp.maximum(lag_B, 0))

  def propose(self, state: DraftState, ctx, stop, sampling, key):
    tree = self.tree
    depth, w = tree.depth, tree.width
    b, v = ctx.history.shape[0], self.config.vocab_size
    parent_DxW, rank_DxW, real_DxW = tree.padded()
    # Ancestor-or-self mask of the padded level layout (padding slots see only themselves).
    level_start = (np.arange(depth)[:, None] - 1) * w
    parents_N = np.where(level_start < 0, -1, level_start + parent_DxW).reshape(-1)
    anc_NxN = ancestor_mask(jnp.asarray(parents_N))
    parent_DxW, rank_DxW, real_DxW = (jnp.asarray(a) for a in (parent_DxW, rank_DxW, real_DxW))
    logits_Bx1xV, hidden_Bx1xH, cache = self._catch_up(state.cache, ctx)
    base_B = cache.lengths  # the root is committed; the tree goes at base + padded slot
    pos_B = ctx.length - 1  # the root's position

    def children(d, logits_BxKxV, hidden_BxKxH, expand_BxK, pstate, key):
      """Level d's tokens and validity from the K parents' logits (K = 1 at the root)."""
      stop_BxK, pstate = stop.stop(pstate, d, jax.nn.softmax(logits_BxKxV, -1), hidden_BxKxH)
      expand_BxK = expand_BxK & ~stop_BxK
      par_W = parent_DxW[d]
      if sampling.greedy:  # top-ranked tokens of the raw logits; no distribution kept
        q_BxKxV = None
        top_BxKxR = jax.lax.top_k(logits_BxKxV, tree.max_rank + 1)[1]
        tok_BxW = top_BxKxR[:, par_W, rank_DxW[d]]
      else:  # i.i.d. samples from the warped distribution (SpecInfer's rule verifies them)
        q_BxKxV = sampling_lib.probs(logits_BxKxV, sampling)
        tok_BxW = jax.random.categorical(key, jnp.log(q_BxKxV[:, par_W]), axis=-1)
      valid_BxW = expand_BxK[:, par_W] & real_DxW[d]
      pstate = stopping.gather(pstate, jnp.broadcast_to(par_W, (b, w)))
      return tok_BxW.astype(jnp.int32), valid_BxW, q_BxKxV, pstate

    key, sub = jax.random.split(key)
    tok, valid, q_root, pstate = children(0, logits_Bx1xV, hidden_Bx1xH, jnp.ones((b, 1), bool),
                                          stop.init(b), sub)
    tokens_BxDxW = jnp.zeros((b, depth, w), jnp.int32).at[:, 0].set(tok)
    valid_BxDxW = jnp.zeros((b, depth, w), bool).at[:, 0].set(valid)
    # probs[:, 0] = the root's distribution, probs[:, 1 + slot] = that of padded node slot.
    probs = None if sampling.greedy else (
        jnp.zeros((b, 1 + (depth - 1) * w, v), jnp.float32).at[:, 0].set(q_root[:, 0]))
    calls = jnp.ones((b,), jnp.int32)

    def cond(loop):
      d, valid_BxDxW = loop[0], loop[3]
      return (d < depth) & valid_BxDxW[:, d - 1].any()

    def body(loop):
      d, cache, tokens_BxDxW, valid_BxDxW, probs, calls, pstate, key = loop
      key, sub = jax.random.split(key)
      # Forward level d - 1 at slots base + (d-1)*w: it sees the context, its ancestors in
      # the levels above (written, not committed) and itself.
      slots = (d - 1) * w + jnp.arange(w)
      above_WxN = anc_NxN[slots] & (jnp.arange(depth * w) < (d - 1) * w)
      prefix = cache.prefix_mask(w, jnp.broadcast_to(above_WxN, (b, w, depth * w)))
      positions_BxW = jnp.broadcast_to(pos_B[:, None] + d, (b, w))
      out = forward(self.config, self.params, tokens_BxDxW[:, d - 1], positions_BxW,
                    jnp.eye(w, dtype=bool)[None], cache.replace(lengths=base_B + (d - 1) * w),
                    prefix_BxTxS=prefix)
      cache = out.cache.replace(lengths=base_B)
      live_BxW = valid_BxDxW[:, d - 1]
      calls = calls + live_BxW.any(-1)
      tok, valid, q, pstate = children(d, out.logits, out.hidden, live_BxW, pstate, sub)
      if probs is not None:
        probs = jax.lax.dynamic_update_slice_in_dim(probs, q, 1 + (d - 1) * w, axis=1)
      return (d + 1, cache, tokens_BxDxW.at[:, d].set(tok), valid_BxDxW.at[:, d].set(valid),
              probs, calls, pstate, key)

    loop = (1, cache, tokens_BxDxW, valid_BxDxW, probs, calls, pstate, key)
    d, cache, tokens_BxDxW, valid_BxDxW, probs, calls, _, _ = jax.lax.while_loop(cond, body, loop)
    # The verifier's view: real nodes only, parents first.
    idx = jnp.asarray(tree.padded_index)
    parents = jnp.asarray(tree.parents, jnp.int32)
    dist = jnp.where(parents < 0, 0, 1 + idx[jnp.maximum(parents, 0)])
    per_row = lambda x: jnp.broadcast_to(x, (b, tree.num_nodes))
    draft = DraftTree(tokens_BxDxW.reshape(b, -1)[:, idx], per_row(parents),
                      valid_BxDxW.reshape(b, -1)[:, idx], probs, per_row(dist),
                      sampled=not sampling.greedy)
    return draft, DraftState(cache, jnp.asarray(d - 1, jnp.int32)), calls

  def commit(self, state: DraftState, ctx, verdict, features) -> DraftState:
    """Keeps the accepted nodes whose K/V the drafter computed (levels it forwarded)."""
    slots = jnp.asarray(self.tree.padded_index)[verdict.path]  # increasing along the path
    kept_B = jnp.minimum(verdict.accepted_drafts, state.levels)
    cache = state.cache.commit(slots, kept_B)
    return DraftState(cache, state.levels)


@registry.DRAFTERS.register("self_draft", takes_stop_policy=True)
def _self_draft(target: Model, *, layers: int, num_draft: int = 4,
                tree: Sequence[Sequence[int]] | None = None) -> DraftModel:
  """The target's first `layers` layers (training-free), as a chain or a top-k tree."""
  return DraftModel.truncated(target, layers, num_draft, tree)


@registry.DRAFTERS.register("draft_model", takes_stop_policy=True)
def _draft_model(target: Model, *, checkpoint: str, num_draft: int = 4,
                 tree: Sequence[Sequence[int]] | None = None) -> DraftModel:
  """An independent model sharing the vocabulary (a preset, HF folder or .gguf file)."""
  from specjax import models  # pylint: disable=g-import-not-at-top
  model = models.load(checkpoint, target.dtype)
  return DraftModel.from_model(model, num_draft, tree)
