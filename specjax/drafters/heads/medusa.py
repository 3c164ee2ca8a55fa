"""Medusa-1: K heads on the target's last hidden state, each guessing one token further.

Head k (0-based) reads f_t, the target's final normed hidden state at position t, through
a residual block and the target's frozen LM head (shared by default: SmolLM2's 49k x 576
head would be most of a small head's size):

  p_k(x_{t+k+2}) = softmax(lm_head(f_t + SiLU(W_k f_t + b_k)))      W_k zero-initialised

so a fresh head starts as the target's own next-token guess. In the decode loop the root
(the last committed token, x_{t+1}) is already chosen by the target from f_t, so the heads
fill the tree below it: a node at depth d takes the rank-r token of head d - 1 (a static
tree from a Medusa choice list; a chain takes rank 0 everywhere). One draft call per step,
independent of the tree's size. Tokens are picked deterministically (top-k), so lossless
sampling verifies them with q one-hot (SpecInfer's rule).

Training: soft cross-entropy of head k against the target's distribution at t + k + 1,
weighted 0.8^k (the self-distillation form of Medusa's loss).

Medusa-2 (`lora_rank > 0`): the target is fine-tuned jointly through LoRA adapters on its
attention projections (`models.lora`). The adapted target reads the same tokens; its loss
is the soft cross-entropy against the original target (self-distillation, weight
`lm_weight`), the heads read its features (weight `head_weight` = 0.2 x 0.8^k). Decoding
uses the LoRA-merged target (`merged_target`): LOSSLESS RELATIVE TO THAT MODEL, not
the original one. `from_medusa_llm` reads medusa-llm's heads.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import registry
from specjax.drafters import io
from specjax.drafters.base import TargetBatch, TrainableHead, check_target, soft_ce
from specjax.drafters.heads import runtime
from specjax.models.config import ModelConfig
from specjax.models import lora
from specjax.models.model import FINAL, causal, forward, lm_head
from specjax.tree import DraftTree, StaticTree


def heads(params, f_BxH: jax.Array) -> jax.Array:
  """[..., K, H]: every head's residual block on features [..., H]."""
  x = f_BxH[..., None, :].astype(params["w"].dtype)
  return x + jax.nn.silu(jnp.einsum("...kh,kho->...ko", x, params["w"]) + params["b"])


def head_logits(cfg: ModelConfig, params, shared, x_xKxH: jax.Array) -> jax.Array:
  """float32[..., K, V]: each head's own LM head (medusa-llm's layout, params["lm_head"]
  [K, V, H]) when it has one, else the target's shared one."""
  if "lm_head" in params:
    return jnp.einsum("...kh,kvh->...kv", x_xKxH, params["lm_head"]).astype(jnp.float32)
  return lm_head(cfg, shared, x_xKxH)


