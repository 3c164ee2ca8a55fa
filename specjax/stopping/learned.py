"""Learned stop policies: SpecDec++'s acceptance head and a PACER-style block verifier.

Both read the drafter's hidden state at each node (`DraftTree.hidden`: what the stop hook
receives; the node's token is already read into it) and train on the labels the target's
verification gives (`verify.acceptance_probs`, recorded by `generate(trace=True)`). Inputs
are RMS-normalised without a learned scale: drafters' hidden states differ in scale (a
target-level feature for EAGLE, a packed LSTM state for Falcon), and the predictor should
not have to learn that first.

SpecDec++ (Huang et al. 2024): a ResBlock and a linear layer give P(node accepted | its
parent accepted); the policy keeps the product down the path and stops once
1 - P(all accepted) > threshold, within [min_len, the drafter's size]. One logit with a
sigmoid stands in for the paper's two-way softmax (the same family). Trained with BCE on
soft labels, rejections weighted `reject_weight` (6 in the paper).

PACER (Zhang et al. 2025) publishes no internals; this is our design. Each node's hidden
state is projected to `dim` features and kept per node down the path (a window of the last
`block` nodes). When a node closes a block (depth a multiple of `block`), one
self-attention layer with learned block positions runs over the block's `block` vectors
(causal, pre-norm, residual, a GELU MLP), the last position's output gives
P(every token of the block is accepted | the previous blocks were), and a score under
`threshold` stops drafting below that node. The block itself is still verified: it was
drafted already. Labels are the product of the block's node labels. Attention over the
block lets the score see agreement between consecutive drafts, which a per-node head
cannot.

A policy changes only how much is drafted, never what is accepted, so greedy output stays
identical to AR.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import safetensors.numpy

from specjax import assets, registry
from specjax.stopping.training_free import static

FORMAT = "specjax-stop-predictor-v1"
META, PARAMS = "predictor.json", "params.safetensors"


def _rms(x):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def _dense(key, n_in: int, n_out: int, scale: float = 1.0) -> dict:
  return {"kernel": scale * jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in),
          "bias": jnp.zeros((n_out,))}


def _apply(p: dict, x):
  return x @ p["kernel"] + p["bias"]


# --- SpecDec++ ------------------------------------------------------------------------------

def specdecpp_init(key, hidden_size: int) -> dict:
  """ResBlock (identity at init: a zero kernel) and the acceptance logit."""
  return {"res": {"kernel": jnp.zeros((hidden_size, hidden_size)),
                  "bias": jnp.zeros((hidden_size,))},
          "out": _dense(key, hidden_size, 1, 0.1)}


def specdecpp_logit(params: dict, hidden_xH) -> jax.Array:
  """The acceptance logit of each node from its hidden state [..., H] -> [...]."""
  x = _rms(hidden_xH)
  x = x + jax.nn.silu(_apply(params["res"], x))
  return _apply(params["out"], x)[..., 0]


@flax.struct.dataclass
class SpecDecPP:
  """Stop when the predicted P(some drafted token is rejected) exceeds `threshold`."""

  params: Any
  threshold: float = static(0.3)
  min_len: int = static(2)
  drafter: str = static("")  # what it was trained on (`drafter_id`); "" = not checked

  def check(self, drafter) -> None:
    _check_drafter(self.drafter, drafter)

  def init(self, batch):
    return jnp.ones((batch, 1), jnp.float32)  # P(every node so far accepted); root: 1

  def stop(self, state, depth, q_BxKxV, hidden_BxKxH):
    del q_BxKxV
    _check_width("SpecDec++", self.params["res"]["kernel"].shape[0], self.drafter,
                 hidden_BxKxH)
    p_BxK = jax.nn.sigmoid(specdecpp_logit(self.params, hidden_BxKxH))
    state = state * jnp.where(depth > 0, p_BxK, 1.0)  # the root is committed
    return (depth >= self.min_len) & (1.0 - state > self.threshold), state


# --- PACER ----------------------------------------------------------------------------------

def pacer_init(key, hidden_size: int, block: int, dim: int = 64) -> dict:
  ks = jax.random.split(key, 6)
  return {"proj": _dense(ks[0], hidden_size, dim), "pos": 0.02 * jax.random.normal(
      ks[1], (block, dim)),
          "qkv": _dense(ks[2], dim, 3 * dim), "o": _dense(ks[3], dim, dim, 0.5),
          "mlp_in": _dense(ks[4], dim, 4 * dim), "mlp_out": _dense(ks[5], 4 * dim, dim, 0.5),
          "out": {"kernel": jnp.zeros((dim, 1)), "bias": jnp.zeros((1,))}}


def pacer_project(params: dict, hidden_xH) -> jax.Array:
  """A node's vector [..., dim]: what the window keeps."""
  return _apply(params["proj"], _rms(hidden_xH))


def pacer_logit(params: dict, window_xBxD) -> jax.Array:
  """P(block accepted) logit from its `block` node vectors [..., block, dim] -> [...]."""
  x = window_xBxD + params["pos"]
  n, d = x.shape[-2:]
  q, k, v = jnp.split(_apply(params["qkv"], _rms(x)), 3, -1)
  att = jnp.einsum("...id,...jd->...ij", q, k) / math.sqrt(d)
  att = jnp.where(jnp.tril(jnp.ones((n, n), bool)), att, -jnp.inf)
  x = x + _apply(params["o"], jnp.einsum("...ij,...jd->...id", jax.nn.softmax(att, -1), v))
  x = x + _apply(params["mlp_out"], jax.nn.gelu(_apply(params["mlp_in"], _rms(x))))
  return _apply(params["out"], _rms(x[..., -1, :]))[..., 0]


