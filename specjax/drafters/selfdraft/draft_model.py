"""Draft model: an independent LM sharing the target's vocabulary, or the target's own
first layers (`DraftModel.truncated`, a training-free self-speculative drafter). It drafts
a chain (`depth` tokens) or a static tree (a Medusa-style choice list: top-k branching).

The drafter keeps its own KV cache. Its invariant: the cache holds a prefix of the
committed history. Each draft first "catches up" on the 1 or 2 committed tokens it has not
seen (the last accepted draft token, if every draft was accepted, and the new root), which
gives the root's next-token distribution; then it expands the tree one level per forward:
level d's nodes (all of one depth, padded to the tree's width) go through the draft model
together, written past the committed cache with an ancestor mask, and their children are
their top-ranked tokens (greedy) or i.i.d. samples (sampling). A chain is a tree of width 1.
After verification the accepted path's entries are gathered into contiguous slots and
everything else is cut off.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from specjax import registry
from specjax.drafters import static_tree
from specjax.drafters.base import TrainableHead
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import Model, causal, forward, param_dtype, prefill
from specjax.tree import StaticTree

_CATCH_UP = 2  # committed tokens the draft may lag behind after a verification


@flax.struct.dataclass
class DraftState:
  cache: KVCache
  levels: jax.Array  # int32[]: tree levels the last propose forwarded (their K/V is cached)


@flax.struct.dataclass
class DraftModel:
  params: Any
  config: ModelConfig = flax.struct.field(pytree_node=False)
  tree: StaticTree = flax.struct.field(pytree_node=False, default=StaticTree.chain(4))
  takes_stop_policy = True
  drafts_vary = False
  features = ()

  @classmethod
  def from_model(cls, model: Model, depth: int = 4, top_k: int = 1,
                 tree: Sequence[Sequence[int]] | None = None) -> "DraftModel":
    """Drafts with `model`: a chain of `depth` tokens, the full top_k-ary tree `depth`
    levels deep, or the tree of choice paths `tree` (`StaticTree.build`)."""
    return cls(model.params, model.config, StaticTree.build(depth, top_k, tree))

  @classmethod
  def truncated(cls, target: Model, num_layers: int, depth: int = 4, top_k: int = 1,
                tree: Sequence[Sequence[int]] | None = None) -> "DraftModel":
    """The target's first `num_layers` layers + its final norm and LM head."""
    return cls.from_model(target.truncated(num_layers), depth, top_k, tree)

  @property
  def num_nodes(self) -> int:
    return self.tree.num_nodes

  def validate(self, target_config: ModelConfig) -> None:
    if self.config.vocab_size != target_config.vocab_size:
      raise ValueError(f"Draft vocab size {self.config.vocab_size} != target vocab size "
                       f"{target_config.vocab_size}: draft and target must share a tokenizer.")
    if self.tree.max_rank >= self.config.vocab_size:
      raise ValueError(f"Tree rank {self.tree.max_rank} exceeds the vocabulary.")

  def init(self, ctx, max_len: int, features) -> DraftState:
    b = ctx.history.shape[0]
    # Room for the tree's padded levels past the committed context.
    cache = KVCache.for_config(self.config, b, max_len + self.tree.depth * self.tree.width,
                               param_dtype(self.params))
    cache, _ = prefill(self.config, self.params, cache, ctx.history, ctx.length - 1)
    return DraftState(cache, jnp.zeros((), jnp.int32))

  def _catch_up(self, cache: KVCache, ctx):
    """Forwards the committed tokens the cache lacks; returns the root's logits/hidden."""
    lag_B = ctx.length - cache.lengths  # 1 or 2 for live sequences
    idx = jnp.minimum(cache.lengths[:, None] + jnp.arange(_CATCH_UP), ctx.history.shape[1] - 1)
    tokens = jnp.take_along_axis(ctx.history, idx, 1)
    positions = cache.lengths[:, None] + jnp.arange(_CATCH_UP)
    out = forward(self.config, self.params, tokens, positions, causal(_CATCH_UP), cache)
    last = jnp.clip(lag_B - 1, 0, _CATCH_UP - 1)[:, None, None]
    pick = lambda x: jnp.take_along_axis(x, last, 1)  # [B, 1, ...]
    return pick(out.logits), pick(out.hidden), out.cache.advance(jnp.maximum(lag_B, 0))

  def propose(self, state: DraftState, ctx, stop, sampling, key):
    logits_Bx1xV, hidden_Bx1xH, cache = self._catch_up(state.cache, ctx)

    def step(tokens_BxW, parent_hidden, positions_BxW, cache, prefix):
      del parent_hidden  # an LM's own cache carries the context
      out = forward(self.config, self.params, tokens_BxW, positions_BxW,
                    jnp.eye(tokens_BxW.shape[1], dtype=bool)[None], cache, prefix_BxTxS=prefix)
      return out.logits, out.hidden, out.cache

    tree, cache, levels, calls = static_tree.draft(self.tree, step, logits_Bx1xV, hidden_Bx1xH,
                                                   cache, ctx.length - 1, stop, sampling, key)
    return tree, DraftState(cache, levels), calls

  def commit(self, state: DraftState, ctx, verdict, features) -> DraftState:
    """Keeps the accepted nodes whose K/V the drafter computed (levels it forwarded)."""
    slots = jnp.asarray(self.tree.padded_index)[verdict.path]  # increasing along the path
    kept_B = jnp.minimum(verdict.accepted_drafts, state.levels)
    cache = state.cache.commit(slots, kept_B)
    return DraftState(cache, state.levels)


