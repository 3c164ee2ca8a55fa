"""Speculative expert grouping (s-EG, Li et al. 2025, "Speculative MoE"): experts often
picked together by the same token placed on the same device of the expert axis, chosen
offline from routing statistics of calibration tokens.

The grouping is a permutation of each MoE layer's expert axis applied to its weights and
to its router's columns at load time (`permuted`): the same network, exactly (a token picks
the same experts, now at other indices), whose routed forward (`moe_parallel`) sends a
token to fewer devices. The groups are balanced: D groups of E / D experts, chosen by
pairwise swaps that raise the co-occurrence inside groups less a penalty on uneven device
load (a hot device's traffic sets the capacity every pair needs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specjax.models import model as model_lib


def routing(model: model_lib.Model, tokens_BxT) -> dict[int, np.ndarray]:
  """{MoE layer: int[B * T, K] its experts for each token} of a causal forward over
  calibration tokens (the routing `llama.MoE` sows)."""
  cfg = model.config
  tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
  b, t = tokens_BxT.shape

  @jax.jit
  def run(params, tokens):
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    _, state = model_lib.module(cfg, model_lib.param_dtype(params)).apply(
        {"params": params}, tokens, positions, model_lib.causal(t), None,
        mutable=["intermediates"])
    return {int(k[7:]): v["mlp"]["routing"][0] for k, v in state["intermediates"].items()
            if k.startswith("layers_") and "routing" in v.get("mlp", {})}

  return {k: np.asarray(v) for k, v in run(model.params, tokens_BxT).items()}


def co_occurrence(expert_NxK: np.ndarray, num_experts: int) -> np.ndarray:
  """int[E, E]: how many tokens picked both experts (diagonal: how many picked each)."""
  onehot_NxE = np.zeros((expert_NxK.shape[0], num_experts), np.int64)
  np.put_along_axis(onehot_NxE, expert_NxK.astype(np.int64), 1, axis=1)
  return onehot_NxE.T @ onehot_NxE


def score(co_ExE: np.ndarray, group_E: np.ndarray, devices: int, balance: float = 1.0
          ) -> float:
  """What `group` raises: the co-occurrence of expert pairs inside groups (group_E[e]: the
  device of expert e) less `balance` * sum over devices of (load - mean)^2 / mean."""
  co = co_ExE.astype(np.float64)
  pick_E = np.diag(co)
  same = group_E[:, None] == group_E[None, :]
  load_D = np.bincount(group_E, weights=pick_E, minlength=devices)
  mean = max(pick_E.sum() / devices, 1.0)
  return (0.5 * (co - np.diag(pick_E))[same].sum() -
          balance * np.sum((load_D - mean) ** 2) / mean)


def group(co_ExE: np.ndarray, devices: int, balance: float = 1.0,
          max_swaps: int = 10_000) -> np.ndarray:
  """int[E]: a permutation of the experts, D contiguous groups of E / D (device d holds new
  indices [d * E / D, (d + 1) * E / D)), from pairwise swaps while one raises

    sum over groups of the co-occurrence of their expert pairs
    - balance * sum over devices of (load - mean load)^2 / mean load

  (load: the tokens' picks of a device's experts). Starts from the identity; deterministic."""
  e = co_ExE.shape[0]
  if e % devices:
    raise ValueError(f"{e} experts do not split into {devices} equal groups.")
  co = co_ExE.astype(np.float64)
  pick_E = np.diag(co).copy()
  pair = co - np.diag(pick_E)
  mean = max(pick_E.sum() / devices, 1.0)
  group_E = np.arange(e) // (e // devices)
  best = score(co_ExE, group_E, devices, balance)
  for _ in range(max_swaps):
    onehot_ExD = np.eye(devices)[group_E]
    to_group_ExD = pair @ onehot_ExD  # co-occurrence of each expert with each group
    ga, gb = group_E[:, None], group_E[None, :]
    own_E = to_group_ExD[np.arange(e), group_E]
    # a moves to b's group and b to a's: a's ties to b's group and b's to a's, less their
    # old ties and the a-b pair itself (split before and after)
    ties_ExE = to_group_ExD[:, group_E]  # [a, b]: a's ties to b's group
    gain_intra = (ties_ExE + ties_ExE.T - own_E[:, None] - own_E[None, :] - 2 * pair)
    load_D = np.bincount(group_E, weights=pick_E, minlength=devices)
    delta = pick_E[None, :] - pick_E[:, None]  # a's group gains f_b - f_a
    la, lb = load_D[group_E][:, None], load_D[group_E][None, :]
    gain_load = -balance * (((la + delta - mean) ** 2 + (lb - delta - mean) ** 2) -
                            ((la - mean) ** 2 + (lb - mean) ** 2)) / mean
    gain = np.where(ga != gb, gain_intra + gain_load, -np.inf)
    a, b = np.unravel_index(np.argmax(gain), gain.shape)
    if gain[a, b] <= 1e-9:
      break
    group_E[a], group_E[b] = group_E[b], group_E[a]
    new = score(co_ExE, group_E, devices, balance)
    if new <= best + 1e-9:  # numerical guard: undo a swap that did not help
      group_E[a], group_E[b] = group_E[b], group_E[a]
      break
    best = new
  return np.argsort(group_E, kind="stable").astype(np.int32)


def permuted(params: Any, perms: dict[int, np.ndarray]) -> Any:
  """The params with MoE layer i's expert axis permuted by perms[i] (new expert j is old
  expert perms[i][j]): its gate / up / down rows and its router's columns."""
  params = dict(params)
  for i, perm in perms.items():
    layer = dict(params[f"layers_{i}"])
    mlp = dict(layer["mlp"])
    for name in ("gate", "up", "down"):
      mlp[name] = jnp.take(mlp[name], jnp.asarray(perm), axis=0)
    mlp["router"] = jnp.take(mlp["router"], jnp.asarray(perm), axis=1)
    layer["mlp"] = mlp
    params[f"layers_{i}"] = layer
  return params


def grouped(model: model_lib.Model, tokens_BxT, devices: int, balance: float = 1.0
            ) -> tuple[model_lib.Model, dict[int, np.ndarray]]:
  """(the model with its experts grouped for `devices` devices, the permutation of each
  MoE layer) from the routing of calibration tokens."""
  cfg = model.config
  if not cfg.num_experts:
    raise ValueError("Expert grouping needs a mixture-of-experts target; this one has none.")
  if cfg.num_experts % devices:
    raise ValueError(f"{cfg.num_experts} experts do not split over {devices} devices.")
  perms = {i: group(co_occurrence(r, cfg.num_experts), devices, balance)
           for i, r in routing(model, tokens_BxT).items()}
  return dataclasses.replace(model, params=permuted(model.params, perms),
                             name=f"{model.name}@grouped{devices}"), perms
