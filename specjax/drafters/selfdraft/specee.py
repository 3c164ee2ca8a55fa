"""SpecEE (Xu et al., ISCA 2025): speculative early exiting of the target's own forward.
LOSSY and greedy-only: a token that leaves the network early is the early layer's
prediction, never checked against the full model.

Each step, a draft head (EAGLE-1 in the paper) proposes K = 4 candidate next tokens. The
target's forward then runs layer by layer (`models.skip.forward_exiting`). After a layer
l the predictor reads 3K numbers: the candidates' logits at l (the final norm over layer
l's output times the candidates' LM-head rows), their softmax over the K candidates only,
and its change since layer l - 1. Layer l's predictor (one per layer: Linear 3K -> 512,
ReLU, Linear 512 -> 1, sigmoid) says whether to exit; an exit happens only when it clears
`threshold` AND the full LM head's argmax at l is one of the candidates, and that argmax is
the step's token. The draft head reads the normed exit state as the token's feature.

Predictors run at a scheduled subset of layers (the paper's two-level scheduling): a
static set chosen offline from where exits concentrate on training data
(`specjax.training.specee`), plus, per sequence, the layers within 2 of each of its last
`history` exits (the layer itself and +-2), once it has that many.

Cache policy (what the reference leaves empty): the layers above a token's exit store the
keys/values they project from its exit state (state propagation, as CALM does), so every
position is attended at every layer. The reference writes nothing there (its cache per
layer is shorter, so those positions are simply absent); a fixed-size cache read through a
prefix mask has no per-layer hole to leave.

Departures: the candidates' softmax change is taken against the previous *layer* (the
candidates' logits are computed at every layer: K LM-head rows cost nothing), which is what
the reference trains on; its inference compares with the previous *checked* layer. Labels
use the normed exit state (the reference's training labels read the un-normed one). Rows
of a batch exit independently (the reference runs batch 1); a layer runs while any row is
inside. Every sequence of a call starts from one exit history: empty, or carried from the
previous call (`carry`, a sweep's hot start).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from specjax import assets, registry
from specjax.models import skip as skip_lib
from specjax.models.config import ModelConfig
from specjax.models.model import FINAL, Forward, Model, lm_head_rows
from specjax.tree import DraftTree

FORMAT = "specjax-specee-predictor-v1"
META, PARAMS = "predictor.json", "params.safetensors"
HIDDEN = 512  # the predictor's width (the reference's)


# --- The predictor ------------------------------------------------------------------------

def init_predictors(key, num_exits: int, candidates: int) -> dict:
  """One MLP per exit layer, stacked: w1 [E, 3K, 512], b1 [E, 512], w2 [E, 512], b2 [E]."""
  k1, k2 = jax.random.split(key)
  n_in = 3 * candidates
  return {"w1": jax.random.normal(k1, (num_exits, n_in, HIDDEN)) / jnp.sqrt(n_in),
          "b1": jnp.zeros((num_exits, HIDDEN)),
          "w2": jax.random.normal(k2, (num_exits, HIDDEN)) / jnp.sqrt(HIDDEN),
          "b2": jnp.zeros((num_exits,))}


def exit_logit(p: dict, layer, x_xF) -> jax.Array:
  """The exit logit of layer `layer`'s predictor over features [..., 3K] -> [...]."""
  h = jax.nn.relu(x_xF @ p["w1"][layer] + p["b1"][layer])
  return h @ p["w2"][layer] + p["b2"][layer]


def candidate_logits(cfg: ModelConfig, params: Any, x_xH, candidates_xK) -> jax.Array:
  """float32[..., K]: the final norm over a layer's output times the candidates' LM-head
  rows (the candidates' logits had the model exited there)."""
  normed = skip_lib.final_norm(cfg, params, x_xH)
  rows_xKxH = lm_head_rows(cfg, params, candidates_xK.reshape(-1)).reshape(
      candidates_xK.shape + (cfg.hidden_size,))
  return jnp.einsum("...h,...kh->...k", normed.astype(jnp.float32),
                    rows_xKxH.astype(jnp.float32))


def features(logits_xK, prev_probs_xK) -> tuple[jax.Array, jax.Array]:
  """(predictor input [..., 3K], the candidates' softmax [..., K]): logits, softmax over
  the candidates, and the softmax's change since the previous layer."""
  probs = jax.nn.softmax(logits_xK, -1)
  return jnp.concatenate([logits_xK, probs, probs - prev_probs_xK], -1), probs


def static_mask(num_layers: int, static) -> jax.Array:
  """bool[L - 1]: the static exit layers as a mask (traced: a new set never recompiles)."""
  return jnp.zeros((num_layers - 1,), bool).at[jnp.asarray(static, jnp.int32)].set(True)


