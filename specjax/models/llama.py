"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3) in flax.linen.

Parameter names follow Hugging Face (`layers_3/self_attn/q_proj/kernel`), so checkpoint
conversion is a rename plus a transpose. Layers are unrolled in Python over separate
per-layer weights and cache buffers: on XLA's CPU backend that decodes about 2x faster
than `nn.scan` over stacked layers (docs/design.md, "Layers unrolled, not scanned").
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from specjax import kernels
from specjax import sharding
from specjax.models import cache as cache_lib
from specjax.models import moe_parallel
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [Dh/2], with Llama-3 or linear scaling as configured."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  rs = cfg.rope_scaling
  if rs is None:
    return inv
  if rs[0] == "linear":
    return inv / rs[1]
  _, factor, low, high, old_len = rs
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > old_len / low, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions_BxT: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each [B, T, Dh], of the rotary angles at these positions."""
  ang_BxTxD2 = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))
  ang_BxTxD = jnp.concatenate([ang_BxTxD2, ang_BxTxD2], axis=-1)
  return jnp.cos(ang_BxTxD).astype(dtype), jnp.sin(ang_BxTxD).astype(dtype)


def apply_rope(x_BxTxHxD: jax.Array, cos_BxTxD: jax.Array, sin_BxTxD: jax.Array) -> jax.Array:
  """Rotary embedding in the Hugging Face (rotate-half) layout."""
  half = x_BxTxHxD.shape[-1] // 2
  rot = jnp.concatenate([-x_BxTxHxD[..., half:], x_BxTxHxD[..., :half]], axis=-1)
  cos, sin = cos_BxTxD[:, :, None, :], sin_BxTxD[:, :, None, :]
  return (x_BxTxHxD * cos + rot * sin).astype(x_BxTxHxD.dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale * x32.astype(self.dtype)


def in_window(cfg: ModelConfig, positions_BxT, visible_BxTxT, prefix_BxTxS, cache=None):
  """The masks cut to a sliding window, when the config has one (committed cache slot
  index == position; an implicit prefix becomes the explicit committed one first)."""
  if cfg.sliding_window is None:
    return visible_BxTxT, prefix_BxTxS
  if prefix_BxTxS is None and cache is not None:
    prefix_BxTxS = cache.prefix_mask(positions_BxT.shape[1])
  near = lambda key_pos: positions_BxT[..., None] - key_pos < cfg.sliding_window
  visible_BxTxT = visible_BxTxT & near(positions_BxT[:, None, :])
  if prefix_BxTxS is not None:
    prefix_BxTxS = prefix_BxTxS & near(jnp.arange(prefix_BxTxS.shape[-1]))
  return visible_BxTxT, prefix_BxTxS


def attend(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, visible_BxTxT, prefix_BxTxS, kv, start_B,
           impl: str = "xla"):
  """Attention of the new tokens over the cache prefix and themselves, then the write of
  their keys/values into the cache (kv = (k, v) of one layer, or None). Returns (o, kv).
  The prefix is `prefix_BxTxS`, or the committed slots [0, start_B) when that is None;
  `impl` picks the kernel (`specjax.kernels.attention`).

  The write must come after attention's read of the cache for XLA to update the cache in
  place; nothing orders them otherwise (XLA's CPU backend dropped an optimization barrier
  and copied every layer's cache twice a step). So the written values take a zero that
  depends on attention's output, per sequence and kv head (no cross-device dependency when
  batch or heads are sharded).
  """
  if kv is None:
    return kernels.attention(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, visible_BxTxT), None
  o_BxTxHxD = kernels.attention(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, visible_BxTxT, kv[0], kv[1],
                                prefix_BxTxS, start_B, impl)
  if cache_lib.writes_deferred():  # the caller writes them (`cache.deferred_writes`)
    return o_BxTxHxD, (k_BxKxTxD, v_BxKxTxD)
  b, t, h, d = o_BxTxHxD.shape
  kvh = k_BxKxTxD.shape[1]
  zero_BxKx1x1 = (o_BxTxHxD.reshape(b, t, kvh, h // kvh, d)[:, 0, :, 0, :1, None] * 0).astype(
      k_BxKxTxD.dtype)
  return o_BxTxHxD, (cache_lib.write(kv[0], k_BxKxTxD + zero_BxKx1x1, start_B),
                     cache_lib.write(kv[1], v_BxKxTxD + zero_BxKx1x1, start_B))


def run_layers(num_layers: int, x, cache: KVCache | None, feature_layers, layer):
  """Runs `layer(i, x, kv_i) -> (x, kv_i)` for every layer (kv_i None without a cache),
  collecting the inputs of `feature_layers`. Returns (x, layer inputs, updated cache)."""
  layer_hidden, ks, vs = [], [], []
  for i in range(num_layers):
    if i in feature_layers:
      layer_hidden.append(x)
    x, kv = layer(i, x, None if cache is None else (cache.k[i], cache.v[i]))
    if kv is not None:
      ks.append(kv[0])
      vs.append(kv[1])
  new_cache = None if cache is None else cache.replace(k=tuple(ks), v=tuple(vs))
  return x, tuple(layer_hidden), new_cache


class Attention(nn.Module):
  cfg: ModelConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxH, cos, sin, visible_BxTxT, prefix_BxTxS, kv, start_B):
    cfg, b, t = self.cfg, x_BxTxH.shape[0], x_BxTxH.shape[1]
    dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, dtype=self.dtype,
                                           param_dtype=self.dtype, name=name)
    q = dense(cfg.num_heads * cfg.head_dim, "q_proj", cfg.attention_bias)(x_BxTxH)
    k = dense(cfg.num_kv_heads * cfg.head_dim, "k_proj", cfg.attention_bias)(x_BxTxH)
    v = dense(cfg.num_kv_heads * cfg.head_dim, "v_proj", cfg.attention_bias)(x_BxTxH)
    q_BxTxHxD = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k_BxTxKxD = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v_BxTxKxD = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q_BxTxHxD = RMSNorm(cfg.norm_eps, self.dtype, name="q_norm")(q_BxTxHxD)
      k_BxTxKxD = RMSNorm(cfg.norm_eps, self.dtype, name="k_norm")(k_BxTxKxD)
    q_BxTxHxD = apply_rope(q_BxTxHxD, cos, sin)
    k_BxKxTxD = apply_rope(k_BxTxKxD, cos, sin).transpose(0, 2, 1, 3)
    v_BxKxTxD = v_BxTxKxD.transpose(0, 2, 1, 3)
    o_BxTxHxD, kv = attend(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, visible_BxTxT, prefix_BxTxS, kv,
                           start_B, cfg.attention_impl)
    out = dense(cfg.hidden_size, "o_proj", False)(o_BxTxHxD.reshape(b, t, -1))
    return out, kv


class MLP(nn.Module):
  cfg: ModelConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,
                                     param_dtype=self.dtype, name=name)
    f = self.cfg.intermediate_size
    return dense(self.cfg.hidden_size, "down_proj")(
        nn.silu(dense(f, "gate_proj")(x)) * dense(f, "up_proj")(x))


def route(cfg: ModelConfig, router_HxE, x_NxH) -> tuple[jax.Array, jax.Array]:
  """(the experts [N, k] each token goes to, their weights [N, k]): the top k of the
  router's softmax, renormalised over them when `cfg.moe_norm_topk`."""
  probs = jax.nn.softmax((x_NxH @ router_HxE).astype(jnp.float32), -1)
  weight_NxK, expert_NxK = jax.lax.top_k(probs, cfg.experts_per_token)
  if cfg.moe_norm_topk:
    weight_NxK = weight_NxK / jnp.sum(weight_NxK, -1, keepdims=True)
  return expert_NxK, weight_NxK


