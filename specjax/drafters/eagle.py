"""EAGLE-1/2: feature-level drafting with one decoder layer over the target's own features.

Pair t of a sequence is (f_t, x_{t+1}): the target's final normed hidden state at
position t (the `FINAL` feature, what its LM head reads) and the token after it. The head

  h_t = fc(concat(embed(x_{t+1}), f_t))         2H -> H with bias; embedding = target's
  g_t = decoder_layer(h_t)                      Llama layer without its input norm,
                                                causal over pairs, RoPE at position t
  p(x_{t+2}) = softmax(lm_head(g_t))            the target's frozen LM head

predicts f_{t+1} (g_t) and through it the token after next. Drafting feeds a drafted
token back with the head's own predicted feature; training regresses g_t on f_{t+1}
(SmoothL1) plus 0.1 x soft cross-entropy against the target's distribution, with uniform
noise on the input features (EAGLE-1's recipe, DESIGN.md section 4).

Decoding keeps the head's own KV cache over the pairs of the committed context, built
from the target's *real* features (prefilled from the prompt's, then the features the
verification forward returns for the accepted tokens); draft-time entries made from
predicted features are dropped after each verification. A step: catch up on the pending
pairs (1 + accepted drafts), which gives the root's distribution, then expand a static
tree (`static_tree.draft`, a chain when top_k = 1) or EAGLE-2's dynamic tree
(`dynamic_tree.draft`, same weights).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from specjax import registry
from specjax.drafters import dynamic_tree, static_tree
from specjax.drafters.base import TargetBatch, check_target, soft_ce
from specjax.models import llama
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import FINAL, causal, embed, lm_head, param_dtype
from specjax.tree import StaticTree


class EagleNet(nn.Module):
  """fc + one decoder layer (no input norm), named as eagle-llm names its weights."""

  cfg: ModelConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, emb_BxTxH, feat_BxTxH, positions_BxT, visible_BxTxT, kv=None,
               start_B=None, prefix_BxTxS=None):
    cfg = self.cfg
    x = nn.Dense(cfg.hidden_size, use_bias=True, dtype=self.dtype, param_dtype=self.dtype,
                 name="fc")(jnp.concatenate([emb_BxTxH, feat_BxTxH], -1).astype(self.dtype))
    cos, sin = llama.rope_cos_sin(cfg, positions_BxT, self.dtype)
    h, kv = llama.Attention(cfg, self.dtype, name="self_attn")(
        x, cos, sin, visible_BxTxT, prefix_BxTxS, kv, start_B)
    x = x + h
    x = x + llama.MLP(cfg, self.dtype, name="mlp")(
        llama.RMSNorm(cfg.norm_eps, self.dtype, name="post_attention_layernorm")(x))
    return x, kv


def run_layer(module: nn.Module, params, inputs: tuple, positions_BxT, visible_BxTxT,
              cache: KVCache | None = None, prefix_BxTxS=None):
  """A head's decoder layer `module` on T positions (`inputs`, each [B, T, H]); with a
  1-layer `cache` its K/V are written at `cache.lengths` as `models.forward` does.
  Returns (output features [B, T, H], cache)."""
  kv = None if cache is None else (cache.k[0], cache.v[0])
  start = None if cache is None else cache.lengths
  if cache is not None and prefix_BxTxS is None:
    prefix_BxTxS = cache.prefix_mask(positions_BxT.shape[1])
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


def net(cfg: ModelConfig, layer: ModelConfig, params, shared, feat_BxTxH, next_BxT,
        positions_BxT, visible_BxTxT, cache: KVCache | None = None, prefix_BxTxS=None):
  """The EAGLE-1 head (decoder layer shaped by `layer`) on T pairs (f, next token) of the
  target `cfg` (see `run_layer`). Returns (predicted features [B, T, H], cache)."""
  return run_layer(EagleNet(layer, param_dtype(params)), params,
                   (embed(cfg, shared, next_BxT), feat_BxTxH), positions_BxT, visible_BxTxT,
                   cache, prefix_BxTxS)


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
class EagleHead:
  """EAGLE-1 as a trainable head (see `base.TrainableHead`)."""

  config: ModelConfig = flax.struct.field(pytree_node=False)  # the target's
  noise: float = flax.struct.field(pytree_node=False, default=0.2)
  ce_weight: float = flax.struct.field(pytree_node=False, default=0.1)
  # The decoder layer's shape (heads, MLP width, RoPE); None = the target's. Heads made
  # elsewhere bring their own (eagle-llm's RoPE base is always 10000).
  layer: ModelConfig | None = flax.struct.field(pytree_node=False, default=None)
  # Start from the identity (the head's first guess is the target's own next-token
  # distribution at the right scale) instead of a random fc whose logits start ~10x off.
  init_identity: bool = flax.struct.field(pytree_node=False, default=False)
  features = (FINAL,)

  @property
  def layer_config(self) -> ModelConfig:
    return self.layer or self.config

  def net(self, params, shared, *args):
    return net(self.config, self.layer_config, params, shared, *args)

  def fuse(self, params, features):
    """The per-position feature the head reads: the target's final state itself."""
    return features[0]

  def logits(self, params, shared, g_BxTxH):
    return lm_head(self.config, shared, g_BxTxH)

  def validate(self, target_config: ModelConfig) -> None:
    check_target("This EAGLE head", self.config.hidden_size, self.config.vocab_size,
                 target_config)

  def init(self, key, dtype=jnp.float32):
    z = jnp.zeros((1, 1), jnp.int32)
    h = jnp.zeros((1, 1, self.config.hidden_size), dtype)
    params = EagleNet(self.layer_config, dtype).init(key, h, h, z, causal(1))["params"]
    if self.init_identity:  # start as g = f: fc passes the feature, the layer adds nothing
      hs = self.config.hidden_size
      params["fc"]["kernel"] = 0.01 * params["fc"]["kernel"] + jnp.concatenate(
          [jnp.zeros((hs, hs), dtype), jnp.eye(hs, dtype=dtype)])
      params["self_attn"]["o_proj"]["kernel"] *= 0
      params["mlp"]["down_proj"]["kernel"] *= 0
    return params

  def loss(self, params, batch: TargetBatch, key):
    cfg = self.config
    f = batch.features[0]
    b, t = batch.tokens.shape
    f_in = f[:, :-1] + self.noise * jax.random.uniform(key, f[:, :-1].shape, f.dtype, -0.5, 0.5)
    positions = jnp.broadcast_to(jnp.arange(t - 1), (b, t - 1))
    g, _ = self.net(params, batch.shared, f_in, batch.tokens[:, 1:], positions, causal(t - 1))
    logits = lm_head(cfg, batch.shared, g)
    target = batch.logits[:, 1:]
    # Pair t drafts token t + 2: it counts where that token is a training target.
    w = jnp.pad(batch.mask[:, 2:], ((0, 0), (0, 1)))
    denom = jnp.maximum(w.sum(), 1.0)
    reg = jnp.sum(w * optax.losses.huber_loss(g, f[:, 1:]).mean(-1)) / denom
    ce = jnp.sum(w * soft_ce(target, logits)) / denom
    top1 = jnp.sum(w * (logits.argmax(-1) == target.argmax(-1))) / denom
    return reg + self.ce_weight * ce, {"reg": reg, "ce": ce, "top1/1": top1}

  def accept(self, params, batch: TargetBatch, depth: int):
    """Greedy chain acceptance of `depth` draft steps from every position (`unroll`)."""
    return chain_accept(self, params, batch, batch.features[0][:, :-1], depth)

  def drafter(self, params, shared, **knobs) -> "Eagle":
    """A drafter with these weights (`drafter` below has the knobs)."""
    return drafter(self, params, shared, **knobs)


