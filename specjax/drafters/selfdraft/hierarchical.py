"""Hierarchical speculation for quantized targets (Zhang et al. 2025, "Speculative Decoding
Meets Quantization"; SpecMQuant). Greedy-only.

With 4-bit weights a target's forward is cheap to read but its cost grows quickly with
the tokens it verifies, so a wide draft tree (EAGLE-2) loses much of what quantization
saved. The hierarchy turns the tree into a chain: a draft head proposes trees for a small
*intermediate* model, which verifies them in an inner speculative loop until it has
produced more than `depth` tokens; its first `depth` tokens are the chain the target
verifies in one narrow forward. Each level is lossless relative to the model verifying
it, so the output is the target's greedy output whatever the intermediate.

A step (`propose`): rounds of [inner drafter proposes a tree at the intermediate's
context; the intermediate verifies it greedily; the intermediate's cache and the inner
drafter commit] until every row has at least depth + 1 new tokens (each round gains one
at least: depth + 1 rounds at most). The intermediate's cache then holds the root and
the chain; its features of them are kept for the commit.

After the target's verdict (`commit`), the intermediate's cache is cut back to the
root + the accepted chain tokens, and the inner drafter commits *the target's* verdict on
the chain from its state after the step's first proposal, as if the intermediate had
verified that chain itself (which is what a drafter whose commit reads only the verdict's
path and the verified tokens' features, `merges = True`, needs: EAGLE's). No forward is
repeated.

The intermediate here is a model with the target's tokenizer: a truncated self-draft of
the target (`intermediate_layers`), or any `Model` given to `create`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from specjax import registry, stopping
from specjax import verify as verify_lib
from specjax.drafters import io
from specjax.drafters.base import Context
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import Model, forward, param_dtype, prefill
from specjax.tree import DraftTree


@flax.struct.dataclass
class HierarchicalState:
  cache: KVCache  # the intermediate's, of the committed context but the root
  inner: Any  # the inner drafter's state at the committed context
  # What commit needs from this step's propose:
  proposed: Any  # the inner drafter's state after its first proposal of the step
  feats: tuple  # the intermediate's features of [root, chain], each [B, 1 + depth, H]
  grown: KVCache  # the intermediate's cache after the inner loop


@flax.struct.dataclass
class Hierarchical:
  inner: Any  # drafts for the intermediate (merges = True)
  params: Any  # the intermediate's
  config: ModelConfig = flax.struct.field(pytree_node=False)
  depth: int = flax.struct.field(pytree_node=False, default=6)
  takes_stop_policy = False
  drafts_vary = False
  greedy_only = True
  features = ()

  @property
  def num_nodes(self) -> int:
    return self.depth

  @property
  def room(self) -> int:
    """Positions the inner loop may run past the committed context: depth + 1 tokens,
    one round's overshoot and the tree it verifies."""
    return self.depth + 2 * (self.inner.num_nodes + 1) + 1

  def validate(self, target_config: ModelConfig) -> None:
    if target_config.vocab_size != self.config.vocab_size:
      raise ValueError(f"The intermediate model has vocab_size={self.config.vocab_size}; the "
                       f"target has {target_config.vocab_size}: they must share a tokenizer.")
    if self.depth < 1:
      raise ValueError(f"Hierarchical drafting needs depth >= 1; got {self.depth}.")
    if not getattr(self.inner, "merges", False):
      raise ValueError(f"Hierarchical drafting commits the target's verdict into its inner "
                       f"drafter, which needs one whose commit reads only the verdict and "
                       f"features (merges = True, e.g. EAGLE's); {type(self.inner).__name__} "
                       f"is not.")
    self.inner.validate(self.config)

  def _ctx(self, ctx, cache, history=None, length=None) -> Context:
    """The intermediate's view: its cache and history padded with `room` positions."""
    if history is None:
      history = jnp.pad(ctx.history, ((0, 0), (0, self.room)))
    return Context(history, ctx.length if length is None else length, cache, ctx.live)

  def init(self, ctx, max_len, features):
    del features
    b = ctx.history.shape[0]
    cache = KVCache.for_config(self.config, b, max_len + self.room, param_dtype(self.params))
    inner_ctx = self._ctx(ctx, None)
    cache, feats = prefill(self.config, self.params, cache, inner_ctx.history, ctx.length - 1,
                           tuple(self.inner.features))
    inner_ctx = inner_ctx.replace(cache=cache)
    inner = self.inner.init(inner_ctx, max_len + self.room, feats)
    zf = lambda: tuple(jnp.zeros((b, 1 + self.depth) + f.shape[2:], f.dtype) for f in feats)
    return HierarchicalState(cache, inner, inner, zf(), cache)

  def _round(self, ctx0, sampling, key, carry):
    """One inner round: the inner drafter proposes, the intermediate verifies greedily,
    both commit; the features of the round's root and accepted nodes go to the chain's
    slots (offsets past the step's root). Returns the carry and the inner drafter's state
    after its proposal."""
    cache, dstate, history, length, made, feats, k = carry
    b = history.shape[0]
    rows = jnp.arange(b)
    ctx = self._ctx(ctx0, cache, history, length)
    tree, proposed, _ = self.inner.propose(dstate, ctx, stopping.Fixed(), sampling,
                                           jax.random.fold_in(key, k))
    tokens, positions, mask = tree.verify_inputs(history[rows, length - 1], length - 1)
    out = forward(self.config, self.params, tokens, positions, mask, cache,
                  tuple(self.inner.features))
    verdict = verify_lib.verify(verify_lib.Greedy(), tree, out.logits, sampling, key)
    a_B = verdict.accepted_drafts
    n = tree.num_nodes
    keep = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), 1 + verdict.path], 1)  # [B, 1+n]
    cache = out.cache.commit(keep, 1 + a_B)
    j = jnp.arange(n + 1)
    gained = jnp.where(j < a_B[:, None], jnp.concatenate(
        [jnp.take_along_axis(tree.tokens, verdict.path, 1), jnp.zeros((b, 1), jnp.int32)], 1),
                       verdict.next_token[:, None])
    slots = length[:, None] + j
    history = history.at[rows[:, None], jnp.where(j <= a_B[:, None], slots, history.shape[1])
                         ].set(gained, mode="drop")
    # Features of the round's root (offset `made`) and accepted nodes (made + 1 + i).
    dest = jnp.where(j <= a_B[:, None], made[:, None] + j, self.depth + 1)
    feats = tuple(f.at[rows[:, None], dest].set(jnp.take_along_axis(
        new, keep[:, :, None], 1).astype(f.dtype), mode="drop")
                  for f, new in zip(feats, out.features))
    dstate = self.inner.commit(proposed, ctx, verdict, out.features)
    return (cache, dstate, history, length + 1 + a_B, made + 1 + a_B, feats, k + 1), proposed

  def propose(self, state: HierarchicalState, ctx, stop, sampling, key):
    del stop
    if not sampling.greedy:
      raise ValueError("Hierarchical drafting is greedy-only.")
    b = ctx.history.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    carry = (state.cache, state.inner, self._ctx(ctx, None).history, ctx.length, zeros,
             state.feats, jnp.int32(0))
    step = lambda c: self._round(ctx, sampling, key, c)
    carry, first = step(carry)  # the first proposal: what commit starts from
    carry = jax.lax.while_loop(
        lambda c: (c[6] < self.depth + 1) & jnp.any((c[4] <= self.depth) & ctx.live),
        lambda c: step(c)[0], carry)
    grown, _, history, _, _, feats, rounds = carry
    chain = jnp.take_along_axis(history, ctx.length[:, None] + jnp.arange(self.depth), 1)
    tree = DraftTree.chain(chain, jnp.ones((b, self.depth), bool))
    return tree, state.replace(proposed=first, feats=feats, grown=grown), jnp.full(
        (b,), rounds, jnp.int32)

  def commit(self, state: HierarchicalState, ctx, verdict, features):
    del features
    a_B = verdict.accepted_drafts
    cache = state.grown.replace(lengths=ctx.length + a_B)  # root + accepted chain tokens
    inner = self.inner.commit(state.proposed, self._ctx(ctx, state.cache), verdict,
                              state.feats)
    return state.replace(cache=cache, inner=inner)


