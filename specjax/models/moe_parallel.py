"""Expert-parallel routed MoE: each device of the `expert` mesh axis holds E / D experts,
and tokens travel to the devices holding their top-k experts by `jax.lax.all_to_all`
inside `jax.shard_map`, and back.

`llama.MoE` takes this form when the active plan has `moe=Routed(...)` (`sharding.Plan`);
without it the dense form runs, unchanged. Per MoE layer, on every device (data shard d,
expert shard e):

  1. the routing of all the data shard's N tokens (replicated over the expert axis, as the
     attention before it is; computed inside the shard_map, so the partitioner gathers
     nothing), and their placement: device e is the source of L = N / D of them
     (contiguous shares, or the shares speculative token shuffling picks: `moe_shuffle`);
  2. per (token, device) one row at most (de-duplicated: a token with two experts on one
     device is sent once, with its weights for that device's experts): rows for this
     device run here (the local fast path, no communication); rows for device j != e go
     into slot c < C of block j of a [D, C, H] send buffer (C = `capacity_factor` * L);
  3. all_to_all of the buffer (and of each row's [El] routing weights), the local experts
     on the rows received, all_to_all of the results back, the weighted sum per token;
  4. rows past C (only when C < L): `overflow="exact"` sends them in a second all-to-all of
     full capacity that runs (under `lax.cond`) only when some device overflowed, so the
     forward stays exact; `overflow="drop"` drops them (counted);
  5. all_gather of the L outputs over the expert axis, un-shuffled to token order.

With C = L no row can overflow (a token has at most one row per device), so every setting
is exact; a smaller C shrinks the compiled all-to-all by C / L, and pays off when the
placement keeps most rows local (s-TS) and experts picked together share a device (s-EG,
`moe_grouping`). Counts per layer (rows that crossed devices, rows kept local, overflow,
the largest per-pair demand) are sown as "intermediates" / "moe_stats" (`dispatch_stats`).

The experts run dense over a device's E / D experts on every row it computes (static
shapes, as the dense form): the MLP work is not the routed ideal of k / E per token; what
this form changes is the communication, which `collective_bytes` reads off the compiled
program.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from specjax.models import moe_shuffle

SHUFFLES = ("none", "gate", "previous")
OVERFLOWS = ("exact", "drop")


@dataclasses.dataclass(frozen=True)
class Routed:
  """The routed expert-parallel MoE forward's settings (`sharding.Plan.moe`). Hashable:
  part of the plan, a static argument of the programs."""

  capacity_factor: float = 1.0  # remote rows per (source, destination) pair, / L
  shuffle: str = "none"  # speculative token shuffling's predictor (`moe_shuffle`)
  overflow: str = "exact"

  def __post_init__(self):
    if self.shuffle not in SHUFFLES:
      raise ValueError(f"Routed MoE shuffle {self.shuffle!r}: expected one of {SHUFFLES}.")
    if self.overflow not in OVERFLOWS:
      raise ValueError(f"Routed MoE overflow {self.overflow!r}: expected one of "
                       f"{OVERFLOWS}.")
    if not 0 < self.capacity_factor <= 1:
      raise ValueError(f"Routed MoE capacity_factor must be in (0, 1] (1: every local token "
                       f"fits, nothing overflows); got {self.capacity_factor}.")


def capacity(per_device: int, factor: float) -> int:
  """Rows per (source, destination) pair: ceil(factor * L), at least 1, at most L."""
  return max(1, min(per_device, math.ceil(factor * per_device - 1e-9)))


def expert_axis(plan, num_experts: int) -> tuple[str, int]:
  """(the mesh axis the experts split over, its size D); ValueError unless the plan maps
  the "experts" logical axis to one mesh axis that divides `num_experts` and that the
  batch does not split over."""
  axes = plan.spec(("experts",))[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  if len(axes) != 1:
    raise ValueError(f"The routed MoE needs the experts on exactly one mesh axis; plan "
                     f"{plan.name} maps them to {axes or 'none'} (add e.g. expert=4 to the "
                     "mesh).")
  ax = axes[0]
  d = plan.mesh.shape[ax]
  if num_experts % d:
    raise ValueError(f"{num_experts} experts do not split over mesh axis {ax!r} of size "
                     f"{d}; use an expert axis size that divides {num_experts}.")
  batch = plan.spec(("batch",))[0]
  if ax in ((batch,) if isinstance(batch, str) else tuple(batch or ())):
    raise ValueError(f"The routed MoE shares the tokens of a data shard over mesh axis "
                     f"{ax!r}, which the batch splits over in plan {plan.name}; map "
                     "'batch' to other axes.")
  return ax, d


def experts_mlp(x_RxH, w_RxE, gate_ExHxF, up_ExHxF, down_ExFxH):
  """[R, H]: sum_e w[r, e] * expert_e(x_r) over these experts (every expert on every row,
  as `llama.MoE`'s dense form; w is 0 off a row's experts)."""
  hidden_ExRxF = nn.silu(jnp.einsum("rh,ehf->erf", x_RxH, gate_ExHxF)) * jnp.einsum(
      "rh,ehf->erf", x_RxH, up_ExHxF)
  out_ExRxH = jnp.einsum("erf,efh->erh", hidden_ExRxF, down_ExFxH)
  return jnp.einsum("re,erh->rh", w_RxE.astype(out_ExRxH.dtype), out_ExRxH)


def _exchange(ax, x_LxH, w_LxDxEl, send_LxD, pos_LxD, c, weights):
  """The rows `send_LxD` marks (row of token t for device j at slot pos[t, j] < c) sent by
  all_to_all, run through the local experts there, and returned: [L, H], the sum over
  devices of each token's returned rows."""
  d = send_LxD.shape[1]
  l, h = x_LxH.shape
  el = w_LxDxEl.shape[-1]
  dev_LxD = jnp.broadcast_to(jnp.arange(d), (l, d))
  slot_LxD = jnp.where(send_LxD, pos_LxD, c)  # c: out of bounds, dropped by the scatter
  rows_LxDxH = jnp.broadcast_to(x_LxH[:, None], (l, d, h))
  send_x_DxCxH = jnp.zeros((d, c, h), x_LxH.dtype).at[dev_LxD, slot_LxD].set(
      rows_LxDxH, mode="drop")
  send_w_DxCxEl = jnp.zeros((d, c, el), x_LxH.dtype).at[dev_LxD, slot_LxD].set(
      w_LxDxEl.astype(x_LxH.dtype), mode="drop")
  recv_x_DxCxH = jax.lax.all_to_all(send_x_DxCxH, ax, 0, 0)
  recv_w_DxCxEl = jax.lax.all_to_all(send_w_DxCxEl, ax, 0, 0)
  y_DxCxH = experts_mlp(recv_x_DxCxH.reshape(d * c, h), recv_w_DxCxEl.reshape(d * c, el),
                        *weights).reshape(d, c, h).astype(x_LxH.dtype)
  back_DxCxH = jax.lax.all_to_all(y_DxCxH, ax, 0, 0)
  got_LxDxH = back_DxCxH[dev_LxD, jnp.clip(slot_LxD, 0, c - 1)]
  return jnp.sum(jnp.where(send_LxD[..., None], got_LxDxH, 0), axis=1)


