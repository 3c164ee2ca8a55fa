"""Masked grouped-query attention over a KV cache (pure jnp reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                        mask_BxTxS: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(D) + mask) v with H query heads sharing K kv heads (GQA).

  The mask is boolean (True = may attend). Scores and softmax run in float32.
  Returns [B, T, H, D] in the query dtype.
  """
  b, t, h, d = q_BxTxHxD.shape
  kvh = k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kvh, h // kvh, d)
  s_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                           preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
  s_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], s_BxKxGxTxS, -1e30)
  p_BxKxGxTxS = jax.nn.softmax(s_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
  o_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", p_BxKxGxTxS, v_BxSxKxD)
  return o_BxTxKxGxD.reshape(b, t, h, d)

