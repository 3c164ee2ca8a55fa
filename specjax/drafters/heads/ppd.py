"""Parallel prompt decoding (PPD, "Hardware-Aware Parallel Prompt Decoding"): K trainable
prompt-token embeddings let the frozen target itself guess several tokens ahead.

Appended after a token x_q at position q, prompt tokens p_1..p_K sit at positions
q + 1 .. q + K; each sees the context up to x_q and the prompt tokens before it, and the
target's output at p_i is its guess for token q + 1 + i. The root x_{q+1} is the target's
own prediction at x_q, so the K guesses fill draft levels 1..K below it. Only the K
embeddings train (`PPDHead`, params {"prompt": [K, H]}), by distillation against the
target's own distribution at q + i (soft CE, or `c.loss`), level i weighted decay^(i-1)
(PPD's 0.8), on random anchors q per row in one forward: every anchor's group of prompt
tokens rides after the row, seeing its anchor's prefix only.

Decoding rides the prompt tokens on the verification forward, as PPD does
(`PPD.target_forward`): a group of K prompt tokens follows the root and every tree node;
the verified tokens never see them, so the target's verdict is exactly its own
(lossless), and after verification the group that followed the last accepted token holds
the next step's guesses (`commit`); the first guesses come from a group after the prompt
at `init`. Level d of the tree takes guess d's top candidates (or samples of it at T > 0;
`static_tree.from_levels`). The price is the verification's width: (1 + N) x (1 + K)
tokens for a tree of N nodes, which a GPU verifies nearly free and this CPU does not.

Departures: prompt tokens start from the embeddings of the data's most frequent response
tokens (PPD's start from the embedding of the text "Next 2 word" needs a tokenizer); one embedding per
prompt token (PPD's ensembles of several virtual tokens averaged per position are not
built); every tree node carries a group (PPD's extended tree prunes which do); with
`budget` the tree is sized from the measured verify costs at PPD's widths as a chain with
sibling leaves (`budget.sibling_tree`), not PPD's search over tree shapes.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import registry
from specjax.drafters import budget as budget_lib
from specjax.drafters import io, static_tree
from specjax.drafters.base import TargetBatch, TrainableHead, check_target
from specjax.models.config import ModelConfig
from specjax.models.model import Forward, causal, forward, param_dtype
from specjax.tree import StaticTree


def _layout(cfg: ModelConfig, k: int, tokens_BxS, positions_BxS, visible_BxSxS):
  """Inputs with a group of k prompt tokens after each of S tokens: (ids, positions,
  visibility) of width S (1 + k). Group s's prompt i sits at positions[s] + 1 + i and sees
  what token s sees, itself and its group's earlier prompts; no token sees a prompt."""
  b, s = tokens_BxS.shape
  ids = jnp.concatenate([tokens_BxS, jnp.broadcast_to(
      cfg.vocab_size + jnp.tile(jnp.arange(k), s), (b, s * k))], 1)
  pos = jnp.concatenate([positions_BxS, (positions_BxS[:, :, None] + 1 + jnp.arange(k)
                                         ).reshape(b, s * k)], 1)
  group = np.repeat(np.arange(s), k)
  idx = np.tile(np.arange(k), s)
  sees_real = jnp.take(jnp.broadcast_to(visible_BxSxS, (b, s, s)), group, axis=1)
  sees_prompt = (group[:, None] == group[None, :]) & (idx[None, :] <= idx[:, None])
  top = jnp.concatenate([jnp.broadcast_to(visible_BxSxS, (b, s, s)),
                         jnp.zeros((b, s, s * k), bool)], 2)
  bottom = jnp.concatenate([sees_real, jnp.broadcast_to(sees_prompt, (b, s * k, s * k))], 2)
  return ids, pos, jnp.concatenate([top, bottom], 1)