def dispatch(plan, opts: Routed, route, x_BxTxH, router_HxE, gate_ExHxF, up_ExHxF,
             down_ExFxH, previous=None) -> tuple[jax.Array, dict, tuple]:
  """The routed MoE output [B, T, H], the layer's dispatch counts (summed over the mesh)
  and its routing (experts, weights: [B, T, K] each). `route(router, x_NxH)` routes, on
  each device, its data shard's tokens; `previous` is the previous MoE layer's routing
  (for `shuffle="previous"`; None: contiguous shares)."""
  e = gate_ExHxF.shape[0]
  ax, d = expert_axis(plan, e)
  el = e // d
  batch = plan.spec(("batch",))[0]
  batch_axes = (batch,) if isinstance(batch, str) else tuple(batch or ())
  sum_axes = (ax,) + tuple(a for a in plan.mesh.axis_names if a in batch_axes)
  b, t, h = x_BxTxH.shape
  if previous is None:
    previous = (jnp.zeros((b, t, 0), jnp.int32), jnp.zeros((b, t, 0), jnp.float32))

  def per_device(x_BxTxH, router, previous, gate, up, down):
    n = x_BxTxH.shape[0] * x_BxTxH.shape[1]
    l = -(-n // d)
    s, c = d * l, capacity(l, opts.capacity_factor)
    expert_NxK, weight_NxK = route(router, x_BxTxH.reshape(n, h))
    k = expert_NxK.shape[-1]
    if opts.shuffle == "gate":
      prefer_NxR = moe_shuffle.preferred_devices(expert_NxK, weight_NxK, e, d)
    elif previous[0].shape[-1]:
      prefer_NxR = moe_shuffle.preferred_devices(previous[0].reshape(n, -1),
                                                 previous[1].reshape(n, -1), e, d)
    else:
      prefer_NxR = None
    pad = lambda a, v: jnp.concatenate([a, jnp.full((s - n,) + a.shape[1:], v, a.dtype)])
    x_SxH, expert_SxK = pad(x_BxTxH.reshape(n, h), 0), pad(expert_NxK, 0)
    weight_SxK = pad(weight_NxK, 0)
    valid_S = jnp.arange(s) < n
    if prefer_NxR is None:
      token_of_slot_S = moe_shuffle.identity_placement(s)
    else:
      token_of_slot_S = moe_shuffle.balanced_placement(pad(prefer_NxR, -1), d)
    me = jax.lax.axis_index(ax)
    mine_L = jax.lax.dynamic_slice_in_dim(token_of_slot_S, me * l, l)
    x_LxH, valid_L = x_SxH[mine_L], valid_S[mine_L]
    onehot_LxKxE = jax.nn.one_hot(expert_SxK[mine_L], e, dtype=jnp.float32)
    w_LxDxEl = jnp.sum(onehot_LxKxE * weight_SxK[mine_L][..., None].astype(jnp.float32),
                       1).reshape(l, d, el)
    want_LxD = jnp.any(jnp.sum(onehot_LxKxE, 1).reshape(l, d, el) > 0, -1) & valid_L[:, None]
    is_me_D = jnp.arange(d) == me
    remote_LxD = want_LxD & ~is_me_D
    pos_LxD = jnp.cumsum(remote_LxD, axis=0) - 1
    fits_LxD = remote_LxD & (pos_LxD < c)
    over_LxD = remote_LxD & ~fits_LxD
    weights = (gate, up, down)
    w_local_LxEl = jax.lax.dynamic_index_in_dim(w_LxDxEl, me, axis=1, keepdims=False)
    y_LxH = experts_mlp(x_LxH, w_local_LxEl, *weights).astype(x_LxH.dtype)
    y_LxH = y_LxH + _exchange(ax, x_LxH, w_LxDxEl, fits_LxD, pos_LxD, c, weights)
    total = lambda v: jax.lax.psum(jnp.sum(v.astype(jnp.int32)), sum_axes)
    overflow = total(over_LxD)
    if c < l and opts.overflow == "exact":
      over_pos_LxD = jnp.cumsum(over_LxD, axis=0) - 1
      y_LxH = y_LxH + jax.lax.cond(
          overflow > 0,
          lambda: _exchange(ax, x_LxH, w_LxDxEl, over_LxD, over_pos_LxD, l, weights),
          lambda: jnp.zeros_like(x_LxH))
    y_SxH = jax.lax.all_gather(y_LxH, ax, tiled=True)
    slot_of_token_S = jnp.zeros((s,), jnp.int32).at[token_of_slot_S].set(
        jnp.arange(s, dtype=jnp.int32))
    y_BxTxH = y_SxH[slot_of_token_S[:n]].reshape(x_BxTxH.shape)
    stats = {"tokens": total(valid_L), "local_rows": total(want_LxD & is_me_D),
             "remote_rows": total(remote_LxD), "overflow_rows": overflow,
             "dropped_rows": overflow if opts.overflow == "drop" and c < l else overflow * 0,
             "tokens_all_local": total(valid_L & ~jnp.any(remote_LxD, -1)),
             "max_pair_rows": jax.lax.pmax(jnp.max(jnp.sum(remote_LxD, axis=0)), sum_axes),
             "per_device": jnp.int32(l), "capacity": jnp.int32(c)}
    routing = (expert_NxK.reshape(x_BxTxH.shape[:2] + (k,)),
               weight_NxK.reshape(x_BxTxH.shape[:2] + (k,)))
    return y_BxTxH, stats, routing

  tok = P(batch, None, None)
  w_spec = P(ax, None, None)
  return jax.shard_map(
      per_device, mesh=plan.mesh,
      in_specs=(tok, P(), (tok, tok), w_spec, w_spec, w_spec),
      out_specs=(tok, P(), (tok, tok)), check_vma=False)(
          x_BxTxH, router_HxE, previous, gate_ExHxF, up_ExHxF, down_ExFxH)


def layer(module: nn.Module, plan, route, x, router_HxE, gate_ExHxF, up_ExHxF, down_ExFxH):
  """`llama.MoE`'s routed form (`route(router, x_NxH)` its routing): the dispatch, with
  the previous MoE layer's routing for `shuffle="previous"`; the routing sown as
  "intermediates" / "routing" and the counts as "moe_stats"."""
  opts: Routed = plan.moe
  x_BxTxH = x.reshape(x.shape[0], -1, x.shape[-1])
  previous = None
  if opts.shuffle == "previous":
    first = getattr(module.parent, "layer", None) == min(module.cfg.moe_layers)
    previous = None if first else moe_shuffle.recall(x_BxTxH)
  y, stats, (expert_BxTxK, weight_BxTxK) = dispatch(
      plan, opts, route, x_BxTxH, router_HxE, gate_ExHxF, up_ExHxF, down_ExFxH, previous)
  if opts.shuffle == "previous":
    moe_shuffle.remember(x_BxTxH, expert_BxTxK, weight_BxTxK)
  module.sow("intermediates", "routing", expert_BxTxK.reshape(-1, expert_BxTxK.shape[-1]))
  module.sow("intermediates", "moe_stats", stats)
  return y.reshape(x.shape).astype(x.dtype)


# ---- reading the compiled program ---------------------------------------------------------

_COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter",
                "collective-permute")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"main": bytes, "conditional": bytes}} of the collectives of a compiled
  (per-device, SPMD-partitioned) HLO module: the sum of each op's result shapes (an
  all-to-all's result is its operands, re-split). "conditional" counts the ops inside a
  `lax.cond` branch (the routed MoE's overflow exchange), which run only when taken."""
  out = {op: {"main": 0, "conditional": 0} for op in _COLLECTIVES}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(ROOT\s+)?%\S+\s*=\s*(.*?)\s(" + "|".join(_COLLECTIVES) +
                 r")(-start)?\(", line)
    if not m:
      continue
    size = sum(_BYTES[t] * math.prod(int(v) for v in dims.split(",") if v)
               for t, dims in _SHAPE.findall(m.group(2)))
    where = "conditional" if re.search(r'op_name="[^"]*/cond/', line) else "main"
    out[m.group(3)][where] += size
  return out


def dispatch_stats(intermediates: Any) -> list[dict[str, int]]:
  """The routed MoE's per-layer counts from a forward's sown intermediates
  (`module.apply(..., mutable=["intermediates"])`), in layer order."""
  rows = []
  flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
  layers: dict[int, dict] = {}
  for path, leaf in flat:
    keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
    if "moe_stats" not in keys:
      continue
    layer = next(int(str(k)[7:]) for k in keys if str(k).startswith("layers_"))
    layers.setdefault(layer, {})[str(keys[-1])] = int(leaf)
  for layer in sorted(layers):
    rows.append({"layer": layer, **layers[layer]})
  return rows