@flax.struct.dataclass
class EagleState:
  cache: KVCache  # the head's cache over committed pairs (real features only)
  pending_BxCxH: jax.Array  # features of the pairs [cache.lengths, ctx.length - 1)


@flax.struct.dataclass
class Eagle:
  """The EAGLE drafter (see the module docstring) for any feature-level head: the head
  (`EagleHead`, `Eagle3Head`) says how target features fuse into the per-position
  feature, how the decoder layer runs and how its output becomes logits."""

  head: Any  # a pytree: EAGLE-3's vocabulary map travels with it
  params: Any
  shared: Any
  tree: StaticTree = flax.struct.field(pytree_node=False, default=StaticTree.chain(4))
  # (top_k, depth, num_nodes) of an EAGLE-2 dynamic tree; None = draft the static `tree`.
  dynamic: tuple[int, int, int] | None = flax.struct.field(pytree_node=False, default=None)
  takes_stop_policy = True

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
    return depth + 1  # the root + every draft accepted

  def init(self, ctx, max_len: int, features) -> EagleState:
    f = self.head.fuse(self.params, features)
    b = ctx.history.shape[0]
    layer = self.head.layer_config
    cache = KVCache.create(1, b, max_len + self._pending() + self._draft_room(),
                           layer.num_kv_heads, layer.head_dim, param_dtype(self.params))
    # Pairs 0 .. P-3 into the cache; pair P-2 (the root's) is pending.
    cache = prefill_layer(self._net, cache, f, jnp.pad(ctx.history[:, 1:], ((0, 0), (0, 1))),
                          jnp.maximum(ctx.length - 2, 0), max_len)
    last = jnp.take_along_axis(f, jnp.maximum(ctx.length - 2, 0)[:, None, None], 1)
    pending = jnp.zeros((b, self._pending(), f.shape[-1]), f.dtype).at[:, :1].set(last)
    return EagleState(cache, pending)

  def propose(self, state: EagleState, ctx, stop, sampling, key):
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
                                              valid_B=lag_B > 0)
    else:
      tree, cache, _, calls = static_tree.draft(self.tree, step, logits_root, g_root, cache,
                                                ctx.length - 1, stop, sampling, key,
                                                valid_B=lag_B > 0)
    return tree, EagleState(cache, state.pending_BxCxH), calls

  def commit(self, state: EagleState, ctx, verdict, features) -> EagleState:
    """The new pending pairs: the root's and the accepted nodes' real target features."""
    f = self.head.fuse(self.params, features)
    return EagleState(state.cache, accepted_features(f, verdict, self._pending()))