@flax.struct.dataclass
class PPDHead(TrainableHead):
  """PPD's prompt tokens as a trainable head (the module docstring)."""

  config: ModelConfig = flax.struct.field(pytree_node=False)
  num_prompts: int = flax.struct.field(pytree_node=False, default=3)
  decay: float = flax.struct.field(pytree_node=False, default=0.8)
  num_anchors: int = flax.struct.field(pytree_node=False, default=8)
  features = ()
  uses_target_params = True  # its drafter makes the first guesses with the target

  def init(self, key, dtype=jnp.float32):
    h = self.config.hidden_size
    return {"prompt": 0.02 * jax.random.normal(key, (self.num_prompts, h), dtype)}

  def fit(self, params, tokens, mask, shared):
    """Prompt tokens start at the embeddings of the data's most frequent response tokens
    (+ the random init): real rows, at the scale the target's layers expect."""
    if isinstance(params["prompt"], jax.ShapeDtypeStruct):  # the trainer asks by shape first
      return self, params
    from specjax.models.model import embed  # pylint: disable=g-import-not-at-top
    counts = np.bincount(np.asarray(tokens)[np.asarray(mask) > 0],
                         minlength=self.config.vocab_size)
    ids = np.argsort(-counts, kind="stable")[:self.num_prompts]
    rows = embed(self.config, shared, jnp.asarray(ids))
    return self, {"prompt": params["prompt"] + rows.astype(params["prompt"].dtype)}

  def guesses(self, params, batch: TargetBatch, anchors_BxA) -> jax.Array:
    """Target logits [B, A, K, V] at the prompt tokens after each anchor of each row."""
    b, t = batch.tokens.shape
    a, k = anchors_BxA.shape[1], self.num_prompts
    ids = jnp.concatenate([batch.tokens, jnp.broadcast_to(
        self.config.vocab_size + jnp.tile(jnp.arange(k), a), (b, a * k))], 1)
    pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(t), (b, t)), (
        anchors_BxA[..., None] + 1 + jnp.arange(k)).reshape(b, a * k)], 1)
    anchor = jnp.repeat(anchors_BxA, k, 1)  # [B, A*K]
    idx, group = np.tile(np.arange(k), a), np.repeat(np.arange(a), k)
    sees_real = jnp.arange(t)[None, None, :] <= anchor[..., None]
    sees_prompt = jnp.asarray((group[:, None] == group[None, :]) & (idx[None, :] <= idx[:, None]))
    vis = jnp.concatenate([
        jnp.concatenate([jnp.broadcast_to(causal(t), (b, t, t)), jnp.zeros((b, t, a * k), bool)], 2),
        jnp.concatenate([sees_real, jnp.broadcast_to(sees_prompt, (b, a * k, a * k))], 2)], 1)
    out = forward(self.config, batch.target_params, ids, pos, vis,
                  extra_embeddings_NxH=params["prompt"])
    return out.logits[:, t:].reshape(b, a, k, -1)

  def loss(self, params, batch: TargetBatch, key):
    b, t = batch.tokens.shape
    k = self.num_prompts
    pos = jnp.arange(t)
    ok = (pos + 2 < t) & (jnp.pad(batch.mask[:, 2:], ((0, 0), (0, 2))) > 0)
    score, anchors = jax.lax.top_k(jnp.where(ok, jax.random.gumbel(key, (b, t)), -jnp.inf),
                                   min(self.num_anchors, t))
    logits = self.guesses(params, batch, anchors)
    at = anchors[..., None] + 1 + jnp.arange(k)  # prompt i's teacher: the target at q + 1 + i
    inside = jnp.isfinite(score)[..., None] & (at + 1 < t)
    at = jnp.minimum(at, t - 2)
    target = jnp.take_along_axis(batch.logits, at.reshape(b, -1)[..., None], 1
                                 ).reshape(logits.shape)
    w = inside * jnp.take_along_axis(batch.mask, (at + 1).reshape(b, -1), 1).reshape(at.shape)
    w = w * jnp.asarray(self.decay ** np.arange(k), jnp.float32)
    loss = jnp.sum(w * batch.distill(target, logits)) / jnp.maximum(w.sum(), 1e-6)
    hit = (logits.argmax(-1) == target.argmax(-1)) & (w > 0)
    counted = (w > 0).sum((0, 1))
    return loss, {"distill": loss, **{f"top1/{i + 1}": hit[..., i].sum() / jnp.maximum(
        counted[i], 1) for i in range(k)}}

  def accept(self, params, batch: TargetBatch, depth: int, chunk: int = 64):
    """Greedy chain acceptance with the prompts after every position (`chunk` a forward)."""
    b, t = batch.tokens.shape
    depth = min(depth, self.num_prompts)
    n = -(-(t - 1) // chunk) * chunk
    anchors = jnp.minimum(jnp.arange(n), t - 1).reshape(-1, chunk)
    top = jax.lax.map(lambda a: self.guesses(params, batch, jnp.broadcast_to(a, (b, chunk)))[
        :, :, :depth].argmax(-1), anchors)  # [n / chunk, B, chunk, depth]
    top = jnp.moveaxis(top, 0, 1).reshape(b, n, depth)[:, :t - 1]
    i = jnp.arange(t - 1)[:, None] + jnp.arange(1, depth + 1)[None, :]
    target_top = jnp.take(batch.logits.argmax(-1), jnp.minimum(i, t - 1), axis=1)
    ok = (top == target_top) & (i + 1 < t)
    ok &= jnp.take(batch.mask, jnp.minimum(i + 1, t - 1), axis=1) > 0
    return jnp.pad(ok, ((0, 0), (0, 1), (0, 0))), jnp.pad(batch.mask[:, 2:], ((0, 0), (0, 2)))

  def drafter(self, params, shared, *, depth: int | None = None, top_k: int = 1,
              tree: Sequence[Sequence[int]] | None = None, target_params=None) -> "PPD":
    """A chain of `depth` guesses (default: one per prompt token) or a static tree of
    their top candidates; `target_params` make the first guesses at `init`."""
    del shared
    return PPD(params["prompt"], self.config,
               StaticTree.build(depth or self.num_prompts, top_k, tree), target_params)

  def validate(self, target_config: ModelConfig) -> None:
    check_target("These PPD prompt tokens", self.config.hidden_size, self.config.vocab_size,
                 target_config)


@flax.struct.dataclass
class PPDState:
  guess_BxKxV: jax.Array  # the target's guesses at the prompts after the last committed token
  known_B: jax.Array  # bool[B]: guesses exist (not before the first verification)
  groups: jax.Array  # [B, 1 + N, K, V]: every group's guesses from the last verification


@flax.struct.dataclass
class PPD:
  """The PPD drafter: drafts from the last verification's prompt guesses and rides its
  prompt tokens on the next verification (`target_forward`)."""

  prompt_KxH: Any
  config: ModelConfig = flax.struct.field(pytree_node=False)
  tree: StaticTree = flax.struct.field(pytree_node=False, default=StaticTree.chain(3))
  # The target's params, for the first guesses at `init` (a group after the prompt); None:
  # the first step drafts nothing.
  target_params: Any = None
  takes_stop_policy = False
  drafts_vary = False
  merges = False
  features = ()

  @property
  def num_nodes(self) -> int:
    return self.tree.num_nodes

  def validate(self, target_config: ModelConfig) -> None:
    check_target("These PPD prompt tokens", self.config.hidden_size, self.config.vocab_size,
                 target_config)
    if target_config.arch != "llama":
      raise ValueError("PPD's prompt tokens need a Llama-family target.")
    k = self.prompt_KxH.shape[0]
    if self.tree.depth > k:
      raise ValueError(f"A tree of depth {self.tree.depth} needs {self.tree.depth} PPD prompt "
                       f"tokens; these are {k}.")

  def init(self, ctx, max_len: int, features) -> PPDState:
    """The first guesses: a group after the last committed token (the one before the
    root), its prompt i at the root's position + i guessing the token after that."""
    del max_len, features
    b, k, v = ctx.history.shape[0], self.prompt_KxH.shape[0], self.config.vocab_size
    groups = jnp.zeros((b, 1 + self.tree.num_nodes, k, v), jnp.float32)
    if self.target_params is None or ctx.cache is None:
      return PPDState(jnp.zeros((b, k, v), jnp.float32), jnp.zeros((b,), bool), groups)
    out = forward(self.config, self.target_params,
                  jnp.broadcast_to(self.config.vocab_size + jnp.arange(k), (b, k)),
                  (ctx.length - 1)[:, None] + jnp.arange(k), causal(k), ctx.cache,
                  extra_embeddings_NxH=self.prompt_KxH.astype(param_dtype(self.target_params)))
    return PPDState(out.logits, jnp.ones((b,), bool), groups)

  def propose(self, state: PPDState, ctx, stop, sampling, key):
    del ctx, stop
    tree = static_tree.from_levels(self.tree, state.guess_BxKxV[:, :self.tree.depth],
                                   sampling, key)
    tree = tree.replace(valid=tree.valid & state.known_B[:, None])
    return tree, state, jnp.zeros_like(state.known_B, jnp.int32)

  def target_forward(self, state: PPDState, cfg, params, tokens_BxS, positions_BxS,
                     visible_BxSxS, cache, features):
    """The verification forward with a group of prompt tokens after every verified token;
    returns the verified tokens' outputs (unchanged: they see no prompt) and keeps every
    group's guesses."""
    s, k = tokens_BxS.shape[1], self.prompt_KxH.shape[0]
    ids, pos, vis = _layout(cfg, k, tokens_BxS, positions_BxS, visible_BxSxS)
    out = forward(cfg, params, ids, pos, vis, cache, features,
                  extra_embeddings_NxH=self.prompt_KxH.astype(param_dtype(params)))
    b = ids.shape[0]
    groups = out.logits[:, s:].reshape(b, s, k, -1)
    real = Forward(out.logits[:, :s], out.hidden[:, :s],
                   tuple(f[:, :s] for f in out.features), out.cache)
    return real, state.replace(groups=groups)

  def commit(self, state: PPDState, ctx, verdict, features) -> PPDState:
    """The guesses of the group after the last accepted token (the root's if none)."""
    del ctx, features
    a_B = verdict.accepted_drafts
    last = jnp.where(a_B > 0, 1 + jnp.take_along_axis(
        verdict.path, jnp.maximum(a_B - 1, 0)[:, None], 1)[:, 0], 0)
    guess = jnp.take_along_axis(state.groups, last[:, None, None, None], 1)[:, 0]
    return state.replace(guess_BxKxV=guess, known_B=jnp.ones_like(state.known_B))


@registry.HEADS.register("ppd")
def _head(target_cfg: ModelConfig, *, num_prompts: int = 3, decay: float = 0.8,
          num_anchors: int = 8) -> PPDHead:
  """PPD: `num_prompts` trainable prompt tokens (the frozen target guesses that many
  tokens ahead), trained on `num_anchors` anchors per row, level i weighted decay^(i-1)."""
  for name, v in (("num_prompts", num_prompts), ("num_anchors", num_anchors)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"PPD {name} must be an integer >= 1; got {v!r}.")
  if target_cfg.arch != "llama":
    raise ValueError("PPD's prompt tokens need a Llama-family target.")
  return PPDHead(target_cfg, num_prompts, float(decay), num_anchors)


@registry.DRAFTERS.register("ppd", takes_stop_policy=False)
def _drafter(target, *, checkpoint: str, budget: str | None = None, depth: int | None = None,
             top_k: int | None = None, tree: Sequence[Sequence[int]] | None = None) -> PPD:
  """Trained PPD prompt tokens (a head folder) as a chain or a static tree of each
  prompt's top candidates; unset knobs come from the head's folder. `budget` (a cost file
  from `make bench`) sizes the tree from the device's measured costs: PPD drafts for free
  but verifies (1 + N)(1 + K) tokens for N nodes, so the chain depth with the most tokens
  per ms, and with top_k > 1 the siblings whose verification costs about the chain's."""
  if budget:
    given = sorted(n for n, v in (("depth", depth), ("tree", tree)) if v is not None)
    if given:
      raise ValueError(f"budget={budget!r} sizes the tree; do not give {given} too.")
    meta = io.read_meta(checkpoint)
    if not meta.get("sim_accept"):
      raise ValueError(f"{checkpoint!r} has no simulated acceptance (sim_accept): give "
                       "depth (or tree) instead of budget.")
    k = int(meta["head_kwargs"].get("num_prompts", 3))
    top_k = top_k or int(meta.get("decode", {}).get("top_k", 1))
    sized, speedup = budget_lib.knobs(budget_lib.read_costs(budget), meta["sim_accept"][:k],
                                      top_k, width=lambda n: (1 + n) * (1 + k), draft_ms=0.0)
    depth = sized["depth"]
    tree = budget_lib.sibling_tree(depth, sized.get("num_nodes", depth), top_k)
    logging.info("ppd %s: %d nodes, depth %d from %s (the chain predicts %.2fx AR)",
                 checkpoint, len(tree), depth, budget, speedup)
  knobs = {n: v for n, v in (("depth", depth), ("top_k", top_k), ("tree", tree))
           if v is not None}
  return io.load_drafter(checkpoint, target, "ppd", **knobs)
