"""State-space and hybrid decoders (Mamba-2; Bamba: attention + Mamba-2) in flax.linen.

Each layer is pre-norm: RMSNorm, then a Mamba-2 mixer (`cfg.ssm_layers`, `models.ssm`)
or Llama-style attention with RoPE on the first `cfg.rotary_dim` channels of each head,
added to the residual; then, when `cfg.intermediate_size` > 0, RMSNorm and a SwiGLU MLP.
Parameter names follow Bamba's (`layers_0/mamba/in_proj/kernel`,
`layers_1/self_attn/q_proj/kernel`, `layers_0/feed_forward/up_proj/kernel`); Mamba-2
checkpoints are renamed onto them at load. The KV cache holds the attention layers'
keys/values (`cache.k[j]` is the j-th attention layer's) and one `ssm.SSMState` per
mixer layer (`cache.ssm[j]`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from specjax.models import ssm as ssm_lib
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.llama import MLP, RMSNorm, apply_rope, attend, rope_cos_sin


class Attention(nn.Module):
  """Bamba's attention: Llama's, with RoPE on the first `cfg.rotary_dim` channels."""

  cfg: ModelConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxH, cos, sin, visible_BxTxT, prefix_BxTxS, kv, start_B):
    cfg, b, t = self.cfg, x_BxTxH.shape[0], x_BxTxH.shape[1]
    rot = cfg.rotary_dim or cfg.head_dim
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,
                                     param_dtype=self.dtype, name=name)
    q = dense(cfg.num_heads * cfg.head_dim, "q_proj")(x_BxTxH).reshape(
        b, t, cfg.num_heads, cfg.head_dim)
    k = dense(cfg.num_kv_heads * cfg.head_dim, "k_proj")(x_BxTxH).reshape(
        b, t, cfg.num_kv_heads, cfg.head_dim)
    v = dense(cfg.num_kv_heads * cfg.head_dim, "v_proj")(x_BxTxH).reshape(
        b, t, cfg.num_kv_heads, cfg.head_dim)
    partial = lambda x: jnp.concatenate([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], -1)
    o, kv = attend(partial(q), partial(k).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                   visible_BxTxT, prefix_BxTxS, kv, start_B, cfg.attention_impl)
    return dense(cfg.hidden_size, "o_proj")(o.reshape(b, t, -1)), kv


class Block(nn.Module):
  cfg: ModelConfig
  dtype: jnp.dtype
  layer: int

  @nn.compact
  def __call__(self, x, cos, sin, visible, prefix, kv, state, start_B):
    """(x, kv, state): kv for an attention layer, state for a mixer (the other None)."""
    cfg = self.cfg
    h = RMSNorm(cfg.norm_eps, self.dtype, name="input_layernorm")(x)
    if self.layer in cfg.ssm_layers:
      h, state = ssm_lib.Mamba2Mixer(cfg, self.dtype, name="mamba")(h, visible, state)
    else:
      h, kv = Attention(cfg, self.dtype, name="self_attn")(h, cos, sin, visible, prefix, kv,
                                                           start_B)
    x = x + h
    if cfg.intermediate_size:
      x = x + MLP(cfg, self.dtype, name="feed_forward")(
          RMSNorm(cfg.norm_eps, self.dtype, name="pre_ff_layernorm")(x))
    return x, kv, state


class Hybrid(nn.Module):
  """Decoder-only LM. See `specjax.models.model.forward` for the calling convention."""

  cfg: ModelConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, visible_BxTxT, cache: KVCache | None,
               prefix_BxTxS=None, feature_layers: tuple[int, ...] = (), extra_embeds=None):
    cfg = self.cfg
    if extra_embeds is not None:
      raise ValueError("Extra (prompt-tuning) embeddings are built for Llama-family targets.")
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                     param_dtype=self.dtype, name="embed_tokens")
    x = embed(tokens_BxT)
    rot_cfg = cfg.replace(head_dim=cfg.rotary_dim or cfg.head_dim)
    cos, sin = rope_cos_sin(rot_cfg, positions_BxT, self.dtype)
    start_B = None if cache is None else cache.lengths
    kv_of = {layer: j for j, layer in enumerate(cfg.attention_layers)}
    state_of = {layer: j for j, layer in enumerate(cfg.state_layers)}
    layer_hidden, ks, vs, states = [], [], [], []
    for i in range(cfg.num_layers):
      if i in feature_layers:
        layer_hidden.append(x)
      kv = state = None
      if cache is not None and i in kv_of:
        kv = (cache.k[kv_of[i]], cache.v[kv_of[i]])
      if cache is not None and i in state_of:
        state = cache.ssm[state_of[i]]
      x, kv, state = Block(cfg, self.dtype, i, name=f"layers_{i}")(
          x, cos, sin, visible_BxTxT, prefix_BxTxS, kv, state, start_B)
      if kv is not None:
        ks.append(kv[0])
        vs.append(kv[1])
      if state is not None:
        states.append(state)
    new_cache = None if cache is None else cache.replace(k=tuple(ks), v=tuple(vs),
                                                         ssm=tuple(states))
    hidden_BxTxH = RMSNorm(cfg.norm_eps, self.dtype, name="norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(hidden_BxTxH)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.dtype, name="lm_head")(hidden_BxTxH)
    return logits.astype(jnp.float32), hidden_BxTxH, tuple(layer_hidden), new_cache