def create(intermediate: Model, inner, depth: int = 6) -> Hierarchical:
  """The chain of `depth` tokens `intermediate` accepts from `inner`'s drafts, for the
  target to verify."""
  if hasattr(inner, "accept_depth"):  # a step's commit may accept the whole chain
    inner = inner.replace(accept_depth=max(int(depth), inner.num_nodes))
  h = Hierarchical(inner, intermediate.params, intermediate.config, int(depth))
  h.validate(intermediate.config)
  return h


@registry.DRAFTERS.register("hierarchical", takes_stop_policy=False, greedy_only=True)
def _build(target: Model, *, checkpoint: str, intermediate_layers: int, depth: int = 6,
           head: str = "eagle", top_k: int | None = None, head_depth: int | None = None,
           num_nodes: int | None = None) -> Hierarchical:
  """Hierarchical drafting (greedy): the `head` ("eagle" or "eagle3") at `checkpoint`
  drafts trees (EAGLE-2's dynamic tree with `num_nodes`) for the target's first
  `intermediate_layers` layers, whose first `depth` accepted tokens the target verifies.
  Build it for the quantized target (`Model.quantized`): its truncation is the quantized
  layers' too, so give the float model's truncation as intermediate through `create` to
  keep it in float."""
  intermediate = target.truncated(int(intermediate_layers))
  inner = io.trained_drafter(head, intermediate, checkpoint, None, depth=head_depth,
                             top_k=top_k, num_nodes=num_nodes)
  return create(intermediate, inner, depth)