class MoE(nn.Module):
  """Routed experts in place of the MLP (Mixtral, Qwen3-MoE).

  Every expert runs on every token and a token keeps its k experts' outputs, weighted
  (the dense form: exact, the same compiled shape whatever the routing, and expert-
  parallel by sharding the expert axis; the MLP work is num_experts / k times the routed
  form's, which suits the tiny and small targets this runs here). Under a plan with
  `moe=moe_parallel.Routed(...)` it is the routed form instead: tokens dispatched to their
  experts' devices by all-to-all (`moe_parallel`). Expert weights are stacked: gate / up
  [E, H, I], down [E, I, H]."""

  cfg: ModelConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    cfg, e, f, h = self.cfg, self.cfg.num_experts, self.cfg.moe_intermediate_size, x.shape[-1]
    init = nn.initializers.lecun_normal(batch_axis=(0,))
    router = self.param("router", nn.initializers.lecun_normal(), (h, e), self.dtype)
    gate = self.param("gate", init, (e, h, f), self.dtype)
    up = self.param("up", init, (e, h, f), self.dtype)
    down = self.param("down", init, (e, f, h), self.dtype)
    plan = sharding.active()
    if plan is not None and plan.moe is not None:  # expert-parallel routed form
      return moe_parallel.layer(self, plan, lambda r, x_NxH: route(cfg, r, x_NxH), x, router,
                                gate, up, down)
    x_NxH = x.reshape(-1, h)
    expert_NxK, weight_NxK = route(cfg, router, x_NxH)
    self.sow("intermediates", "routing", expert_NxK)  # routing statistics (`moe_grouping`)
    weight_NxE = jnp.sum(jax.nn.one_hot(expert_NxK, e, dtype=jnp.float32) *
                         weight_NxK[..., None], 1)
    hidden_ExNxF = nn.silu(jnp.einsum("nh,ehf->enf", x_NxH, gate)) * jnp.einsum(
        "nh,ehf->enf", x_NxH, up)
    out_ExNxH = jnp.einsum("enf,efh->enh", hidden_ExNxF, down)
    y = jnp.einsum("ne,enh->nh", weight_NxE.astype(out_ExNxH.dtype), out_ExNxH)
    return y.reshape(x.shape).astype(x.dtype)


