"""Partial KV caches: a bounded subset of a cache's committed slots, and how to pick it.

At long context, attention's read of the KV cache dominates a decode step. Methods that
attend over part of the context (partial-KV self-drafting: MagicDec, TriForce; SpecPV's
partial verification) gather the slots they keep, attention sinks, a recent window and
retrieved blocks, into a compact cache whose shape does not depend on the context.
Gathered keys keep the rotary phase of their true positions, so new tokens run at their
own positions and see the kept context at the right distances.

Retrieval follows Quest (Tang et al. 2024): a block of `block` consecutive keys is
summarised by its element-wise min and max, and q . k <= sum_d max(q_d min_d, q_d max_d)
bounds the attention logit of any key in it; the blocks with the highest bound are kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specjax.models.cache import KVCache


def gather(cache: KVCache, src_BxJ: jax.Array, room: int = 0) -> KVCache:
  """The J slots `src_BxJ` of every layer of `cache` (clipped to it), then `room` empty
  slots for new entries; `lengths` = J."""
  src_BxJ = jnp.clip(src_BxJ, 0, cache.max_len - 1)
  pad = ((0, 0), (0, 0), (0, room), (0, 0))

  def take(x_BxKxSxD):
    return jnp.pad(jnp.take_along_axis(x_BxKxSxD, src_BxJ[:, None, :, None], axis=2), pad)
  b, j = src_BxJ.shape
  return KVCache(tuple(take(k) for k in cache.k), tuple(take(v) for v in cache.v),
                 jnp.full((b,), j, jnp.int32))


def sinks_and_window(lengths_B: jax.Array, sinks: int, window: int
                     ) -> tuple[jax.Array, jax.Array]:
  """(int32[B, sinks + window] slots, bool[B, sinks + window] valid): the first `sinks`
  committed slots, then the last `window`; each committed slot is valid once."""
  j = jnp.arange(sinks + window)[None, :]
  src_BxJ = jnp.where(j < sinks, j, lengths_B[:, None] - window + (j - sinks))
  valid_BxJ = (src_BxJ >= 0) & (src_BxJ < lengths_B[:, None]) & ((j < sinks) |
                                                                  (src_BxJ >= sinks))
  return src_BxJ, valid_BxJ


def block_slots(blocks_BxK: jax.Array, valid_BxK: jax.Array, block: int, lo: int,
                hi_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(int32[B, K * block] slots, bool valid) of K blocks of `block` slots; a slot is valid
  when its block is and it lies in [lo, hi[b]) (what sinks and a window do not hold)."""
  src_BxKxG = blocks_BxK[:, :, None] * block + jnp.arange(block)
  valid_BxKxG = valid_BxK[:, :, None] & (src_BxKxG >= lo) & (src_BxKxG < hi_B[:, None, None])
  b = blocks_BxK.shape[0]
  return src_BxKxG.reshape(b, -1), valid_BxKxG.reshape(b, -1)


def block_bounds(q_BxHxD: jax.Array, k_BxKxSxD: jax.Array, lengths_B: jax.Array,
                 block: int) -> jax.Array:
  """float32[B, S // block]: Quest's upper bound on q . k over each block's committed keys,
  summed over the query heads (one selection serves every head and layer). Blocks with no
  committed key score -inf."""
  b, kvh, s, d = k_BxKxSxD.shape
  nb = s // block
  k_BxKxNxGxD = k_BxKxSxD[:, :, :nb * block].reshape(b, kvh, nb, block, d).astype(jnp.float32)
  seen_BxNxG = (jnp.arange(nb * block).reshape(nb, block)[None] < lengths_B[:, None, None])
  seen = seen_BxNxG[:, None, :, :, None]
  kmin_BxKxNxD = jnp.min(jnp.where(seen, k_BxKxNxGxD, jnp.inf), 3)
  kmax_BxKxNxD = jnp.max(jnp.where(seen, k_BxKxNxGxD, -jnp.inf), 3)
  q_BxKxGxD = q_BxHxD.reshape(b, kvh, -1, d).astype(jnp.float32)
  lo = q_BxKxGxD[:, :, :, None, :] * jnp.where(jnp.isfinite(kmin_BxKxNxD), kmin_BxKxNxD,
                                               0)[:, :, None]
  hi = q_BxKxGxD[:, :, :, None, :] * jnp.where(jnp.isfinite(kmax_BxKxNxD), kmax_BxKxNxD,
                                               0)[:, :, None]
  bound_BxN = jnp.sum(jnp.maximum(lo, hi), axis=(1, 2, 4))
  return jnp.where(seen_BxNxG.any(-1), bound_BxN, -jnp.inf)


def select_blocks(bound_BxN: jax.Array, eligible_BxN: jax.Array, k: int
                  ) -> tuple[jax.Array, jax.Array]:
  """(int32[B, k] block ids, bool[B, k] valid): the k eligible blocks of highest bound
  (fewer are valid when fewer are eligible)."""
  score = jnp.where(eligible_BxN, bound_BxN, -jnp.inf)
  top, ids = jax.lax.top_k(score, min(k, score.shape[-1]))
  pad = k - ids.shape[-1]
  ids = jnp.pad(ids, ((0, 0), (0, pad))).astype(jnp.int32)
  return ids, jnp.pad(jnp.isfinite(top), ((0, 0), (0, pad)))
