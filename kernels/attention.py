"""Grouped-query attention of T new tokens over a KV-cache prefix and themselves (pure jnp).

The keys a query sees come in two parts: cache slots (the committed context, read and never
written here) and the T new keys of this forward (a causal chain or a draft tree). Keeping
the parts apart is what lets XLA update the cache in place: when attention read the cache
*after* the new keys were written into it, XLA's CPU backend duplicated the write into the
attention's operand and copied every layer's cache several times per step (about 40% of a
single-token forward at 1,400 tokens of context). A tree-attention kernel sees the same
split: a prefix per sequence, then the tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a row with nothing visible gives no NaN


def attention_reference(q_BxTxHxD: jax.Array, k_BxKxTxD: jax.Array, v_BxKxTxD: jax.Array,
                        visible_BxTxT: jax.Array, cache_k_BxKxSxD: jax.Array | None = None,
                        cache_v_BxKxSxD: jax.Array | None = None,
                        prefix_BxTxS: jax.Array | None = None) -> jax.Array:
  """softmax(q [K_cache; k]^T / sqrt(D)) [V_cache; v], H query heads sharing K kv heads.

  Query t sees cache slot s when `prefix_BxTxS[b, t, s]` and new key t' when
  `visible_BxTxT[b, t, t']` (masks are boolean, True = may attend). Without a cache only
  the new keys exist. Keys and values are laid out [B, K, S, D] (heads before slots), so
  scores are batched matmuls over (B, K) with no transpose of the cache; scores and softmax
  run in float32. Returns [B, T, H, D] in the query dtype.
  """
  b, t, h, d = q_BxTxHxD.shape
  kvh = k_BxKxTxD.shape[1]
  g = h // kvh
  # Rows are (group member, query): each kv head's G query heads share one matmul.
  q_BxKxMxD = q_BxTxHxD.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(
      b, kvh, g * t, d)
  scale = 1.0 / jnp.sqrt(jnp.float32(d))

  def scores(keys_BxKxSxD, mask_BxTxS):
    s = keys_BxKxSxD.shape[2]
    s_BxKxMxS = jax.lax.dot_general(q_BxKxMxD, keys_BxKxSxD, (((3,), (3,)), ((0, 1), (0, 1))),
                                    preferred_element_type=jnp.float32) * scale
    mask_BxKxMxS = jnp.broadcast_to(mask_BxTxS[:, None, None], (b, kvh, g, t, s)).reshape(
        b, kvh, g * t, s)
    return jnp.where(mask_BxKxMxS, s_BxKxMxS, _MASKED)

  def weighted(p_BxKxMxS, values_BxKxSxD):
    return jax.lax.dot_general(p_BxKxMxS.astype(values_BxKxSxD.dtype), values_BxKxSxD,
                               (((3,), (2,)), ((0, 1), (0, 1))),
                               preferred_element_type=jnp.float32)

  s_new = scores(k_BxKxTxD, visible_BxTxT)
  if cache_k_BxKxSxD is None:
    o_BxKxMxD = weighted(jax.nn.softmax(s_new, axis=-1), v_BxKxTxD)
  else:
    s_len = cache_k_BxKxSxD.shape[2]
    p = jax.nn.softmax(jnp.concatenate([scores(cache_k_BxKxSxD, prefix_BxTxS), s_new], -1),
                       axis=-1)
    o_BxKxMxD = weighted(p[..., :s_len], cache_v_BxKxSxD) + weighted(p[..., s_len:], v_BxKxTxD)
  return o_BxKxMxD.astype(q_BxTxHxD.dtype).reshape(b, kvh, g, t, d).transpose(
      0, 3, 1, 2, 4).reshape(b, t, h, d)


# ---- tree structure (what the kernels take instead of masks) ----------------------------

BITS = 32  # ancestor bits per int32 word


def pack_ancestors(visible_BxTxT: jax.Array) -> jax.Array:
  """int32[B, T, W]: the boolean visibility of tree keys packed 32 to a word."""
  b, t, _ = visible_BxTxT.shape
  w = -(-t // BITS)
  bits = jnp.pad(visible_BxTxT, ((0, 0), (0, 0), (0, w * BITS - t))).reshape(b, t, w, BITS)
  weights = jnp.left_shift(jnp.uint32(1), jnp.arange(BITS, dtype=jnp.uint32))
  return jnp.sum(bits.astype(jnp.uint32) * weights, axis=-1, dtype=jnp.uint32).view(jnp.int32)


def unpack_ancestors(ancestors_BxTxW: jax.Array, t: int) -> jax.Array:
  """bool[B, T, T]: the inverse of `pack_ancestors`."""
  key = jnp.arange(t)
  words = ancestors_BxTxW[:, :, key // BITS]  # [B, T, T]
  return ((words >> (key % BITS)) & 1) == 1


def prefix_mask(lengths_B: jax.Array, t: int, s: int) -> jax.Array:
  """bool[B, T, S]: every query sees the committed slots [0, lengths)."""
  return jnp.broadcast_to((jnp.arange(s)[None, :] < lengths_B[:, None])[:, None, :],
                          (lengths_B.shape[0], t, s))
