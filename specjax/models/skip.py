"""The target's own forward with some of its sub-layers skipped: self-speculation with no
extra weights (SWIFT skips attention and MLP sub-layers; DEL exits after a layer, which
skips every sub-layer above it).

`skip_Lx2[i] = (skip layer i's attention, skip its MLP)` is a traced array: each sub-layer
runs under `lax.cond`, so changing the skip set never recompiles, and a skipped sub-layer
costs nothing. A skipped attention writes no keys/values into the cache; a drafter that
reads the target's committed cache with one skip set never reads the slots it left
unwritten (they are skipped for every draft token of the step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from specjax.models.config import ModelConfig
from specjax.models.llama import MLP, Attention, RMSNorm, in_window, rope_cos_sin
from specjax.models.model import Forward, embed, lm_head, param_dtype


def check(cfg: ModelConfig, what: str) -> None:
  """Raises unless `cfg` is a target whose sub-layers can be skipped."""
  if cfg.arch != "llama":
    raise ValueError(f"{what} skips the target's own sub-layers, which is built for "
                     f"Llama-family targets; this target is {cfg.arch!r}.")


def forward_skipping(cfg: ModelConfig, params: Any, tokens_BxT, positions_BxT, visible_BxTxT,
                     cache, skip_Lx2) -> Forward:
  """`models.forward` (with a cache, no features) with the sub-layers `skip_Lx2` marks
  skipped. Returns the logits and final normed state at every new token and the cache
  with their keys/values written at `cache.lengths` for the attention that ran."""
  dtype = param_dtype(params)
  x = embed(cfg, params, tokens_BxT).astype(dtype)
  cos, sin = rope_cos_sin(cfg, positions_BxT, dtype)
  visible, prefix = in_window(cfg, positions_BxT, visible_BxTxT, None, cache)
  if prefix is None and cfg.attention_impl == "xla":
    prefix = cache.prefix_mask(tokens_BxT.shape[1])
  norm = lambda p, x: RMSNorm(cfg.norm_eps, dtype).apply({"params": p}, x)
  ks, vs = [], []
  for i in range(cfg.num_layers):
    p = params[f"layers_{i}"]

    def attention(x, kv, p=p):
      h, kv = Attention(cfg, dtype).apply({"params": p["self_attn"]}, norm(
          p["input_layernorm"], x), cos, sin, visible, prefix, kv, cache.lengths)
      return x + h, kv

    def mlp(x, p=p):
      return x + MLP(cfg, dtype).apply({"params": p["mlp"]},
                                       norm(p["post_attention_layernorm"], x))

    x, kv = jax.lax.cond(skip_Lx2[i, 0], lambda x, kv: (x, kv), attention, x,
                         (cache.k[i], cache.v[i]))
    x = jax.lax.cond(skip_Lx2[i, 1], lambda x: x, mlp, x)
    ks.append(kv[0])
    vs.append(kv[1])
  hidden = norm(params["norm"], x)
  return Forward(lm_head(cfg, params, hidden), hidden, (),
                 cache.replace(k=tuple(ks), v=tuple(vs)))


def exit_after(num_layers: int, layer: jax.Array) -> jax.Array:
  """bool[L, 2]: the skip set of exiting after `layer` layers (traced)."""
  return jnp.broadcast_to((jnp.arange(num_layers) >= layer)[:, None], (num_layers, 2))


def exit_logits(cfg: ModelConfig, params: Any, hidden_BxTxH) -> jax.Array:
  """float32[B, T, V]: the target's final norm and LM head over a layer's output (the
  prediction of exiting there)."""
  norm = RMSNorm(cfg.norm_eps, param_dtype(params)).apply({"params": params["norm"]},
                                                          hidden_BxTxH)
  return lm_head(cfg, params, norm)
