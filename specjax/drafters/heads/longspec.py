"""LongSpec (Yang et al. 2025, sail-sg/LongSpec): a one-layer draft whose memory does not
grow with the context. Lossless.

The draft reads token embeddings (the target's, frozen and shared) and runs one layer:

  x = embed(token)                                     at the token's position p
  x += self_attn(norm(x))      over its own keys of the last `window` positions (512:
                                a sliding window, no sinks), RoPE at p
  x += cross_attn(norm(x))     over the target's LAST-LAYER keys/values of the committed
                                context (the long context, read from the target's own
                                cache: no memory of the draft's), its query roped at p
  x += mlp(norm(x))
  p(next) = softmax(lm_head(norm(x)))                  the target's frozen LM head

Its self-attention keys depend on the token and its position only (one layer over
embeddings), so the draft keeps them in a ring of `window` slots (slot = position mod
window), written for committed tokens exactly and never stale: the draft's memory is
window x the KV width, whatever the context (`ring`, checked by the tests at 7k).

Training (`loss`): the target's last-layer keys/values come from its layer-(L-1) input (a
target feature) projected by that layer (`models.projections`). Position indices are
anchor-offset: the first 0-4 tokens keep positions 0.., the rest are shifted by a random
offset up to ~max context, so a draft trained on short rows has seen long positions; and
cross-attention sees the target's keys with a random lag of 1-4 tokens (query t reads
keys <= t - lag), as drafting does (the root reads the keys before it; draft k, k + 1
back). Distillation: the batch's loss against the target's next-token distribution.

Departures: the layer output goes through a trained RMSNorm before the LM head (the
reference feeds it to the LM head directly); training keys are projected from layer
inputs computed at plain positions and roped at the offset ones (the reference runs the
target at the offset positions; RoPE being relative, only the anchor tokens' distances
differ); the loss is the distillation loss rather than the data's hard labels (rows here
are the target's own outputs); drafts are chains (the reference also drafts trees).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from specjax import registry
from specjax import sampling as sampling_lib
from specjax.drafters import io
from specjax.drafters.base import TargetBatch, TrainableHead, check_target
from specjax.models import projections
from specjax.models.config import ModelConfig
from specjax.models.llama import apply_rope, rope_cos_sin
from specjax.models.model import embed, lm_head, param_dtype
from specjax.tree import DraftTree

MAX_LAG = 4  # the cross-attention lags training draws: 1..MAX_LAG


def _rms(x, scale, eps):
  x32 = x.astype(jnp.float32)
  return (scale * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps))
          ).astype(x.dtype)


def _attend(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, mask_BxTxS):
  """Grouped-query attention over explicit keys; a query that sees none outputs zero."""
  b, t, h, d = q_BxTxHxD.shape
  kvh = k_BxKxSxD.shape[1]
  q = q_BxTxHxD.reshape(b, t, kvh, h // kvh, d)
  s = jnp.einsum("btkgd,bksd->bkgts", q, k_BxKxSxD).astype(jnp.float32) / jnp.sqrt(d)
  s = jnp.where(mask_BxTxS[:, None, None], s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  o = jnp.einsum("bkgts,bksd->btkgd", p.astype(v_BxKxSxD.dtype), v_BxKxSxD)
  return o.reshape(b, t, h * d)


def self_keys_values(cfg: ModelConfig, params, emb_BxTxH, positions_BxT):
  """The draft's own keys (roped) and values of tokens: [B, KVH, T, Dh] each."""
  b, t, _ = emb_BxTxH.shape
  x = _rms(emb_BxTxH, params["input_layernorm"]["scale"], cfg.norm_eps)
  a = params["self_attn"]
  cos, sin = rope_cos_sin(cfg, positions_BxT, x.dtype)
  k = apply_rope((x @ a["k_proj"]["kernel"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim),
                 cos, sin)
  v = (x @ a["v_proj"]["kernel"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def layer(cfg: ModelConfig, params, emb_BxTxH, positions_BxT, self_k, self_v, self_mask_BxTxS,
          cross_k, cross_v, cross_mask_BxTxS):
  """The draft layer on T tokens: self-attention over keys `self_k/v` ([B, KVH, S, Dh]:
  earlier tokens' and these tokens' own, as `self_mask` says), cross-attention over the
  target's last-layer keys `cross_k/v` ([B, KVH, S', Dh]). Returns the normed state."""
  b, t, _ = emb_BxTxH.shape
  eps = cfg.norm_eps
  cos, sin = rope_cos_sin(cfg, positions_BxT, emb_BxTxH.dtype)
  query = lambda a, x: apply_rope((x @ a["q_proj"]["kernel"]).reshape(
      b, t, cfg.num_heads, cfg.head_dim), cos, sin)
  x = emb_BxTxH
  a = params["self_attn"]
  h = _rms(x, params["input_layernorm"]["scale"], eps)
  x = x + _attend(query(a, h), self_k, self_v, self_mask_BxTxS) @ a["o_proj"]["kernel"]
  c = params["cross_attn"]
  h = _rms(x, params["post_self_attention_layernorm"]["scale"], eps)
  x = x + _attend(query(c, h), cross_k, cross_v, cross_mask_BxTxS) @ c["o_proj"]["kernel"]
  m = params["mlp"]
  h = _rms(x, params["post_cross_attention_layernorm"]["scale"], eps)
  x = x + (jax.nn.silu(h @ m["gate_proj"]["kernel"]) * (h @ m["up_proj"]["kernel"])
           ) @ m["down_proj"]["kernel"]
  return _rms(x, params["norm"]["scale"], eps)


@flax.struct.dataclass
class LongSpecHead(TrainableHead):
  """LongSpec's draft layer as a trainable head (`base.TrainableHead`)."""

  config: ModelConfig = flax.struct.field(pytree_node=False)  # the target's
  window: int = flax.struct.field(pytree_node=False, default=512)
  max_offset: int = flax.struct.field(pytree_node=False, default=30000)
  max_sink: int = flax.struct.field(pytree_node=False, default=4)

  @property
  def features(self) -> tuple[int, ...]:
    return (self.config.num_layers - 1,)  # the last layer's input: its keys/values

  def validate(self, target_config: ModelConfig) -> None:
    check_target("This LongSpec head", self.config.hidden_size, self.config.vocab_size,
                 target_config)
    if target_config.num_layers != self.config.num_layers or target_config.arch != "llama":
      raise ValueError("This LongSpec head cross-attends to the last layer of a "
                       f"{self.config.num_layers}-layer Llama-family target; this one has "
                       f"{target_config.num_layers} layers ({target_config.arch}).")

  def init(self, key, dtype=jnp.float32):
    cfg = self.config
    hs, q, kv, f = (cfg.hidden_size, cfg.num_heads * cfg.head_dim,
                    cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size)
    keys = iter(jax.random.split(key, 9))
    w = lambda *shape, scale=0.02: {"kernel": scale * jax.random.normal(next(keys), shape, dtype)}
    ones = lambda s=1.0: {"scale": jnp.full((hs,), s, dtype)}
    # The output norm starts small: the first distribution is soft, not a spike on the
    # current token (whose embedding the residual stream starts from and a tied LM head
    # maps back to it).
    return {"input_layernorm": ones(), "post_self_attention_layernorm": ones(),
            "post_cross_attention_layernorm": ones(), "norm": ones(0.1),
            "self_attn": {"q_proj": w(hs, q), "k_proj": w(hs, kv), "v_proj": w(hs, kv),
                          "o_proj": w(q, hs, scale=0.002)},
            "cross_attn": {"q_proj": w(hs, q), "o_proj": w(q, hs, scale=0.002)},
            "mlp": {"gate_proj": w(hs, f), "up_proj": w(hs, f), "down_proj": w(f, hs, scale=0.002)}}

  def _logits(self, params, batch: TargetBatch, positions_BxT, lag):
    """Teacher-forced logits at every position, with cross-attention lag `lag`."""
    cfg = self.config
    b, t = batch.tokens.shape
    emb = embed(cfg, batch.shared, batch.tokens)
    k, v = self_keys_values(cfg, params, emb, positions_BxT)
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    self_mask = jnp.broadcast_to((j <= i) & (j > i - self.window), (b, t, t))
    ck, cv = projections.keys_values(cfg, batch.target_params, cfg.num_layers - 1,
                                     batch.features[0], positions_BxT)
    cross_mask = jnp.broadcast_to(j <= i - lag, (b, t, t))
    g = layer(cfg, params, emb, positions_BxT, k, v, self_mask, ck, cv, cross_mask)
    return lm_head(cfg, batch.shared, g)

  def positions(self, key, b: int, t: int):
    """Anchor-offset positions: the first `sink` (0..max_sink) keep 0.., the rest shift by
    a random offset that keeps the row inside the target's context."""
    k1, k2 = jax.random.split(key)
    sink = jax.random.randint(k1, (), 0, self.max_sink + 1)
    room = max(min(self.max_offset, self.config.max_position_embeddings - 1000) - t, 0)
    offset = jax.random.randint(k2, (), 0, room + 1)
    p = jnp.arange(t)
    return jnp.broadcast_to(jnp.where(p < sink, p, p + offset), (b, t))

  def loss(self, params, batch: TargetBatch, key):
    b, t = batch.tokens.shape
    k1, k2 = jax.random.split(key)
    lag = jax.random.randint(k2, (), 1, MAX_LAG + 1)
    logits = self._logits(params, batch, self.positions(k1, b, t), lag)
    w = jnp.pad(batch.mask[:, 1:], ((0, 0), (0, 1)))  # position t drafts token t + 1
    denom = jnp.maximum(w.sum(), 1.0)
    ce = jnp.sum(w * batch.distill(batch.logits, logits)) / denom
    top1 = jnp.sum(w * (logits.argmax(-1) == batch.logits.argmax(-1))) / denom
    return ce, {"ce": ce, "top1/1": top1}

  def accept(self, params, batch: TargetBatch, depth: int):
    """Draft k of a chain from position t: the draft at t + k, reading the target's keys
    before t (lag k + 1), matches the target's argmax (teacher-forced inputs)."""
    b, t = batch.tokens.shape
    rows = jnp.arange(t)
    positions = jnp.broadcast_to(rows, (b, t))
    top = batch.logits.argmax(-1)
    matches = []
    for k in range(depth):
      pred = self._logits(params, batch, positions, k + 1).argmax(-1)
      src = jnp.minimum(rows + k, t - 1)
      ok = (pred[:, src] == top[:, src]) & (rows + k + 1 < t)
      ok &= jnp.take(batch.mask, jnp.minimum(rows + k + 1, t - 1), 1) > 0
      matches.append(ok)
    return jnp.stack(matches, -1), jnp.pad(batch.mask[:, 1:], ((0, 0), (0, 1)))

  def drafter(self, params, shared, *, depth: int = 4, top_k: int = 1, tree=None,
              num_nodes: int | None = None) -> "LongSpec":
    """A chain of `depth` drafts (the draft-size knobs every head takes; LongSpec drafts
    chains only: top_k 1, no tree)."""
    if top_k != 1 or tree is not None or num_nodes is not None:
      raise ValueError(f"LongSpec drafts a chain (depth); got top_k={top_k}, tree={tree}, "
                       f"num_nodes={num_nodes}.")
    return LongSpec(params, shared, self.config, int(depth), self.window)


@flax.struct.dataclass
class LongSpecState:
  ring_k: jax.Array  # [B, KVH, window, Dh]: the draft's keys of committed positions
  ring_v: jax.Array
  drafted: jax.Array  # int32[B, depth]: the last proposal


@flax.struct.dataclass
class LongSpec:
  """LongSpec's drafter: a chain of `depth` tokens, one draft forward each."""

  params: Any
  shared: Any  # the target's embedding and LM head
  config: ModelConfig = flax.struct.field(pytree_node=False)
  depth: int = flax.struct.field(pytree_node=False, default=4)
  window: int = flax.struct.field(pytree_node=False, default=512)
  takes_stop_policy = False
  drafts_vary = False

  @property
  def features(self) -> tuple[int, ...]:
    return ()  # it reads the target's cache, not its features

  @property
  def num_nodes(self) -> int:
    return self.depth

  def validate(self, target_config: ModelConfig) -> None:
    LongSpecHead(self.config, self.window).validate(target_config)
    if target_config.sliding_window is not None:
      raise ValueError("LongSpec cross-attends to every committed slot of the target's last "
                       "layer; a sliding-window target is not supported.")
    if self.depth < 1 or self.window < 1:
      raise ValueError(f"LongSpec needs depth >= 1 and window >= 1; got {self.depth}, "
                       f"{self.window}.")

  def _write(self, ring, tokens_BxT, start_B, count_B):
    """The ring with the keys/values of tokens at positions start.. (the first count)."""
    t = tokens_BxT.shape[1]
    pos_BxT = start_B[:, None] + jnp.arange(t)
    k, v = self_keys_values(self.config, self.params, embed(self.config, self.shared,
                                                             tokens_BxT), pos_BxT)
    slot = jnp.where(jnp.arange(t)[None] < count_B[:, None], pos_BxT % self.window, self.window)
    rows = jnp.arange(tokens_BxT.shape[0])[:, None]
    put = lambda r, x: r.at[rows, :, slot].set(x.transpose(0, 2, 1, 3), mode="drop")
    return put(ring[0], k), put(ring[1], v)

  def init(self, ctx, max_len, features):
    del max_len, features
    b = ctx.history.shape[0]
    c_B = ctx.length - 1  # committed positions: all but the root
    start_B = jnp.maximum(c_B - self.window, 0)
    src = jnp.minimum(start_B[:, None] + jnp.arange(self.window), ctx.history.shape[1] - 1)
    shape = (b, self.config.num_kv_heads, self.window, self.config.head_dim)
    ring = (jnp.zeros(shape, param_dtype(self.params)), jnp.zeros(shape, param_dtype(self.params)))
    ring = self._write(ring, jnp.take_along_axis(ctx.history, src, 1), start_B, c_B - start_B)
    return LongSpecState(*ring, jnp.zeros((b, self.depth), jnp.int32))

  def propose(self, state: LongSpecState, ctx, stop, sampling, key):
    del stop
    cfg, w, n = self.config, self.window, self.depth
    b = ctx.history.shape[0]
    rows = jnp.arange(b)
    c_B = ctx.length - 1
    # The position each ring slot holds: the latest committed one congruent to it.
    ring_pos_BxW = (c_B[:, None] - 1) - jnp.mod(c_B[:, None] - 1 - jnp.arange(w), w)
    target = ctx.cache  # the target's cache: its last layer is the cross-attention's memory
    cross_k, cross_v = target.k[cfg.num_layers - 1], target.v[cfg.num_layers - 1]
    cross_mask = (jnp.arange(target.max_len)[None] < target.lengths[:, None])[:, None, :]
    buf_k = jnp.zeros(state.ring_k.shape[:2] + (n, cfg.head_dim), state.ring_k.dtype)
    buf_v = jnp.zeros_like(buf_k)
    tok = ctx.history[rows, c_B]
    keys = jax.random.split(key, n)
    toks, qs = [], []
    for i in range(n):
      pos_B = c_B + i
      emb = embed(cfg, self.shared, tok[:, None])
      k_new, v_new = self_keys_values(cfg, self.params, emb, pos_B[:, None])
      buf_k = buf_k.at[:, :, i].set(k_new[:, :, 0])
      buf_v = buf_v.at[:, :, i].set(v_new[:, :, 0])
      seen_ring = (ring_pos_BxW >= 0) & (ring_pos_BxW > pos_B[:, None] - w)
      seen_buf = jnp.broadcast_to(jnp.arange(n)[None] <= i, (b, n))
      mask = jnp.concatenate([seen_ring, seen_buf], 1)[:, None, :]
      g = layer(cfg, self.params, emb, pos_B[:, None],
                jnp.concatenate([state.ring_k, buf_k], 2),
                jnp.concatenate([state.ring_v, buf_v], 2), mask, cross_k, cross_v, cross_mask)
      logits = lm_head(cfg, self.shared, g)[:, 0]
      tok, q = sampling_lib.draw(keys[i], logits, sampling)
      qs.append(q)
      toks.append(tok)
    drafted = jnp.stack(toks, 1)
    tree = DraftTree.chain(drafted, jnp.ones((b, n), bool),
                           None if sampling.greedy else jnp.stack(qs, 1),
                           sampled=not sampling.greedy)
    return tree, state.replace(drafted=drafted), jnp.full((b,), n, jnp.int32)

  def commit(self, state: LongSpecState, ctx, verdict, features):
    """Writes the keys/values of the root and the accepted drafts into the ring."""
    del features
    c_B = ctx.length - 1
    root = ctx.history[jnp.arange(c_B.shape[0]), c_B]
    tokens = jnp.concatenate([root[:, None], state.drafted], 1)
    ring = self._write((state.ring_k, state.ring_v), tokens, c_B, 1 + verdict.accepted_drafts)
    return state.replace(ring_k=ring[0], ring_v=ring[1])


@registry.HEADS.register("longspec")
def _head(target_cfg: ModelConfig, *, window: int = 512, max_offset: int = 30000,
          max_sink: int = 4) -> LongSpecHead:
  """LongSpec: one layer of `window` sliding self-attention and cross-attention into the
  target's last-layer keys/values; anchor-offset positions (0..max_sink anchors, offsets
  up to max_offset) in training."""
  return LongSpecHead(target_cfg, int(window), int(max_offset), int(max_sink))


@registry.DRAFTERS.register("longspec", takes_stop_policy=False)
def _drafter(target, *, checkpoint: str, budget: str | None = None, depth: int | None = None,
             top_k: int | None = None, tree=None) -> LongSpec:
  """A trained LongSpec head folder as a chain of `depth` drafts (default: the folder's),
  or sized by `budget=COSTS_JSON`; chains only (top_k 1, no tree)."""
  return io.trained_drafter("longspec", target, checkpoint, budget, depth=depth, top_k=top_k,
                            tree=tree)