@flax.struct.dataclass
class MedusaHead(TrainableHead):
  """Medusa-1 as a trainable head (see `base.TrainableHead`)."""

  config: ModelConfig = flax.struct.field(pytree_node=False)
  num_heads: int = flax.struct.field(pytree_node=False, default=4)
  decay: float = flax.struct.field(pytree_node=False, default=0.8)
  # Each head with its own LM head instead of sharing the target's: heads loaded from
  # medusa-llm's layout (specjax trains shared-head Medusa; `init` leaves these zero).
  own_lm_head: bool = flax.struct.field(pytree_node=False, default=False)
  # Medusa-2: LoRA rank of the jointly fine-tuned target (0 = Medusa-1, target frozen).
  lora_rank: int = flax.struct.field(pytree_node=False, default=0)
  lora_alpha: float = flax.struct.field(pytree_node=False, default=16.0)
  lm_weight: float = flax.struct.field(pytree_node=False, default=1.0)
  head_weight: float = flax.struct.field(pytree_node=False, default=0.2)
  features = (FINAL,)

  def init(self, key, dtype=jnp.float32):
    k, h = self.num_heads, self.config.hidden_size
    # Zero-initialised heads: a fresh head is the target's own next-token guess.
    params = {"w": jnp.zeros((k, h, h), dtype), "b": jnp.zeros((k, h), dtype)}
    if self.own_lm_head:
      params["lm_head"] = jnp.zeros((k, self.config.vocab_size, h), dtype)
    if self.lora_rank:
      params["lora"] = lora.init(self.config, key, self.lora_rank, dtype)
    return params

  def merged(self, target_params, params):
    """The target's params the heads decode with (LoRA folded in for Medusa-2)."""
    if "lora" not in params:
      return target_params
    return lora.merge(target_params, params["lora"], self.lora_alpha)

  def _student(self, params, batch: TargetBatch):
    """(features, logits) of the target the heads serve: the frozen one, or its LoRA."""
    if not self.lora_rank:
      return batch.features[0], batch.logits
    b, t = batch.tokens.shape
    out = forward(self.config, self.merged(batch.target_params, params), batch.tokens,
                  jnp.broadcast_to(jnp.arange(t), (b, t)), causal(t), features=(FINAL,))
    return out.features[0], out.logits

  def loss(self, params, batch: TargetBatch, key):
    del key
    t = batch.tokens.shape[1]
    f, student_logits = self._student(params, batch)
    total, metrics = 0.0, {}
    for k in range(self.num_heads):
      # Head k at position i guesses token i + k + 2: the target's distribution at i + k + 1.
      # Only head k's block and LM-head pass (the LM head is most of a step's FLOPs).
      head_k = {n: params[n][k:k + 1] for n in ("w", "b", "lm_head") if n in params}
      logits = head_logits(self.config, head_k, batch.shared,
                           heads(head_k, f[:, :t - k - 2]))[..., 0, :]
      target = batch.logits[:, k + 1:t - 1]
      w = batch.mask[:, k + 2:]
      denom = jnp.maximum(w.sum(), 1.0)
      ce = jnp.sum(w * batch.distill(target, logits)) / denom
      total += self.decay ** k * ce
      metrics[f"ce/{k + 1}"] = ce
      metrics[f"top1/{k + 1}"] = jnp.sum(w * (logits.argmax(-1) == target.argmax(-1))) / denom
    if self.lora_rank:  # Medusa-2: heads weighted by head_weight, plus the LM distillation
      w = jnp.pad(batch.mask[:, 1:], ((0, 0), (0, 1)))
      lm = jnp.sum(w * soft_ce(batch.logits, student_logits)) / jnp.maximum(w.sum(), 1.0)
      total = self.head_weight * total + self.lm_weight * lm
      metrics["lm_distill"] = lm
    return total, metrics

  def accept(self, params, batch: TargetBatch, depth: int):
    b, t = batch.tokens.shape
    depth = min(depth, self.num_heads)
    f, student_logits = self._student(params, batch)
    top = head_logits(self.config, params, batch.shared, heads(params, f))[
        ..., :depth, :].argmax(-1)  # [B, T, depth]
    i = jnp.arange(t)[:, None] + jnp.arange(depth)[None, :] + 1  # the guessed token - 1
    target_top = jnp.take(student_logits.argmax(-1), jnp.minimum(i, t - 1), axis=1)
    ok = (top == target_top) & (i + 1 < t)
    ok &= jnp.take(batch.mask, jnp.minimum(i + 1, t - 1), axis=1) > 0
    return ok, jnp.pad(batch.mask[:, 2:], ((0, 0), (0, 2)))

  def drafter(self, params, shared, *, depth: int | None = None, top_k: int = 1,
              tree: Sequence[Sequence[int]] | None = None) -> "Medusa":
    """A chain of `depth` tokens (default: one per head), the full top_k-ary tree, or the
    tree of choice paths (`StaticTree.build`)."""
    heads_only = {k: v for k, v in params.items() if k != "lora"}
    return Medusa(heads_only, shared, self.config,
                  StaticTree.build(depth or self.num_heads, top_k, tree))


@flax.struct.dataclass
class MedusaState:
  feature_BxH: jax.Array  # the target's feature at the token before the root
  known_B: jax.Array  # bool[B]: False until one exists (a one-token prompt)


