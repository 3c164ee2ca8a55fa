"""One layer's attention projections computed outside the forward, from that layer's input
(a target feature), exactly as `llama.Attention` makes them: the queries SpecPV's
retrieval scores blocks with, and the keys/values LongSpec's draft cross-attends to in
training (at positions of its choosing)."""

from __future__ import annotations

from typing import Any

import jax

from specjax.models import quant
from specjax.models.config import ModelConfig
from specjax.models.llama import RMSNorm, apply_rope, rope_cos_sin


def _normed(cfg: ModelConfig, params: Any, layer: int, x_BxTxH: jax.Array):
  p = quant.materialize(params[f"layers_{layer}"])
  return p["self_attn"], RMSNorm(cfg.norm_eps, x_BxTxH.dtype).apply(
      {"params": p["input_layernorm"]}, x_BxTxH)


def _project(cfg: ModelConfig, attn: Any, x_BxTxH, name: str, heads: int, norm: str | None):
  b, t, _ = x_BxTxH.shape
  y = x_BxTxH @ attn[name]["kernel"] + (attn[name]["bias"] if cfg.attention_bias else 0)
  y = y.reshape(b, t, heads, cfg.head_dim)
  if cfg.qk_norm and norm:
    y = RMSNorm(cfg.norm_eps, x_BxTxH.dtype).apply({"params": attn[norm]}, y)
  return y


def queries(cfg: ModelConfig, params: Any, layer: int, x_BxTxH: jax.Array,
            positions_BxT: jax.Array) -> jax.Array:
  """[B, T, heads, Dh]: layer `layer`'s queries of its inputs `x` at these positions."""
  attn, x = _normed(cfg, params, layer, x_BxTxH)
  cos, sin = rope_cos_sin(cfg, positions_BxT, x.dtype)
  return apply_rope(_project(cfg, attn, x, "q_proj", cfg.num_heads, "q_norm"), cos, sin)


def keys_values(cfg: ModelConfig, params: Any, layer: int, x_BxTxH: jax.Array,
                positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """([B, KVH, T, Dh] keys at these positions, values): what layer `layer` caches for its
  inputs `x`."""
  attn, x = _normed(cfg, params, layer, x_BxTxH)
  cos, sin = rope_cos_sin(cfg, positions_BxT, x.dtype)
  k = apply_rope(_project(cfg, attn, x, "k_proj", cfg.num_kv_heads, "k_norm"), cos, sin)
  v = _project(cfg, attn, x, "v_proj", cfg.num_kv_heads, None)
  return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