@registry.DRAFTERS.register("self_draft", takes_stop_policy=True)
def _self_draft(target: Model, *, layers: int, depth: int = 4, top_k: int = 1,
                tree: Sequence[Sequence[int]] | None = None) -> DraftModel:
  """The target's first `layers` layers (training-free), as a chain or a top-k tree."""
  return DraftModel.truncated(target, layers, depth, top_k, tree)


@registry.DRAFTERS.register("draft_model", takes_stop_policy=True)
def _draft_model(target: Model, *, checkpoint: str, depth: int = 4, top_k: int = 1,
                 tree: Sequence[Sequence[int]] | None = None) -> DraftModel:
  """An independent model sharing the vocabulary (a preset, HF folder or .gguf file)."""
  from specjax import models  # pylint: disable=g-import-not-at-top
  model = models.load(checkpoint, target.dtype)
  return DraftModel.from_model(model, depth, top_k, tree)


# --- training an independent draft LM (FastDraft; "Direct Alignment of Draft Model") -------

STAGES = ("pretrain", "align")


@flax.struct.dataclass
class DraftLMHead(TrainableHead):
  """A small Llama-shaped draft LM as a `specjax-train` head (`base.TrainableHead`): its
  own embedding, layers and tied LM head over the target's vocabulary (the target's
  tokenizer). FastDraft and the Direct Alignment paper train one in two stages:

    pretrain   next-token cross-entropy on every data token (text); the target is not run
    align      distillation on target-generated data: the draft's distribution pulled
               toward the target's at every response position (`c.loss`: soft CE, TV or
               TVD++, the latter the paper's), starting from the pretrained weights
               (`c.init_from`)

  It decodes as a `DraftModel` (the `draft_model` drafter's class): its own KV cache, a
  chain or a static tree."""

  config: ModelConfig = flax.struct.field(pytree_node=False)  # the target's
  draft: ModelConfig = flax.struct.field(pytree_node=False)
  stage: str = flax.struct.field(pytree_node=False, default="align")
  features = ()

  @property
  def reads_target(self) -> bool:
    """Pretraining reads only the text: the trainer skips the target's forward."""
    return self.stage != "pretrain"

  def init(self, key, dtype=jnp.float32):
    from specjax.models.model import init_params  # pylint: disable=g-import-not-at-top
    return init_params(self.draft, key, dtype)

  def _logits(self, params, tokens_BxT):
    b, t = tokens_BxT.shape
    return forward(self.draft, params, tokens_BxT, jnp.broadcast_to(jnp.arange(t), (b, t)),
                   causal(t)).logits

  def loss(self, params, batch, key):
    del key
    logits = self._logits(params, batch.tokens)[:, :-1]
    w = batch.mask[:, 1:]
    denom = jnp.maximum(w.sum(), 1.0)
    nxt = batch.tokens[:, 1:]
    if self.stage == "pretrain":
      per = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), nxt[..., None], -1)[..., 0]
      top = nxt
    else:
      per = batch.distill(batch.logits[:, :-1], logits)
      top = batch.logits[:, :-1].argmax(-1)
    loss = jnp.sum(w * per) / denom
    return loss, {"ce" if self.stage == "pretrain" else "distill": loss,
                  "top1/1": jnp.sum(w * (logits.argmax(-1) == top)) / denom}

  def accept(self, params, batch, depth: int):
    """Greedy chain acceptance teacher-forced on the data: draft j from position t guesses
    token t + 1 + j from the data before it, which on an accepted prefix is what the draft
    read (its own drafts equal the target's argmax there); the target's argmax is the
    data's next token when the target is not run (pretraining)."""
    b, t = batch.tokens.shape
    mine = self._logits(params, batch.tokens).argmax(-1)
    theirs = (batch.logits.argmax(-1) if batch.logits is not None
              else jnp.pad(batch.tokens[:, 1:], ((0, 0), (0, 1))))
    i = jnp.arange(t)[:, None] + jnp.arange(1, depth + 1)[None, :]
    at = jnp.minimum(i, t - 1)
    ok = (jnp.take(mine, at, axis=1) == jnp.take(theirs, at, axis=1)) & (i + 1 < t)
    ok &= jnp.take(batch.mask, jnp.minimum(i + 1, t - 1), axis=1) > 0
    return ok, jnp.pad(batch.mask[:, 2:], ((0, 0), (0, 2)))

  def drafter(self, params, shared, *, depth: int = 4, top_k: int = 1,
              tree: Sequence[Sequence[int]] | None = None) -> DraftModel:
    del shared  # the draft LM has its own embedding and LM head
    return DraftModel(params, self.draft, StaticTree.build(depth, top_k, tree))

  def validate(self, target_config: ModelConfig) -> None:
    if self.draft.vocab_size != target_config.vocab_size:
      raise ValueError(f"This draft LM has a {self.draft.vocab_size}-token vocabulary; the "
                       f"target has {target_config.vocab_size}.")


