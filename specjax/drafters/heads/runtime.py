"""What every feature-level head shares: the head protocol, its layer runtime and the
EAGLE drafter that decodes any head following the protocol.

A feature-level head reads the target's hidden states (`features`) and drafts from them.
Pair t of a sequence is (f_t, x_{t+1}): the head's per-position feature at t and the token
after it. While decoding, the head keeps its own one-layer KV cache over the pairs of the
committed context, built from the target's *real* features: the prompt's at `init`, then
those the verification forward returns for the root and the accepted tokens (`commit`
keeps them *pending*; the next `propose` runs the layer over them first: `catch_up`).
Entries made from the head's own predicted features while drafting are dropped after
each verification.

  FeatureHead                 the protocol `FeatureDrafter` decodes (EAGLE-1, EAGLE-3)
  FeatureBlock                a Llama decoder block over features (Hydra++, Falcon)
  run_layer / prefill_layer   one head layer on T positions with its cache / the prompt
  pending_init / catch_up /   the pending pairs: the root's at init, the layer over them,
    accepted_features           and the next ones from a verdict
  unroll / chain_accept       training-time unrolled drafting and offline acceptance
  FeatureDrafter / drafter    EAGLE's drafter: a chain, a static tree or EAGLE-2's
                              dynamic tree from any `FeatureHead`
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from specjax.drafters import dynamic_tree, static_tree
from specjax.drafters.base import TargetBatch
from specjax.models import llama
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import causal, param_dtype
from specjax.tree import StaticTree


class FeatureHead(Protocol):
  """A head `FeatureDrafter` decodes (besides `base.TrainableHead`):

    features                      the target features it reads
    layer_config                  the shape of its one decoder layer (KV heads, head dim)
    fuse(params, features)        [B, T, H]: the per-position feature from the target's
    net(params, shared, f, next, positions, visible, cache=None, prefix=None)
                                  (g [B, T, H], cache): the layer on T pairs
    logits(params, shared, g)     [B, T, V]: draft logits over the target's vocabulary
    validate(target_config)       clear errors before anything compiles
  """

  features: tuple[int, ...]
  layer_config: ModelConfig

  def fuse(self, params, features: tuple) -> jax.Array:
    ...

  def net(self, params, shared, *args) -> tuple[jax.Array, KVCache | None]:
    ...

  def logits(self, params, shared, g_BxTxH) -> jax.Array:
    ...

  def validate(self, target_config: ModelConfig) -> None:
    ...


class FeatureBlock(nn.Module):
  """A Llama decoder block over feature vectors, with RoPE at the given positions (the
  layer of Hydra++ and Falcon; its weights live under "block")."""

  cfg: ModelConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, f_BxTxH, positions_BxT, visible_BxTxT, kv=None, start_B=None,
               prefix_BxTxS=None):
    cos, sin = llama.rope_cos_sin(self.cfg, positions_BxT, self.dtype)
    dense = self.cfg.replace(num_experts=0, moe_layers=())  # a head's layer has one MLP
    return llama.Block(dense, self.dtype, 0, name="block")(f_BxTxH, cos, sin, visible_BxTxT,
                                                           prefix_BxTxS, kv, start_B)


def committed_pairs(ctx) -> jax.Array:
  """int32[B]: pairs whose features are known at `init`: 0 .. P-3 of a P-token prompt
  (pair P-2, the root's, is the first pending one; the root's own feature comes with the
  first verification)."""
  return jnp.maximum(ctx.length - 2, 0)


def pending_init(f_BxLxH, ctx, c: int) -> jax.Array:
  """[B, c, H]: the pending-pairs buffer at `init`: the root pair's feature first."""
  last = jnp.take_along_axis(f_BxLxH, committed_pairs(ctx)[:, None, None], 1)
  b, _, h = f_BxLxH.shape
  return jnp.zeros((b, c, h), f_BxLxH.dtype).at[:, :1].set(last)