def schedule(static_E, history_BxM, count_B) -> jax.Array:
  """bool[B, E]: the exit layers whose predictor runs. The static set (bool[E]), and once
  a sequence has `M` exits recorded, every layer within {e - 2, e, e + 2} of each (a
  full-depth token records e = E)."""
  exits = static_E.shape[0]
  near = jnp.stack([history_BxM - 2, history_BxM, history_BxM + 2], -1).reshape(
      history_BxM.shape[0], -1)
  hit = (near[:, :, None] == jnp.arange(exits)).any(1)
  full = count_B >= history_BxM.shape[1]
  return static_E[None] | (hit & full[:, None])


# --- The drafter --------------------------------------------------------------------------

@flax.struct.dataclass
class SpecEEState:
  inner: Any  # the candidate drafter's state
  candidates: jax.Array  # int32[B, K]: this step's candidates
  # bool[B]: whether the head drafted them (it has nothing to draft from on the first step
  # after a 1-token prompt); no exit without them
  drafted: jax.Array
  history: jax.Array  # int32[B, M]: the last M exits (layer indices; L - 1: full depth)
  count: jax.Array  # int32[B]: exits recorded (the dynamic schedule waits for M)
  layers: jax.Array  # int32[B]: layers run, summed over steps (what the exits saved)


@flax.struct.dataclass
class SpecEE:
  """Early exit of the target's forward, guided by a draft head's candidates (LOSSY)."""

  inner: Any  # a drafter whose tree is K siblings of the root: the candidates
  predictors: Any
  static: jax.Array  # bool[L - 1]: the static exit layers (`static_mask`)
  threshold: jax.Array  # float32[]: P(exit) a predictor must clear
  # The exit history a call starts from (int32[history]) and how many of its entries are
  # real (int32[]): empty, or carried from the previous call (`carry`), as the reference
  # keeps one history for a whole stream of prompts. Arrays either way, so a hot start
  # runs the cold start's compiled program.
  past: jax.Array
  past_count: jax.Array
  config: ModelConfig = flax.struct.field(pytree_node=False)
  history: int = flax.struct.field(pytree_node=False, default=5)
  num_nodes = 0  # nothing is verified: every step is one (possibly early-exited) forward
  takes_stop_policy = False
  drafts_vary = False
  greedy_only = True
  lossy = True

  @property
  def features(self) -> tuple[int, ...]:
    return tuple(self.inner.features)

  @property
  def candidates(self) -> int:
    return self.inner.num_nodes

  def validate(self, target_config: ModelConfig) -> None:
    skip_lib.check(target_config, "SpecEE")
    self.inner.validate(target_config)
    if tuple(self.inner.features) != (FINAL,):
      raise ValueError("SpecEE's candidate drafter must read the target's final state only "
                       f"(an EAGLE-1 head); this one reads features {self.inner.features}.")
    if target_config.num_layers != self.config.num_layers:
      raise ValueError(f"These SpecEE predictors were made for a {self.config.num_layers}-"
                       f"layer target; this one has {target_config.num_layers} layers.")
    exits = self.predictors["w1"].shape
    if exits[0] != self.config.num_layers - 1 or exits[1] != 3 * self.candidates:
      raise ValueError(f"SpecEE predictors of shape {exits} need {self.config.num_layers - 1} "
                       f"exit layers and {3 * self.candidates} inputs ({self.candidates} "
                       "candidates).")

  def init(self, ctx, max_len: int, features) -> SpecEEState:
    b = ctx.history.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    return SpecEEState(self.inner.init(ctx, max_len, features),
                       jnp.zeros((b, self.candidates), jnp.int32), jnp.zeros((b,), bool),
                       jnp.broadcast_to(self.past, (b, self.history)),
                       zeros + self.past_count, zeros)

  def propose(self, state: SpecEEState, ctx, stop, sampling, key):
    tree, inner, calls = self.inner.propose(state.inner, ctx, stop, sampling, key)
    b = ctx.history.shape[0]
    empty = DraftTree.chain(jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool))
    return empty, state.replace(inner=inner, candidates=tree.tokens,
                                drafted=tree.valid[:, 0]), calls

  def target_forward(self, state: SpecEEState, cfg, params, tokens_BxT, positions_BxT,
                     visible_BxTxT, cache, feats) -> tuple[Forward, SpecEEState]:
    """The step's target forward with SpecEE's exits (one token per step: T = 1)."""
    cands_BxK = state.candidates
    check_BxE = schedule(self.static, state.history, state.count)

    def decide(layer: int, x_BxTxH, live_B, prev_BxK):
      x_BxH = x_BxTxH[:, 0]
      feats_BxF, probs_BxK = features(candidate_logits(cfg, params, x_BxH, cands_BxK),
                                      prev_BxK)
      fire_B = (jax.nn.sigmoid(exit_logit(self.predictors, layer, feats_BxF)) > self.threshold
                ) & check_BxE[:, layer] & live_B & state.drafted

      def full(_):
        logits_BxV = skip_lib.exit_logits(cfg, params, x_BxTxH)[:, 0]
        top_B = jnp.argmax(logits_BxV, -1)
        return fire_B & (cands_BxK == top_B[:, None]).any(-1), logits_BxV[:, None]

      def none(_):
        return jnp.zeros_like(fire_B), jnp.zeros(x_BxTxH.shape[:2] + (cfg.vocab_size,))

      leave_B, logits = jax.lax.cond(fire_B.any(), full, none, None)
      return leave_B, logits, probs_BxK

    prev = jnp.zeros(cands_BxK.shape)  # the first layer's change is its softmax
    out, ran_B = skip_lib.forward_exiting(cfg, params, tokens_BxT, positions_BxT,
                                          visible_BxTxT, cache, decide, prev)
    exit_B = ran_B - 1  # the layer left after (L - 1: the full depth)
    history = jnp.concatenate([state.history[:, 1:], exit_B[:, None]], 1)
    return out._replace(features=tuple(out.hidden for _ in feats)), state.replace(
        history=history, count=state.count + 1, layers=state.layers + ran_B)

  def commit(self, state: SpecEEState, ctx, verdict, features) -> SpecEEState:
    """The candidate drafter commits the step's token as a rejection of all its nodes."""
    k = self.candidates
    pad = lambda f: jnp.pad(f, ((0, 0), (0, k)) + ((0, 0),) * (f.ndim - 2))
    inner_verdict = verdict._replace(path=jnp.zeros(verdict.accepted_drafts.shape + (k,),
                                                    jnp.int32))
    return state.replace(inner=self.inner.commit(state.inner, ctx, inner_verdict,
                                                 tuple(pad(f) for f in features)))

  def carry(self, output) -> "SpecEE":
    """This drafter starting from the exit history of `output`'s first sequence."""
    state = output.drafter_state
    return self.replace(past=state.history[0], past_count=state.count[0])