@registry.HEADS.register("draft_lm")
def _draft_lm_head(target_cfg: ModelConfig, *, num_layers: int = 4, hidden_size: int = 256,
                   intermediate_size: int = 768, num_heads: int = 4, num_kv_heads: int = 2,
                   stage: str = "align") -> DraftLMHead:
  """An independent Llama-shaped draft LM over the target's vocabulary (tied embedding,
  the target's RoPE base), trained in `stage` "pretrain" (text) or "align" (distilled)."""
  if stage not in STAGES:
    raise ValueError(f"Unknown draft_lm stage {stage!r}; expected one of {STAGES}.")
  for name, v in (("num_layers", num_layers), ("hidden_size", hidden_size),
                  ("intermediate_size", intermediate_size), ("num_heads", num_heads),
                  ("num_kv_heads", num_kv_heads)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"draft_lm {name} must be an integer >= 1; got {v!r}.")
  if hidden_size % num_heads or num_heads % num_kv_heads:
    raise ValueError(f"draft_lm hidden_size {hidden_size} must split into num_heads "
                     f"{num_heads}, and those into num_kv_heads {num_kv_heads}.")
  draft = ModelConfig(arch="llama", vocab_size=target_cfg.vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_layers=num_layers,
                      num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=hidden_size // num_heads, norm_eps=target_cfg.norm_eps,
                      rope_theta=target_cfg.rope_theta, tie_embeddings=True,
                      max_position_embeddings=target_cfg.max_position_embeddings)
  return DraftLMHead(target_cfg, draft, stage)


@registry.DRAFTERS.register("draft_lm", takes_stop_policy=True)
def _draft_lm(target: Model, *, checkpoint: str, budget: str | None = None,
              depth: int | None = None, top_k: int | None = None,
              tree: Sequence[Sequence[int]] | None = None) -> DraftModel:
  """A draft LM trained by specjax-train (head "draft_lm") as a chain or a static tree;
  `budget=COSTS_JSON` sizes it from measured costs."""
  from specjax.drafters import io  # pylint: disable=g-import-not-at-top
  return io.trained_drafter("draft_lm", target, checkpoint, budget, depth=depth, top_k=top_k,
                            tree=tree)