def run_layer(module: nn.Module, params, inputs: tuple, positions_BxT, visible_BxTxT,
              cache: KVCache | None = None, prefix_BxTxS=None):
  """A head's decoder layer `module` (with its `cfg`) on T positions (`inputs`, each
  [B, T, H]), within its sliding window if it has one; with a 1-layer `cache` its K/V are
  written at `cache.lengths` as `models.forward` does.
  Returns (output features [B, T, H], cache)."""
  kv = None if cache is None else (cache.k[0], cache.v[0])
  start = None if cache is None else cache.lengths
  if cache is not None and prefix_BxTxS is None:
    prefix_BxTxS = cache.prefix_mask(positions_BxT.shape[1])
  # A layer with a sliding window sees only keys within it (slot index as position: exact
  # for committed pairs; a drafting level's own entries sit a few slots later).
  visible_BxTxT, prefix_BxTxS = llama.in_window(module.cfg, positions_BxT, visible_BxTxT,
                                                prefix_BxTxS, cache)
  g, kv = module.apply({"params": params}, *inputs, positions_BxT, visible_BxTxT, kv, start,
                       prefix_BxTxS)
  return g, None if cache is None else cache.replace(k=(kv[0],), v=(kv[1],))


def prefill_layer(run, cache: KVCache, feat_BxLxH, next_BxL, n_B, max_len: int) -> KVCache:
  """Writes the first n[b] positions of a head's layer into its empty cache, 64 a forward
  (one compiled program for every prompt length); `run(feat, next, positions, visible,
  cache)` is the layer. Returns the cache with lengths = n."""
  b = feat_BxLxH.shape[0]
  chunk = min(64, max_len)
  width = -(-max_len // chunk) * chunk
  nxt = jnp.pad(next_BxL, ((0, 0), (0, width - next_BxL.shape[1])))
  f = jnp.pad(feat_BxLxH, ((0, 0), (0, width - feat_BxLxH.shape[1]), (0, 0)))

  def body(i, cache):
    s = i * chunk
    positions = jnp.broadcast_to(s + jnp.arange(chunk), (b, chunk))
    _, cache = run(jax.lax.dynamic_slice_in_dim(f, s, chunk, 1),
                   jax.lax.dynamic_slice_in_dim(nxt, s, chunk, 1), positions, causal(chunk),
                   cache.replace(lengths=jnp.full((b,), s, jnp.int32)))
    return cache

  return jax.lax.fori_loop(0, -(-jnp.max(n_B) // chunk), body, cache).replace(lengths=n_B)


def catch_up(run, cache: KVCache, pending_BxCxH, ctx):
  """Runs a head's layer over the pending positions [cache.lengths, ctx.length - 1) (the
  last step's root and accepted tokens, whose real target features `commit` kept) and
  advances the cache past them. Returns (the output at the newest one [B, 1, H], cache,
  lag [B]: how many were pending, 0 = none known yet)."""
  c = pending_BxCxH.shape[1]
  m_B = cache.lengths
  lag_B = ctx.length - 1 - m_B
  idx = jnp.minimum(m_B[:, None] + 1 + jnp.arange(c), ctx.history.shape[1] - 1)
  g, cache = run(pending_BxCxH, jnp.take_along_axis(ctx.history, idx, 1),
                 m_B[:, None] + jnp.arange(c), causal(c), cache)
  g_last = jnp.take_along_axis(g, jnp.clip(lag_B - 1, 0, c - 1)[:, None, None], 1)
  return g_last, cache.advance(jnp.maximum(lag_B, 0)), lag_B


def accepted_features(f_BxNxH, verdict, c: int):
  """[B, c, H]: the features of the root and the accepted path (the next pending ones)."""
  path = verdict.path[:, :c - 1]
  path = jnp.pad(path, ((0, 0), (0, c - 1 - path.shape[1])))  # trees shallower than c - 1
  idx = jnp.concatenate([jnp.zeros((f_BxNxH.shape[0], 1), jnp.int32), 1 + path], 1)
  return jnp.take_along_axis(f_BxNxH, idx[..., None], 1)



def unroll(head, params, shared, feat_BxNxH, tokens_BxT, depth: int):
  """The head's predicted features [B, N, H] for draft steps 1..depth from every pair at
  once (the training-time test of EAGLE-3; EAGLE-1's held-out acceptance). Pair t holds
  (feat_t, x_{t+1}), N = T - 1. Step j of the chain from pair t is pair t + j - 1: it reads
  token x_{t+j} and the head's own feature from step j - 1, and sees the real pairs <= t
  and its own chain's earlier steps, as the head's cache does while decoding."""
  b, t = tokens_BxT.shape
  n = t - 1
  layer = head.layer_config
  # The empty cache and the masks derive from traced values: as compile-time constants,
  # XLA constant-folds [B, heads, n, depth * n] arrays through the attention (and its
  # gradient), for minutes per batch width.
  zero = feat_BxNxH[0, 0, 0] * 0  # not foldable (x * 0 is not 0 for floats)
  izero = zero.astype(jnp.int32)
  cache = KVCache.create(1, b, depth * n, layer.num_kv_heads, layer.head_dim, feat_BxNxH.dtype)
  cache = cache.replace(k=tuple(k + zero for k in cache.k), v=tuple(v + zero for v in cache.v),
                        lengths=cache.lengths + izero)
  rows = jnp.arange(n) + izero
  slot = jnp.arange(depth * n) + izero
  real = (slot[None, :] < n) & (slot[None, :] <= rows[:, None])
  feat, out = feat_BxNxH, []
  for j in range(1, depth + 1):
    src = jnp.minimum(rows + j, t - 1)
    positions = jnp.broadcast_to(rows + j - 1, (b, n))
    if j == 1:
      g, cache = head.net(params, shared, feat, tokens_BxT[:, 1:], positions, causal(n), cache)
    else:
      own = (slot[None, :] % n == rows[:, None]) & (slot[None, :] >= n) & (
          slot[None, :] < (j - 1) * n)
      prefix = jnp.broadcast_to(real | own, (b, n, depth * n))
      g, cache = head.net(params, shared, feat, tokens_BxT[:, src], positions,
                          jnp.eye(n, dtype=bool)[None],
                          cache.replace(lengths=jnp.full((b,), (j - 1) * n, jnp.int32)), prefix)
    out.append(g)
    feat = g
  return out


def chain_accept(head, params, batch: TargetBatch, feat_BxNxH, depth: int):
  """`TrainableHead.accept` for feature-level heads: draft k of the chain from position t
  matches the target's argmax (and is a response token)."""
  b, t = batch.tokens.shape
  rows = jnp.arange(t - 1)
  target_top = batch.logits.argmax(-1)
  matches = []
  for j, g in enumerate(unroll(head, params, batch.shared, feat_BxNxH, batch.tokens, depth), 1):
    src = jnp.minimum(rows + j, t - 1)
    ok = (head.logits(params, batch.shared, g).argmax(-1) == target_top[:, src])
    ok &= (rows + j + 1 < t) & (jnp.take(batch.mask, jnp.minimum(rows + j + 1, t - 1), 1) > 0)
    matches.append(ok)
  acc = jnp.pad(jnp.stack(matches, -1), ((0, 0), (0, 1), (0, 0)))
  return acc, jnp.pad(batch.mask[:, 2:], ((0, 0), (0, 2)))


@flax.struct.dataclass
class FeatureState:
  cache: KVCache  # the head's cache over committed pairs (real features only)
  pending_BxCxH: jax.Array  # features of the pairs [cache.lengths, ctx.length - 1)


@flax.struct.dataclass
class FeatureDrafter:
  """EAGLE's drafter for any `FeatureHead` (EAGLE-1's and EAGLE-3's): the head says how
  target features fuse into the per-position feature, how its layer runs and how its
  output becomes logits. A step catches the head's cache up on the pending pairs, which
  gives the root's distribution, then expands a static tree (`static_tree.draft`, a
  chain when top_k = 1) or EAGLE-2's dynamic tree (`dynamic_tree.draft`)."""

  head: FeatureHead  # a pytree: EAGLE-3's vocabulary map travels with it
  params: Any
  shared: Any
  tree: StaticTree = flax.struct.field(pytree_node=False, default=StaticTree.chain(4))
  # (top_k, depth, num_nodes) of an EAGLE-2 dynamic tree; None = draft the static `tree`.
  dynamic: tuple[int, int, int] | None = flax.struct.field(pytree_node=False, default=None)
  # The longest path one step may accept: its own tree's depth (None), or a hybrid tree's
  # (`drafters.hybrid`), which may hold deeper paths from other drafters.
  accept_depth: int | None = flax.struct.field(pytree_node=False, default=None)
  takes_stop_policy = True
  drafts_vary = False
  merges = True  # commit reads the verdict's path and features only (any verified tree)

  @property
  def features(self) -> tuple[int, ...]:
    return tuple(self.head.features)

  @property
  def num_nodes(self) -> int:
    return self.dynamic[2] if self.dynamic else self.tree.num_nodes

  def _draft_room(self) -> int:
    """Cache slots the draft levels take past the committed context."""
    if self.dynamic:
      return (self.dynamic[1] - 1) * self.dynamic[0]
    return self.tree.depth * self.tree.width

  def _net(self, *args):
    return self.head.net(self.params, self.shared, *args)

  def _logits(self, g_BxTxH):
    return self.head.logits(self.params, self.shared, g_BxTxH)

  def validate(self, target_config: ModelConfig) -> None:
    self.head.validate(target_config)

  def _pending(self) -> int:
    depth = self.dynamic[1] if self.dynamic else self.tree.depth
    return max(depth, self.accept_depth or 0) + 1  # the root + every draft accepted

  def init(self, ctx, max_len: int, features) -> FeatureState:
    f = self.head.fuse(self.params, features)
    b = ctx.history.shape[0]
    layer = self.head.layer_config
    cache = KVCache.create(1, b, max_len + self._pending() + self._draft_room(),
                           layer.num_kv_heads, layer.head_dim, param_dtype(self.params))
    cache = prefill_layer(self._net, cache, f, jnp.pad(ctx.history[:, 1:], ((0, 0), (0, 1))),
                          committed_pairs(ctx), max_len)
    return FeatureState(cache, pending_init(f, ctx, self._pending()))

  def propose(self, state: FeatureState, ctx, stop, sampling, key):
    g_root, cache, lag_B = catch_up(self._net, state.cache, state.pending_BxCxH, ctx)

    def step(tokens_BxW, parent_g, positions_BxW, cache, prefix):
      w = tokens_BxW.shape[1]
      g, cache = self._net(parent_g, tokens_BxW, positions_BxW - 1,
                           jnp.eye(w, dtype=bool)[None], cache, prefix)
      return self._logits(g), g, cache

    logits_root = self._logits(g_root)
    if self.dynamic:
      k, depth, n = self.dynamic
      tree, cache, calls = dynamic_tree.draft(step, logits_root, g_root, cache, ctx.length - 1,
                                              top_k=k, depth=depth, num_nodes=n, stop=stop,
                                              valid_B=lag_B > 0, sampling=sampling, key=key)
    else:
      tree, cache, _, calls = static_tree.draft(self.tree, step, logits_root, g_root, cache,
                                                ctx.length - 1, stop, sampling, key,
                                                valid_B=lag_B > 0)
    return tree, FeatureState(cache, state.pending_BxCxH), calls

  def commit(self, state: FeatureState, ctx, verdict, features) -> FeatureState:
    """The new pending pairs: the root's and the accepted nodes' real target features."""
    f = self.head.fuse(self.params, features)
    return FeatureState(state.cache, accepted_features(f, verdict, self._pending()))


def drafter(head: FeatureHead, params, shared, *, depth: int = 4, top_k: int = 1,
            tree: Sequence[Sequence[int]] | None = None,
            num_nodes: int | None = None) -> FeatureDrafter:
  """An EAGLE drafter with a feature-level head's weights (EAGLE-1 or EAGLE-3): a chain of
  `depth` tokens (top_k = 1), the full top_k-ary tree of `depth` levels, the tree of
  choice paths `tree`, or, with `num_nodes`, EAGLE-2's dynamic tree (the best num_nodes
  of top_k-wide expansions `depth` levels deep)."""
  if num_nodes is not None:
    if not 1 <= num_nodes <= dynamic_tree.num_candidates(top_k, depth):
      raise ValueError(f"num_nodes={num_nodes} must be in [1, "
                       f"{dynamic_tree.num_candidates(top_k, depth)}] for top_k={top_k}, "
                       f"depth={depth}.")
    return FeatureDrafter(head, params, shared, StaticTree.chain(depth),
                          (top_k, depth, num_nodes))
  return FeatureDrafter(head, params, shared, StaticTree.build(depth, top_k, tree))

