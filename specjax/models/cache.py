"""KVCache: preallocated per-layer key/value slots with one length per sequence.

Slots `[0, lengths[b])` hold the committed context of sequence b; everything past
`lengths[b]` is garbage by contract. A forward writes its T new entries at
`[lengths, lengths + T)` and leaves `lengths` alone: the caller then either `advance`s
(plain decoding) or `commit`s an accepted path out of a verified tree, which moves the
accepted entries into contiguous slots. Rejected entries simply stay past `lengths`.
Writes and commits touch only the slots they change (in place inside a jitted loop), so a
step's cost does not grow with the cache beyond attention's own read.

Keys and values are kept as one array per layer (not one stacked array): on XLA's CPU
backend an unrolled layer loop over separate buffers decodes ~2x faster than a scan
over a stacked cache (docs/design.md, "Layers unrolled, not scanned").
"""

from __future__ import annotations

import contextlib

import flax.struct
import jax
import jax.numpy as jnp

from specjax.kernels.attention import prefix_mask


_DEFERRED = [False]


@contextlib.contextmanager
def deferred_writes():
  """Inside, a cached forward does not write its new keys/values into the cache: the
  Forward's cache holds just those entries ([B, KVH, T, D] per layer), for the caller to
  write (`write`). The decode step verifies under a `lax.switch` over widths: a cache
  written inside a branch is copied whole every step, one written after the switch is
  updated in place."""
  _DEFERRED.append(True)
  try:
    yield
  finally:
    _DEFERRED.pop()


def writes_deferred() -> bool:
  return _DEFERRED[-1]


def write(cache_BxKxSxD: jax.Array, new_BxKxTxD: jax.Array, start_B: jax.Array) -> jax.Array:
  """Writes each sequence's T new entries at its own offset, slots [start, start + T).

  One scatter of B*T rows, declared sorted and unique, that drops writes past the last
  slot: inside the jitted loop XLA updates the cache in place. On this CPU (SmolLM2, AR
  decode) it beat both a masked select over every slot (which rewrites the whole cache:
  ~1.5x slower at batch 16) and a vmapped dynamic_update_slice (~1.3x slower at batch 1).
  """
  b, _, t, _ = new_BxKxTxD.shape
  slots_BxT = start_B[:, None] + jnp.arange(t)
  return cache_BxKxSxD.at[jnp.arange(b)[:, None], :, slots_BxT].set(
      new_BxKxTxD.transpose(0, 2, 1, 3).astype(cache_BxKxSxD.dtype), mode="drop",
      indices_are_sorted=True, unique_indices=True)


@flax.struct.dataclass
class KVCache:
  k: tuple  # num_layers x [B, KVH, S, Dh]
  v: tuple  # num_layers x [B, KVH, S, Dh]
  lengths: jax.Array  # int32[B]

  @classmethod
  def create(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int,
             head_dim: int, dtype=jnp.float32) -> "KVCache":
    shape = (batch, num_kv_heads, max_len, head_dim)
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               lengths=jnp.zeros((batch,), jnp.int32))

  @classmethod
  def for_config(cls, cfg, batch: int, max_len: int, dtype) -> "KVCache":
    """An empty cache shaped for a `ModelConfig`."""
    return cls.create(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)

  @property
  def max_len(self) -> int:
    return self.k[0].shape[2]

  def prefix_mask(self, t: int, pending_BxTxN: jax.Array | None = None) -> jax.Array:
    """bool[B, T, S]: the cache slots each of T new tokens sees: every committed slot, plus
    slot `lengths + n` when `pending_BxTxN[b, t, n]` (entries written past the committed
    ones by earlier forwards that are not committed yet, e.g. a draft tree's upper levels).
    """
    committed_BxTxS = prefix_mask(self.lengths, t, self.max_len)
    if pending_BxTxN is None:
      return committed_BxTxS
    rel_BxS = jnp.arange(self.max_len)[None, :] - self.lengths[:, None]  # index past lengths
    n = pending_BxTxN.shape[-1]
    pending_BxTxS = jnp.take_along_axis(
        jnp.broadcast_to(pending_BxTxN, (rel_BxS.shape[0], t, n)),
        jnp.broadcast_to(jnp.clip(rel_BxS, 0, n - 1)[:, None, :], committed_BxTxS.shape), axis=2)
    return committed_BxTxS | (((rel_BxS >= 0) & (rel_BxS < n))[:, None, :] & pending_BxTxS)

  def advance(self, n_B: jax.Array) -> "KVCache":
    """Marks the next n[b] written entries of each sequence as committed."""
    return self.replace(lengths=self.lengths + n_B.astype(jnp.int32))

  def commit(self, path_BxA: jax.Array, n_B: jax.Array) -> "KVCache":
    """Keeps the n[b] new entries at offsets path[b, :n[b]] (relative to `lengths`).

    The kept entries move to `[lengths, lengths + n)`; `path` must be increasing (tree
    nodes are stored parents first), so every source is read before it is overwritten.
    Only the A slots `[lengths, lengths + A)` are rewritten (slots past the kept ones get
    their old contents back).
    """
    a = path_BxA.shape[1]
    keep_BxA = jnp.arange(a)[None, :] < n_B[:, None]
    src_BxA = self.lengths[:, None] + jnp.where(keep_BxA, path_BxA, jnp.arange(a)[None, :])
    src_BxA = jnp.minimum(src_BxA, self.max_len - 1)

    def move(c_BxKxSxD):
      moved = jnp.take_along_axis(c_BxKxSxD, src_BxA[:, None, :, None], axis=2)
      return write(c_BxKxSxD, moved, self.lengths)

    return KVCache(k=tuple(move(c) for c in self.k), v=tuple(move(c) for c in self.v),
                   lengths=self.lengths + n_B.astype(jnp.int32))