def pacer_logit_from_hidden(params: dict, hidden_xBxH) -> jax.Array:
  """The block logit from the block's hidden states [..., block, H] (training's view)."""
  return pacer_logit(params, pacer_project(params, hidden_xBxH))


@flax.struct.dataclass
class Pacer:
  """Stop below a node that closes a block the pre-verifier scores under `threshold`."""

  params: Any
  block: int = static(4)
  threshold: float = static(0.5)
  drafter: str = static("")  # what it was trained on (`drafter_id`); "" = not checked

  def check(self, drafter) -> None:
    _check_drafter(self.drafter, drafter)

  def init(self, batch):
    dim = self.params["pos"].shape[-1]
    return jnp.zeros((batch, 1, self.block, dim), jnp.float32)  # the last `block` vectors

  def stop(self, state, depth, q_BxKxV, hidden_BxKxH):
    del q_BxKxV
    _check_width("PACER", self.params["proj"]["kernel"].shape[0], self.drafter, hidden_BxKxH)
    vec = pacer_project(self.params, hidden_BxKxH)
    window = jnp.concatenate([state[:, :, 1:], vec[:, :, None]], 2)
    window = jnp.where(depth > 0, window, state)  # the root is not a draft token
    closes = (depth > 0) & (depth % self.block == 0)
    fail = jax.nn.sigmoid(pacer_logit(self.params, window)) < self.threshold
    return closes & fail, window


def _check_width(name: str, width: int, drafter: str, hidden_BxKxH) -> None:
  """At trace time (before anything compiles): the drafter's hidden states must be the
  width the predictor was trained on."""
  if hidden_BxKxH.shape[-1] != width:
    raise ValueError(f"This {name} predictor reads hidden states of width {width} (trained "
                     f"for {drafter or 'another drafter'}); this drafter's are "
                     f"{hidden_BxKxH.shape[-1]} wide.")


def drafter_id(drafter) -> str:
  """What a predictor records about its drafter: the head's class for head drafters
  (EagleHead, Eagle3Head, FalconHead, HydraHead), else the drafter's (DraftModel)."""
  return type(getattr(drafter, "head", drafter)).__name__


def _check_drafter(trained: str, drafter) -> None:
  """A predictor trained for another kind of drafter is an error (the width is checked
  when the loop is traced)."""
  if trained and trained != drafter_id(drafter):
    raise ValueError(f"This stop predictor was trained for a {trained} drafter; it was given "
                     f"a {drafter_id(drafter)}. Train one for it (configs/stop.py).")


def save(path: str, kind: str, params, drafter: str, **meta) -> None:
  """A predictor folder: params.safetensors + predictor.json (kind, drafter, knobs,
  metrics), each written atomically."""
  os.makedirs(path, exist_ok=True)
  assets.save_arrays(os.path.join(path, PARAMS), assets.flat_params(params))
  assets.save_json(os.path.join(path, META), {"format": FORMAT, "kind": kind,
                                              "drafter": drafter, **meta})


def load(path: str, kind: str) -> tuple[Any, dict]:
  """(params, meta) of the `kind` predictor at `path`; clear errors for a missing or
  corrupt folder or a predictor of the other kind."""
  meta_path = os.path.join(path, META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"No stop predictor at {path!r}: it has no {META}.")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    flat = safetensors.numpy.load_file(os.path.join(path, PARAMS))
  except Exception as e:  # unreadable JSON or safetensors (its own error type): say which
    raise ValueError(f"The stop predictor at {path!r} is corrupt: {type(e).__name__}: {e}"
                     ) from e
  if meta.get("format") != FORMAT or meta.get("kind") != kind:
    raise ValueError(f"{path!r} holds a {meta.get('kind')!r} predictor, not {kind!r}.")
  params = jax.tree.map(jnp.asarray, assets.nested_params(flat))
  return params, meta


@registry.STOP_POLICIES.register("specdecpp")
def _specdecpp(*, checkpoint: str | None = None, params=None, threshold: float | None = None,
               min_len: int | None = None) -> SpecDecPP:
  """SpecDec++'s acceptance head (a trained `checkpoint` folder, or `params`): stop once
  P(a rejection) > `threshold`, after at least `min_len` drafts. Unset knobs come from the
  checkpoint (calibrated to a cost file when trained) or default to 0.3 and 2."""
  params, meta = _params(checkpoint, params, "specdecpp")
  return SpecDecPP(params, _knob(threshold, meta, "threshold", 0.3),
                   _knob(min_len, meta, "min_len", 2), meta.get("drafter", ""))


@registry.STOP_POLICIES.register("pacer")
def _pacer(*, checkpoint: str | None = None, params=None, block: int | None = None,
           threshold: float | None = None) -> Pacer:
  """A PACER-style block pre-verifier (a trained `checkpoint` folder, or `params`): stop
  after a block of `block` drafts scored under `threshold` (unset: the checkpoint's
  calibrated one, or 0.5)."""
  params, meta = _params(checkpoint, params, "pacer")
  trained = params["pos"].shape[0]
  if block not in (None, trained):
    raise ValueError(f"This PACER predictor scores blocks of {trained} tokens; block={block} "
                     "was asked for.")
  return Pacer(params, trained, _knob(threshold, meta, "threshold", 0.5),
               meta.get("drafter", ""))


def _params(checkpoint, params, kind):
  """(params, the checkpoint's meta or {}) from exactly one of checkpoint / params."""
  if (checkpoint is None) == (params is None):
    raise ValueError(f"The {kind} stop policy needs checkpoint=PATH (a trained predictor) "
                     "or params=, not both.")
  if params is not None:
    return params, {}
  return load(checkpoint, kind)


def _knob(given, meta: dict, name: str, default):
  return given if given is not None else meta.get(name, default)