@flax.struct.dataclass
class Medusa:
  """The Medusa drafter (see the module docstring)."""

  params: Any
  shared: Any
  config: ModelConfig = flax.struct.field(pytree_node=False)
  tree: StaticTree = flax.struct.field(pytree_node=False, default=StaticTree.chain(4))
  takes_stop_policy = False
  drafts_vary = False
  features = (FINAL,)

  @property
  def num_nodes(self) -> int:
    return self.tree.num_nodes

  def validate(self, target_config: ModelConfig) -> None:
    check_target("This Medusa head", self.config.hidden_size, self.config.vocab_size,
                 target_config)
    num_heads = self.params["w"].shape[0]
    if self.tree.depth > num_heads:
      raise ValueError(f"A tree of depth {self.tree.depth} needs {self.tree.depth} Medusa "
                       f"heads; this one has {num_heads}.")

  def init(self, ctx, max_len: int, features) -> MedusaState:
    (f,) = features
    return MedusaState(runtime.pending_init(f, ctx, 1)[:, 0], ctx.length >= 2)

  def propose(self, state: MedusaState, ctx, stop, sampling, key):
    del ctx, stop, sampling, key
    b = state.feature_BxH.shape[0]
    depth_N = jnp.asarray(self.tree.node_depth) - 1
    logits_BxKxV = head_logits(self.config, self.params, self.shared,
                               heads(self.params, state.feature_BxH))[:, :self.tree.depth]
    top_BxKxR = jax.lax.top_k(logits_BxKxV, self.tree.max_rank + 1)[1]
    tokens = top_BxKxR[:, depth_N, jnp.asarray(self.tree.ranks)]
    parents = jnp.broadcast_to(jnp.asarray(self.tree.parents, jnp.int32), tokens.shape)
    valid = jnp.broadcast_to(state.known_B[:, None], tokens.shape)
    return (DraftTree(tokens.astype(jnp.int32), parents, valid), state,
            state.known_B.astype(jnp.int32))

  def commit(self, state: MedusaState, ctx, verdict, features) -> MedusaState:
    """The feature at the last accepted token (the root's if none was accepted)."""
    (f,) = features
    a_B = verdict.accepted_drafts
    last = jnp.where(a_B > 0, 1 + jnp.take_along_axis(
        verdict.path, jnp.maximum(a_B - 1, 0)[:, None], 1)[:, 0], 0)
    return MedusaState(jnp.take_along_axis(f, last[:, None, None], 1)[:, 0],
                       jnp.ones_like(state.known_B))


@registry.HEADS.register("medusa")
def _head(target_cfg: ModelConfig, *, num_heads: int = 4, decay: float = 0.8,
          lora_rank: int = 0, lora_alpha: float = 16.0, lm_weight: float = 1.0,
          head_weight: float = 0.2) -> MedusaHead:
  """Medusa-1 (residual-block heads sharing the target's LM head), or Medusa-2 with
  lora_rank > 0 (the target fine-tuned jointly through LoRA)."""
  return MedusaHead(target_cfg, num_heads, decay, False, lora_rank, lora_alpha, lm_weight,
                    head_weight)


@registry.DRAFTERS.register("medusa", takes_stop_policy=False)
def _drafter(target, *, checkpoint: str, budget: str | None = None, depth: int | None = None,
             top_k: int | None = None, tree: Sequence[Sequence[int]] | None = None) -> Medusa:
  """A trained Medusa head folder (specjax or medusa-llm layout) as a chain or a static
  tree; unset knobs come from the head's folder, or `budget=COSTS_JSON` sizes the chain
  from measured costs. A Medusa-2 head needs its `merged_target` as the target."""
  return io.trained_drafter("medusa", target, checkpoint, budget, depth=depth, top_k=top_k,
                            tree=tree)


def merged_target(path: str, target):
  """The target a Medusa-2 head decodes with: `target` with the head's LoRA folded in.
  Speculative decoding with that head is lossless relative to this model, NOT to
  `target`: its `merged_head` names the head and its name says so."""
  _, head, params, _ = io.load(path, target.config, target.dtype)
  if "lora" not in params:
    raise ValueError(f"The head in {path!r} has no LoRA adapters: decode with the target "
                     "itself.")
  where = os.path.abspath(path)
  return dataclasses.replace(target, params=head.merged(target.params, params),
                             name=f"{target.name}{LORA_MARK}{where}", merged_head=where)


LORA_MARK = "+lora:"  # a merged target's name: "<target>+lora:<head folder>"


def from_medusa_llm(path: str, target_cfg: ModelConfig):
  """("medusa", MedusaHead with its own LM heads, params) from medusa-llm's layout
  ("{k}.0.linear.*" residual blocks, "{k}.1.weight" per-head LM heads)."""
  hf = io.read_json(os.path.join(path, "config.json"))
  k = hf["medusa_num_heads"]
  if hf.get("medusa_num_layers", 1) != 1:
    raise ValueError(f"{path!r}: only Medusa heads with one residual block load "
                     f"(medusa_num_layers={hf['medusa_num_layers']}).")
  sd = io.state_dict(path, io.MEDUSA_FILES)
  lm = np.stack([sd[f"{i}.1.weight"] for i in range(k)])  # [K, V, H]
  check_target(f"The head in {path!r}", lm.shape[2], lm.shape[1], target_cfg)
  params = {"w": np.stack([sd[f"{i}.0.linear.weight"].T for i in range(k)]),
            "b": np.stack([sd[f"{i}.0.linear.bias"] for i in range(k)]), "lm_head": lm}
  return "medusa", MedusaHead(target_cfg, num_heads=k, own_lm_head=True), params
