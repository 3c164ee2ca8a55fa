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


def preferred_device(expert_NxK: jax.Array, weight_NxK: jax.Array, num_experts: int,
                     devices: int) -> jax.Array:
  """int32[N]: the device (of `devices`, each holding num_experts / devices contiguous
  experts) holding the largest share of each token's routing weight."""
  per_device = num_experts // devices
  weight_NxD = jnp.sum(jax.nn.one_hot(expert_NxK // per_device, devices, dtype=jnp.float32) *
                       weight_NxK[..., None].astype(jnp.float32), axis=1)
  return jnp.argmax(weight_NxD, axis=-1).astype(jnp.int32)


def balanced_placement(prefer_S: jax.Array, devices: int) -> jax.Array:
  """int32[S]: the token in each slot (slot s is position s % L on device s // L, S = D * L)
  so that every device gets L tokens, as many as possible on their preferred device.

  `prefer_S[t]` is in [0, D), or -1 for no preference (padding). Tokens of each preference
  take that device's slots in index order up to L; the rest fill the free slots in order.
  Static shapes, O(S log S)."""
  s = prefer_S.shape[0]
  per_device = s // devices
  key_S = jnp.where(prefer_S >= 0, prefer_S, devices)
  order_S = jnp.argsort(key_S, stable=True)
  sorted_key_S = key_S[order_S]
  count_D = jnp.sum(jax.nn.one_hot(key_S, devices + 1, dtype=jnp.int32), axis=0)[:devices]
  start_D = jnp.cumsum(count_D) - count_D
  rank_S = jnp.arange(s) - jnp.concatenate([start_D, jnp.array([0])])[sorted_key_S]
  kept_S = (sorted_key_S < devices) & (rank_S < per_device)
  fill_D = jnp.minimum(count_D, per_device)
  slot_S = jnp.arange(s)
  free_S = (slot_S % per_device) >= fill_D[slot_S // per_device]
  free_list_S = jnp.argsort(~free_S, stable=True)  # the free slots first, ascending
  nth_spill_S = jnp.cumsum(~kept_S) - 1
  dest_S = jnp.where(kept_S, sorted_key_S * per_device + rank_S,
                     free_list_S[jnp.clip(nth_spill_S, 0, s - 1)])
  return jnp.zeros((s,), jnp.int32).at[dest_S].set(order_S.astype(jnp.int32))


def identity_placement(s: int) -> jax.Array:
  """int32[S]: the plain placement, contiguous shares."""
  return jnp.arange(s, dtype=jnp.int32)


# ---- the previous MoE layer's routing, within one trace -----------------------------------

_PREVIOUS: contextvars.ContextVar = contextvars.ContextVar("moe_previous", default=None)


def remember(expert_NxK: jax.Array, weight_NxK: jax.Array) -> None:
  """Keeps this layer's routing for the next MoE layer of the same forward."""
  _PREVIOUS.set((expert_NxK, weight_NxK))


def recall(like_NxK: jax.Array):
  """The routing `remember` kept, or None unless it was traced in the same trace as
  `like_NxK` (a routing from another program, or from inside a `lax.cond` branch the
  caller is outside of, is never used) with the same shape."""
  kept = _PREVIOUS.get()
  if kept is None:
    return None
  expert_NxK, _ = kept
  same_trace = getattr(expert_NxK, "_trace", None) is getattr(like_NxK, "_trace", None)
  if not same_trace or expert_NxK.shape != like_NxK.shape:
    return None
  return kept


def forget() -> None:
  _PREVIOUS.set(None)