def drafter(head, params, shared, *, top_k: int = 1, depth: int = 4,
            tree: Sequence[Sequence[int]] | None = None, num_nodes: int | None = None) -> "Eagle":
  """An EAGLE drafter with a feature-level head's weights (EAGLE-1 or EAGLE-3): a chain of
  `depth` tokens (top_k = 1), the full top_k-ary tree of `depth` levels, the tree of
  choice paths `tree`, or, with `num_nodes`, EAGLE-2's dynamic tree (the best num_nodes
  of top_k-wide expansions `depth` levels deep)."""
  if num_nodes is not None:
    if not 1 <= num_nodes <= dynamic_tree.num_candidates(top_k, depth):
      raise ValueError(f"num_nodes={num_nodes} must be in [1, "
                       f"{dynamic_tree.num_candidates(top_k, depth)}] for top_k={top_k}, "
                       f"depth={depth}.")
    return Eagle(head, params, shared, StaticTree.chain(depth), (top_k, depth, num_nodes))
  if tree is None:
    paths, level = [], [()]
    for _ in range(depth):
      level = [p + (r,) for p in level for r in range(top_k)]
      paths += level
    tree = paths
  return Eagle(head, params, shared, StaticTree.from_choices(tree))


@registry.HEADS.register("eagle")
def _head(target_cfg: ModelConfig, *, noise: float = 0.2, ce_weight: float = 0.1,
          init_identity: bool = False) -> EagleHead:
  """EAGLE-1: fc + one decoder layer on the target's final features (EAGLE-2 decodes it)."""
  return EagleHead(target_cfg, noise, ce_weight, init_identity=init_identity)