# --- Files ---------------------------------------------------------------------------------

def save(path: str, predictors: Any, *, static: tuple[int, ...], head: str, candidates: int,
         num_layers: int, **meta) -> None:
  """A predictor folder: params.safetensors + predictor.json (static exit layers, the
  candidate head's folder, metrics), each written atomically."""
  os.makedirs(path, exist_ok=True)
  assets.save_arrays(os.path.join(path, PARAMS), assets.flat_params(predictors))
  assets.save_json(os.path.join(path, META), {
      "format": FORMAT, "static": [int(l) for l in static], "head": head,
      "candidates": candidates, "num_layers": num_layers, **meta})


def load(path: str) -> tuple[Any, dict]:
  """(predictors, meta) from a folder `save` wrote; clear errors otherwise."""
  meta_path = os.path.join(path, META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"No SpecEE predictors at {path!r}: it has no {META}.")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path!r} is not a SpecEE predictor folder (format "
                     f"{meta.get('format')!r}).")
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  flat = safetensors.numpy.load_file(os.path.join(path, PARAMS))
  return jax.tree.map(jnp.asarray, assets.nested_params(flat)), meta


def create(target: Model, inner, predictors, *, static, threshold: float = 0.5,
           history: int = 5) -> SpecEE:
  """SpecEE over `target` with a candidate drafter, stacked predictors and the static exit
  layers (indices)."""
  exits = target.config.num_layers - 1
  bad = [int(l) for l in static if not 0 <= int(l) < exits]
  if bad:
    raise ValueError(f"SpecEE's static exit layers {bad} are not in [0, {exits - 1}].")
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"SpecEE's threshold is a probability; got {threshold}.")
  if history < 1:
    raise ValueError(f"SpecEE's history counts exits; got {history}.")
  predictors = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), predictors)
  return SpecEE(inner, predictors, static_mask(target.config.num_layers, list(static)),
                jnp.float32(threshold), jnp.zeros((int(history),), jnp.int32), jnp.int32(0),
                target.config, int(history))


@registry.DRAFTERS.register("specee", takes_stop_policy=False, lossy=True, greedy_only=True)
def _build(target: Model, *, checkpoint: str, head: str | None = None,
           threshold: float | None = None, history: int = 5) -> SpecEE:
  """SpecEE (LOSSY, greedy-only): the predictors at `checkpoint` (`specjax-train --config
  configs/specee.py`), with candidates from the EAGLE-1 head they were trained with (or
  `head`), exiting above `threshold` (default: the one trained with)."""
  from specjax.drafters import io  # pylint: disable=g-import-not-at-top

  skip_lib.check(target.config, "SpecEE")
  predictors, meta = load(checkpoint)
  threshold = meta.get("threshold", 0.5) if threshold is None else threshold
  # A relative head folder is relative to the predictor folder (they are committed together).
  head = head or os.path.normpath(os.path.join(checkpoint, meta["head"]))
  # Exactly K siblings of the root, whatever draft shape the head folder saved.
  inner = io.load_drafter(head, target, "eagle", depth=1, top_k=meta["candidates"], tree=None,
                          num_nodes=None)
  return create(target, inner, predictors, static=meta["static"], threshold=threshold,
                history=history)
