"""SpecPV (Tan et al. 2025): speculative decoding with partial verification. LOSSY.

At long context the target's verification forward is bound by reading its KV cache.
SpecPV drafts with an EAGLE-3 head and verifies most steps against a *partial* cache:
attention sinks, retrieved blocks, a local window and a buffer of the tokens committed
since the last full verification. Every `period` steps (the first step included) it
verifies against the full cache instead, and that step rewrites the buffered tokens' keys/values (which partial
verifications computed from a partial context) from the full context. Tokens accepted by
a partial verification are checked against an approximation of the target, so the output
can differ from AR decoding: the sweep reports its agreement with AR beside its speed.

A step here (`target_forward`, the loop's hook for a drafter that runs the target):

  partial   gather sinks + retrieved blocks + (window + buffer) recent slots of the
            target's cache into a compact cache (`models.partial_cache`), run the tree
            forward over it; its new keys/values are written into the full cache.
  full      one forward over [the last `buffer` committed tokens, root, tree] against the
            full cache: the buffered tokens are recomputed (causally, over everything
            before them), the tree sees them and the rest; both sets of keys/values are
            written back. Then retrieval re-picks its blocks.

Retrieval (Quest-style block bounds, `partial_cache.block_bounds`) scores the cache's
blocks of `block` keys at layer `score_layer` with a query proxy: that layer's query of
the last token the full verification accepted (its input there is a target feature the
loop already returns), at the next root's position. The blocks are re-picked at every
full verification (the first step is one).

Departures from the paper: one block selection serves every layer and head (the bound is
summed over heads; SpecPV and Quest select per layer from the current query), made from
the query proxy at full verifications only; and the full step re-forwards the buffered
tokens inside the verification forward rather than refreshing the cache separately.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from specjax import registry
from specjax.drafters import io
from specjax.models import cache as cache_lib
from specjax.models import partial_cache, projections
from specjax.models.config import ModelConfig
from specjax.models.model import FINAL, Forward, Model, forward


@flax.struct.dataclass
class SpecPVState:
  inner: Any  # the draft head's state
  since_full: jax.Array  # int32: steps since the last full verification
  full: jax.Array  # bool: this step verified fully (set by target_forward)
  recent: jax.Array  # int32[B, buffer]: the tokens a full step re-forwards
  blocks: jax.Array  # int32[B, K]: the retrieved blocks
  blocks_valid: jax.Array  # bool[B, K]


@flax.struct.dataclass
class SpecPV:
  inner: Any  # the draft head's drafter (EAGLE-3)
  params: Any  # the target's
  config: ModelConfig = flax.struct.field(pytree_node=False)
  score_layer: int = flax.struct.field(pytree_node=False, default=0)
  sinks: int = flax.struct.field(pytree_node=False, default=16)
  block: int = flax.struct.field(pytree_node=False, default=32)
  retrieve: int = flax.struct.field(pytree_node=False, default=8)  # blocks kept
  window: int = flax.struct.field(pytree_node=False, default=256)
  period: int = flax.struct.field(pytree_node=False, default=4)
  takes_stop_policy = False
  lossy = True

  @property
  def num_nodes(self) -> int:
    return self.inner.num_nodes

  @property
  def drafts_vary(self) -> bool:
    return self.inner.drafts_vary

  @property
  def features(self) -> tuple[int, ...]:
    """The head's features, then the retrieval's score layer input if it reads no such."""
    own = tuple(self.inner.features)
    return own + (() if self.score_layer in own else (self.score_layer,))

  @property
  def buffer(self) -> int:
    """Cache entries committed since a full verification, at most: what it recomputes."""
    return (self.period - 1) * (1 + self.num_nodes)

  @property
  def cache_slots(self) -> int:
    """Slots a partial verification attends over, whatever the context."""
    return self.sinks + self.retrieve * self.block + self.window + self.buffer

  def validate(self, target_config: ModelConfig) -> None:
    if target_config.attention_impl != "xla":
      raise ValueError(f"SpecPV's partial verification attends through a slot mask, which "
                       f"the {target_config.attention_impl!r} kernel does not take: use "
                       f"attention_impl='xla'.")
    if target_config != self.config:
      raise ValueError("This SpecPV drafter was made for another target.")
    if target_config.arch != "llama" or target_config.sliding_window is not None:
      raise ValueError("SpecPV gathers a Llama-family target's cache into slots that are not "
                       "positions; other architectures and sliding windows are not supported.")
    if min(self.block, self.window, self.period) < 1 or min(self.sinks, self.retrieve) < 0:
      raise ValueError(f"SpecPV needs block, window, period >= 1 and sinks, retrieve >= 0; "
                       f"got block={self.block}, window={self.window}, period={self.period}, "
                       f"sinks={self.sinks}, retrieve={self.retrieve}.")
    if not 0 <= self.score_layer < target_config.num_layers:
      raise ValueError(f"SpecPV's score_layer={self.score_layer} is not a layer of this "
                       f"{target_config.num_layers}-layer target.")
    self.inner.validate(target_config)

  def _split(self, features):
    n = len(self.inner.features)
    return tuple(features[:n]), features[self.features.index(self.score_layer)]

  # --- Retrieval ---------------------------------------------------------------------------

  def _pick_blocks(self, ctx, x_BxH, position_B):
    """The `retrieve` blocks of highest bound for a query from layer input `x`."""
    q_BxHxD = projections.queries(self.config, self.params, self.score_layer, x_BxH[:, None],
                                  position_B[:, None])[:, 0]
    c_B = ctx.cache.lengths
    bound_BxN = partial_cache.block_bounds(q_BxHxD, ctx.cache.k[self.score_layer], c_B,
                                           self.block)
    start_N = jnp.arange(bound_BxN.shape[1]) * self.block
    eligible_BxN = ((start_N + self.block > self.sinks)[None] &
                    (start_N[None] < (c_B - self.window - self.buffer)[:, None]))
    return partial_cache.select_blocks(bound_BxN, eligible_BxN, self.retrieve)

  def init(self, ctx, max_len, features):
    inner_feats, _ = self._split(features)
    b = ctx.history.shape[0]
    # The first step verifies fully (steps 0, period, 2 period, ...) and picks the blocks.
    return SpecPVState(self.inner.init(ctx, max_len, inner_feats), jnp.int32(self.period - 1),
                       jnp.bool_(False), jnp.zeros((b, self.buffer), jnp.int32),
                       jnp.zeros((b, self.retrieve), jnp.int32),
                       jnp.zeros((b, self.retrieve), bool))

  # --- A step ------------------------------------------------------------------------------

  def propose(self, state: SpecPVState, ctx, stop, sampling, key):
    tree, inner, calls = self.inner.propose(state.inner, ctx, stop, sampling, key)
    start_B = jnp.maximum(ctx.length - 1 - self.buffer, 0)
    src_BxR = jnp.minimum(start_B[:, None] + jnp.arange(self.buffer), ctx.history.shape[1] - 1)
    recent = jnp.take_along_axis(ctx.history, src_BxR, 1)
    return tree, state.replace(inner=inner, recent=recent), calls

  def partial_slots(self, state: SpecPVState, lengths_B):
    """(int32[B, cache_slots], bool valid): what a partial verification attends over:
    sinks, the retrieved blocks, and the last window + buffer committed slots."""
    recent = self.window + self.buffer
    src_w, valid_w = partial_cache.sinks_and_window(lengths_B, self.sinks, recent)
    src_b, valid_b = partial_cache.block_slots(state.blocks, state.blocks_valid, self.block,
                                               self.sinks, lengths_B - recent)
    return jnp.concatenate([src_w, src_b], 1), jnp.concatenate([valid_w, valid_b], 1)

  def target_forward(self, state: SpecPVState, cfg, params, tokens_BxT, positions_BxT,
                     visible_BxTxT, cache, feats) -> tuple[Forward, SpecPVState]:
    b, t = tokens_BxT.shape
    r = self.buffer
    c_B = cache.lengths
    start_B = jnp.maximum(c_B - r, 0)
    full = state.since_full >= self.period - 1

    def full_step(_):
      pos_BxR = start_B[:, None] + jnp.arange(r)
      seen_BxR = pos_BxR < c_B[:, None]  # committed (rows with a shorter context: fewer)
      vis = jnp.zeros((b, r + t, r + t), bool)
      vis = vis.at[:, :r, :r].set(jnp.tril(jnp.ones((r, r), bool)))
      vis = vis.at[:, r:, :r].set(jnp.broadcast_to(seen_BxR[:, None, :], (b, t, r)))
      vis = vis.at[:, r:, r:].set(visible_BxTxT)
      with cache_lib.deferred_writes():
        out = forward(cfg, params, jnp.concatenate([state.recent, tokens_BxT], 1),
                      jnp.concatenate([pos_BxR, positions_BxT], 1), vis,
                      cache.replace(lengths=start_B), feats)
      return (out.logits[:, r:], out.hidden[:, r:], tuple(f[:, r:] for f in out.features),
              tuple(k[:, :, :r] for k in out.cache.k), tuple(v[:, :, :r] for v in out.cache.v),
              tuple(k[:, :, r:] for k in out.cache.k), tuple(v[:, :, r:] for v in out.cache.v))

    def partial_step(_):
      src_BxJ, valid_BxJ = self.partial_slots(state, c_B)
      compact = partial_cache.gather(cache, src_BxJ)
      with cache_lib.deferred_writes():
        out = forward(cfg, params, tokens_BxT, positions_BxT, visible_BxTxT, compact, feats,
                      prefix_BxTxS=jnp.broadcast_to(valid_BxJ[:, None, :],
                                                    (b, t, valid_BxJ.shape[1])))
      nothing = tuple(jnp.zeros(k.shape[:2] + (r,) + k.shape[3:], k.dtype)
                      for k in out.cache.k)  # dropped below
      return (out.logits, out.hidden, out.features, nothing, nothing, out.cache.k, out.cache.v)

    logits, hidden, features, k_re, v_re, k_new, v_new = jax.lax.cond(
        full, full_step, partial_step, None)
    # The recomputed entries of a full step; past the cache (dropped) after a partial one.
    re_start_B = jnp.where(full, start_B, cache.max_len)
    write = lambda c, re, new: cache_lib.write(cache_lib.write(c, re, re_start_B), new, c_B)
    cache = cache.replace(k=tuple(map(write, cache.k, k_re, k_new)),
                          v=tuple(map(write, cache.v, v_re, v_new)))
    return Forward(logits, hidden, features, cache), state.replace(full=full)

  def commit(self, state: SpecPVState, ctx, verdict, features) -> SpecPVState:
    inner_feats, score_BxNxH = self._split(features)
    inner = self.inner.commit(state.inner, ctx, verdict, inner_feats)
    a_B = verdict.accepted_drafts
    b = a_B.shape[0]
    last_B = jnp.where(a_B > 0, 1 + verdict.path[jnp.arange(b), jnp.maximum(a_B - 1, 0)], 0)

    def repick(_):
      return self._pick_blocks(ctx, score_BxNxH[jnp.arange(b), last_B], ctx.length + a_B)

    blocks, valid = jax.lax.cond(state.full, repick,
                                 lambda _: (state.blocks, state.blocks_valid), None)
    return state.replace(inner=inner, blocks=blocks, blocks_valid=valid,
                         since_full=jnp.where(state.full, 0, state.since_full + 1))


def create(target: Model, inner, *, sinks: int = 16, block: int = 32, retrieve: int = 8,
           window: int = 256, period: int = 4, score_layer: int | None = None) -> SpecPV:
  """SpecPV over `target` with draft `inner`. `score_layer` (default: the deepest layer
  input the head reads, or the last layer) is where retrieval scores blocks."""
  if score_layer is None:
    own = [f for f in inner.features if f != FINAL]
    score_layer = max(own) if own else target.config.num_layers - 1
  pv = SpecPV(inner, target.params, target.config, int(score_layer), int(sinks), int(block),
              int(retrieve), int(window), int(period))
  pv.validate(target.config)
  return pv


@registry.DRAFTERS.register("specpv", takes_stop_policy=False, lossy=True)
def _build(target: Model, *, checkpoint: str, depth: int | None = None,
           top_k: int | None = None, num_nodes: int | None = None, sinks: int = 16,
           block: int = 32, retrieve: int = 8, window: int = 256, period: int = 4,
           score_layer: int | None = None) -> SpecPV:
  """SpecPV (LOSSY): the EAGLE-3 head at `checkpoint` drafting, verification against
  `sinks` + `retrieve` blocks of `block` + a `window` (+ buffer) of the target's cache,
  and against all of it every `period` steps."""
  inner = io.trained_drafter("eagle3", target, checkpoint, None, depth=depth, top_k=top_k,
                             num_nodes=num_nodes)
  return create(target, inner, sinks=sinks, block=block, retrieve=retrieve, window=window,
                period=period, score_layer=score_layer)
