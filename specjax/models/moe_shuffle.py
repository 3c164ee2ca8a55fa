"""Speculative token shuffling (s-TS, Li et al. 2025, "Speculative MoE"): which device of
the expert axis each token is placed on before the expert all-to-all.

In the expert-parallel routed MoE (`moe_parallel`) every device of the expert axis holds
all of its data shard's tokens (the attention before it is not split over that axis), and
each device is the source of an equal share of them for the dispatch. Which share is free:
the plain placement takes contiguous slices; s-TS places a token on the device predicted to
hold its experts, so that its rows stay on the device (the local fast path) instead of
crossing it. A prediction only moves tokens between equal-sized shares, so the forward is
exact whatever its quality; a wrong one costs all-to-all rows.

Predictors (`Routed.shuffle`):
  "gate"      this layer's own routing, computed on every token before the split (possible
              here because the tokens are replicated over the expert axis; in the paper the
              placement is fused into the reduce-scatter after tensor-parallel attention,
              before the gate's input exists, hence its speculation);
  "previous"  the previous MoE layer's routing of the same token (the paper's inter-layer
              affinity): a real speculation, the first MoE layer of a forward keeps the
              plain placement.
"""

from __future__ import annotations

import contextvars

import jax
import jax.numpy as jnp


def preferred_devices(expert_NxK: jax.Array, weight_NxK: jax.Array, num_experts: int,
                      devices: int) -> jax.Array:
  """int32[N, R]: the devices (of `devices`, each holding num_experts / devices contiguous
  experts) holding each token's experts, by its routing weight on them, most first; -1
  past the devices it touches (R = min(K, D))."""
  per_device = num_experts // devices
  weight_NxD = jnp.sum(jax.nn.one_hot(expert_NxK // per_device, devices, dtype=jnp.float32) *
                       (weight_NxK[..., None].astype(jnp.float32) + 1e-30), axis=1)
  top_NxR, device_NxR = jax.lax.top_k(weight_NxD, min(expert_NxK.shape[-1], devices))
  return jnp.where(top_NxR > 0, device_NxR, -1).astype(jnp.int32)


def balanced_placement(prefer_SxR: jax.Array, devices: int) -> jax.Array:
  """int32[S]: the token in each slot (slot s is position s % L on device s // L, S = D * L)
  so that every device gets L tokens, as many as it can on their preferred devices.

  `prefer_SxR[t]` lists token t's devices, most preferred first (-1: none). Round r gives
  the tokens still unplaced their r-th device while it has free slots (in token order);
  the tokens left fill the free slots interleaved over the devices (position 0 of every
  device, then position 1, ...), so that no one device takes them all: their rows then
  spread over the (source, destination) pairs, whose largest count sets the capacity.
  Static shapes, O(R S log S)."""
  s, rounds = prefer_SxR.shape
  per_device = s // devices
  token_S = jnp.arange(s)
  slot_S = jnp.full((s,), -1, jnp.int32)
  free_D = jnp.full((devices,), per_device, jnp.int32)
  for r in range(rounds):
    key_S = jnp.where((slot_S < 0) & (prefer_SxR[:, r] >= 0), prefer_SxR[:, r], devices)
    order_S = jnp.argsort(key_S, stable=True)
    sorted_key_S = key_S[order_S]
    count_D = jnp.sum(jax.nn.one_hot(key_S, devices + 1, dtype=jnp.int32), axis=0)[:devices]
    start_D = jnp.concatenate([jnp.cumsum(count_D) - count_D, jnp.zeros((1,), jnp.int32)])
    rank_S = token_S - start_D[sorted_key_S]
    room_S = jnp.concatenate([free_D, jnp.zeros((1,), jnp.int32)])[sorted_key_S]
    take_S = (sorted_key_S < devices) & (rank_S < room_S)
    used_S = per_device - room_S
    new_S = jnp.where(take_S, sorted_key_S * per_device + used_S + rank_S, -1)
    slot_S = slot_S.at[order_S].max(new_S.astype(jnp.int32))
    free_D = free_D - jnp.minimum(count_D, free_D)
  pos_S, dev_S = token_S % per_device, token_S // per_device
  free_slot_S = pos_S >= per_device - free_D[dev_S]
  interleaved_S = jnp.argsort(jnp.where(free_slot_S, pos_S * devices + dev_S, s * devices + 1),
                              stable=True)  # the free slots first, interleaved
  left_S = slot_S < 0
  nth_S = jnp.cumsum(left_S) - 1
  slot_S = jnp.where(left_S, interleaved_S[jnp.clip(nth_S, 0, s - 1)], slot_S)
  return jnp.zeros((s,), jnp.int32).at[slot_S].set(token_S.astype(jnp.int32))


def identity_placement(s: int) -> jax.Array:
  """int32[S]: the plain placement, contiguous shares."""
  return jnp.arange(s, dtype=jnp.int32)


# ---- the previous MoE layer's routing, within one trace -----------------------------------

_PREVIOUS: contextvars.ContextVar = contextvars.ContextVar("moe_previous", default=None)


def remember(x_BxTxH: jax.Array, expert_BxTxK: jax.Array, weight_BxTxK: jax.Array) -> None:
  """Keeps this layer's routing of the tokens `x_BxTxH` for the next MoE layer of the same
  forward."""
  _PREVIOUS.set((x_BxTxH, expert_BxTxK, weight_BxTxK))


def recall(x_BxTxH: jax.Array):
  """The routing (experts, weights) `remember` kept, or None unless it was kept in the
  same trace as `x_BxTxH` (a routing from another program, or from inside a `lax.cond`
  branch the caller is outside of, is never used) for tokens of the same shape."""
  kept = _PREVIOUS.get()
  if kept is None:
    return None
  x, expert_BxTxK, weight_BxTxK = kept
  same_trace = getattr(x, "_trace", None) is getattr(x_BxTxH, "_trace", None)
  if not same_trace or x.shape != x_BxTxH.shape:
    return None
  return expert_BxTxK, weight_BxTxK

