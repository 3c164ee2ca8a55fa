"""Masked grouped-query attention over a KV cache (pure jnp reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(q_BxTxHxD: jax.Array, k_BxKxSxD: jax.Array, v_BxKxSxD: jax.Array,
                        mask_BxTxS: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(D) + mask) v with H query heads sharing K kv heads (GQA).

  Keys and values are laid out [B, K, S, D] (heads before slots), so each head's scores
  are a plain batched matmul over the cache with no transpose of the cache. The mask is
  boolean (True = may attend). Scores and softmax run in float32.
  Returns [B, T, H, D] in the query dtype.
  """
  b, t, h, d = q_BxTxHxD.shape
  kvh, s = k_BxKxSxD.shape[1], k_BxKxSxD.shape[2]
  g = h // kvh
  # One batch dim (B*K) and one row dim (G*T): XLA's CPU backend runs this 3-D form ~3x
  # faster than the equivalent 5-D einsum (measured at 1024 cache slots).
  q_NxMxD = q_BxTxHxD.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kvh, g * t, d)
  k_NxSxD = k_BxKxSxD.reshape(b * kvh, s, d)
  v_NxSxD = v_BxKxSxD.reshape(b * kvh, s, d)
  s_NxMxS = jax.lax.dot_general(q_NxMxD, k_NxSxD, (((2,), (2,)), ((0,), (0,))),
                                preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
  mask_NxMxS = jnp.broadcast_to(mask_BxTxS[:, None, None], (b, kvh, g, t, s)).reshape(
      b * kvh, g * t, s)
  p_NxMxS = jax.nn.softmax(jnp.where(mask_NxMxS, s_NxMxS, -1e30), axis=-1)
  o_NxMxD = jax.lax.dot_general(p_NxMxS.astype(v_NxSxD.dtype), v_NxSxD,
                                (((2,), (1,)), ((0,), (0,))))
  return o_NxMxD.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
