"""GPT-2 in flax.linen, with the same calling convention as `Llama`.

Parameter names follow Hugging Face (`h_0/attn/c_attn/kernel`); GPT-2's Conv1D weights are
already stored [in, out], so they load without a transpose.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.llama import attend, run_layers


class Block(nn.Module):
  cfg: ModelConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxH, visible_BxTxT, prefix_BxTxS, kv, start_B):
    cfg, b, t = self.cfg, x_BxTxH.shape[0], x_BxTxH.shape[1]
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.dtype, name=name)
    norm = lambda name: nn.LayerNorm(cfg.norm_eps, dtype=self.dtype, param_dtype=self.dtype,
                                     name=name)
    qkv = dense(3 * cfg.hidden_size, "c_attn")(norm("ln_1")(x_BxTxH))
    q, k, v = (a.reshape(b, t, cfg.num_heads, cfg.head_dim) for a in jnp.split(qkv, 3, -1))
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, T, D]
    o, kv = attend(q, k, v, visible_BxTxT, prefix_BxTxS, kv, start_B, cfg.attention_impl)
    o = o.reshape(b, t, -1)
    x_BxTxH = x_BxTxH + dense(cfg.hidden_size, "c_proj")(o)
    h = nn.gelu(dense(cfg.intermediate_size, "c_fc")(norm("ln_2")(x_BxTxH)), approximate=True)
    return x_BxTxH + dense(cfg.hidden_size, "mlp_c_proj")(h), kv


class GPT2(nn.Module):
  """GPT-2 LM head model (tied embeddings, learned positions)."""

  cfg: ModelConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, visible_BxTxT, cache: KVCache | None,
               prefix_BxTxS=None, feature_layers: tuple[int, ...] = ()):
    cfg = self.cfg
    wte = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                   name="wte")
    wpe = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                   param_dtype=self.dtype, name="wpe")
    x = wte(tokens_BxT) + wpe(positions_BxT)
    start_B = None if cache is None else cache.lengths
    block = lambda i, x, kv: Block(cfg, self.dtype, name=f"h_{i}")(
        x, visible_BxTxT, prefix_BxTxS, kv, start_B)
    x, layer_hidden, new_cache = run_layers(cfg.num_layers, x, cache, feature_layers, block)
    hidden_BxTxH = nn.LayerNorm(cfg.norm_eps, dtype=self.dtype, param_dtype=self.dtype,
                                name="ln_f")(x)
    logits = wte.attend(hidden_BxTxH)
    return logits.astype(jnp.float32), hidden_BxTxH, layer_hidden, new_cache