def feed_forward(cfg: ModelConfig, dtype, layer: int, **kw) -> nn.Module:
  """Layer `layer`'s MLP: routed experts when it is one of `cfg.moe_layers`."""
  return (MoE if layer in cfg.moe_layers else MLP)(cfg, dtype, **kw)


class Block(nn.Module):
  cfg: ModelConfig
  dtype: jnp.dtype
  layer: int  # its index: whether its MLP is routed experts (`cfg.moe_layers`)

  @nn.compact
  def __call__(self, x, cos, sin, visible, prefix, kv, start_B):
    h, kv = Attention(self.cfg, self.dtype, name="self_attn")(
        RMSNorm(self.cfg.norm_eps, self.dtype, name="input_layernorm")(x),
        cos, sin, visible, prefix, kv, start_B)
    x = x + h
    x = x + feed_forward(self.cfg, self.dtype, self.layer, name="mlp")(
        RMSNorm(self.cfg.norm_eps, self.dtype, name="post_attention_layernorm")(x))
    return x, kv


class Llama(nn.Module):
  """Decoder-only LM. See `specjax.models.model.forward` for the calling convention."""

  cfg: ModelConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, visible_BxTxT, cache: KVCache | None,
               prefix_BxTxS=None, feature_layers: tuple[int, ...] = (), extra_embeds=None):
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                     param_dtype=self.dtype, name="embed_tokens")
    if extra_embeds is None:
      x = embed(tokens_BxT)
    else:  # ids past the vocabulary take rows of `extra_embeds` (`model.forward`)
      extra_id = tokens_BxT - cfg.vocab_size
      x = jnp.where((extra_id >= 0)[..., None],
                    jnp.take(extra_embeds, jnp.clip(extra_id, 0, extra_embeds.shape[0] - 1),
                             axis=0).astype(self.dtype),
                    embed(jnp.minimum(tokens_BxT, cfg.vocab_size - 1)))
    cos, sin = rope_cos_sin(cfg, positions_BxT, self.dtype)
    visible_BxTxT, prefix_BxTxS = in_window(cfg, positions_BxT, visible_BxTxT, prefix_BxTxS,
                                            cache)
    start_B = None if cache is None else cache.lengths
    block = lambda i, x, kv: Block(cfg, self.dtype, i, name=f"layers_{i}")(
        x, cos, sin, visible_BxTxT, prefix_BxTxS, kv, start_B)
    x, layer_hidden, new_cache = run_layers(cfg.num_layers, x, cache, feature_layers, block)
    hidden_BxTxH = RMSNorm(cfg.norm_eps, self.dtype, name="norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(hidden_BxTxH)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.dtype, name="lm_head")(hidden_BxTxH)
    return logits.astype(jnp.float32), hidden_BxTxH, layer_hidden, new_cache
