"""KVCache: preallocated per-layer key/value slots with one length per sequence.

Slots `[0, lengths[b])` hold the committed context of sequence b; everything past
`lengths[b]` is garbage by contract. A forward writes its T new entries at
`[lengths, lengths + T)` and leaves `lengths` alone: the caller then either `advance`s
(plain decoding) or `commit`s an accepted path out of a verified tree, which moves the
accepted entries into contiguous slots. Rejected entries simply stay past `lengths`.
Writes and commits touch only the slots they change (in place inside a jitted loop), so a
step's cost does not grow with the cache beyond attention's own read.

A target with Mamba-2 layers (`models.ssm`) keeps keys/values for its attention layers
only, and one recurrent `SSMState` per mixer layer (`ssm`): a forward leaves the committed
state alone and hands back its per-token ingredients (`Pending`); `commit` / `advance`
move the state to the accepted path's last token, as they move keys/values.

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
from specjax.models import ssm as ssm_lib


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
  k: tuple  # per layer with attention (all of a transformer's): [B, KVH, S, Dh]
  v: tuple  # likewise
  lengths: jax.Array  # int32[B]
  ssm: tuple = ()  # one `ssm.SSMState` per Mamba-2 layer (none for a transformer)
  # Slots per sequence when there is no attention layer to read them from (Mamba-2).
  slots: int = flax.struct.field(pytree_node=False, default=0)

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
    if not cfg.state_layers:
      return cls.create(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype)
    kv = cls.create(len(cfg.attention_layers), batch, max_len, cfg.num_kv_heads, cfg.head_dim,
                    dtype)
    return kv.replace(ssm=tuple(ssm_lib.init_state(cfg, batch, dtype) for _ in cfg.state_layers),
                      slots=max_len)

  @property
  def max_len(self) -> int:
    return self.k[0].shape[2] if self.k else self.slots

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
    """Marks the next n[b] written entries of each sequence as committed (recurrent states:
    the state after the last forward's first n[b] tokens, a chain)."""
    return self.replace(lengths=self.lengths + n_B.astype(jnp.int32),
                        ssm=tuple(ssm_lib.advance(s, n_B) for s in self.ssm))

  def pad_pending(self, width: int) -> "KVCache":
    """Recurrent states' pending ingredients padded to `width` tokens (`ssm.pad`)."""
    return self.replace(ssm=tuple(ssm_lib.pad(s, width) for s in self.ssm))

  def commit(self, path_BxA: jax.Array, n_B: jax.Array) -> "KVCache":
    """Keeps the n[b] new entries at offsets path[b, :n[b]] (relative to `lengths`).

    The kept entries move to `[lengths, lengths + n)`; `path` must be increasing (tree
    nodes are stored parents first), so every source is read before it is overwritten.
    Only the A slots `[lengths, lengths + A)` are rewritten (slots past the kept ones get
    their old contents back). A recurrent state becomes the one after new entry
    path[b, n[b] - 1] (`ssm.commit`).
    """
    a = path_BxA.shape[1]
    keep_BxA = jnp.arange(a)[None, :] < n_B[:, None]
    src_BxA = self.lengths[:, None] + jnp.where(keep_BxA, path_BxA, jnp.arange(a)[None, :])
    src_BxA = jnp.minimum(src_BxA, self.max_len - 1)

    def move(c_BxKxSxD):
      moved = jnp.take_along_axis(c_BxKxSxD, src_BxA[:, None, :, None], axis=2)
      return write(c_BxKxSxD, moved, self.lengths)

    return self.replace(k=tuple(move(c) for c in self.k), v=tuple(move(c) for c in self.v),
                        lengths=self.lengths + n_B.astype(jnp.int32),
                        ssm=tuple(ssm_lib.commit(s, path_BxA, n_B) for s in self.ssm))
