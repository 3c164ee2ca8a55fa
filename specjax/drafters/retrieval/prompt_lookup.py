"""Prompt lookup (model-free): copy what followed an earlier occurrence of the last n-gram.

For n from `max_ngram` down to `min_ngram`, find the earliest earlier position where the
last n tokens of prompt + output occur, and propose the (up to) `depth` tokens that
followed it (the rule of transformers' `prompt_lookup_num_tokens`). Deterministic, no
distribution: verification treats q as one-hot. Stop policies do not apply (no q).
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

from specjax import registry
from specjax.tree import DraftTree


@flax.struct.dataclass
class PromptLookup:
  depth: int = flax.struct.field(pytree_node=False, default=10)
  max_ngram: int = flax.struct.field(pytree_node=False, default=3)
  min_ngram: int = flax.struct.field(pytree_node=False, default=1)
  takes_stop_policy = False
  merges = True  # commit needs no tree of its own (`drafters.hybrid`)
  drafts_vary = True  # no match: no drafts
  features = ()

  @property
  def num_nodes(self) -> int:
    return self.depth

  def validate(self, target_config) -> None:
    if self.depth < 1:
      raise ValueError(f"PromptLookup needs depth >= 1; got {self.depth}.")
    if not 1 <= self.min_ngram <= self.max_ngram:
      raise ValueError(f"Need 1 <= min_ngram <= max_ngram; got {self.min_ngram}, "
                       f"{self.max_ngram}.")

  def init(self, ctx, max_len, features):
    return ()

  def propose(self, state, ctx, stop, sampling, key):
    hist_BxL, len_B = ctx.history, ctx.length
    b, l = hist_BxL.shape
    k = self.depth
    pos_L = jnp.arange(l)
    found_B = jnp.zeros(b, bool)
    start_B = jnp.zeros(b, jnp.int32)  # first continuation token of the chosen match
    for n in range(self.max_ngram, self.min_ngram - 1, -1):
      # match_BxL[b, j]: history[j : j+n] equals the last n tokens (and ends before them).
      match_BxL = (pos_L[None] + n < len_B[:, None]) & (len_B[:, None] >= n)
      for t in range(n):
        tail_B = jnp.take_along_axis(hist_BxL, jnp.maximum(len_B - n + t, 0)[:, None], 1)
        shifted_BxL = jnp.roll(hist_BxL, -t, axis=1)
        match_BxL &= shifted_BxL == tail_B
      any_B = match_BxL.any(-1)
      first_B = jnp.argmax(match_BxL, -1).astype(jnp.int32) + n
      start_B = jnp.where(~found_B & any_B, first_B, start_B)
      found_B |= any_B
    idx_BxK = start_B[:, None] + jnp.arange(k)
    tokens_BxK = jnp.take_along_axis(hist_BxL, jnp.minimum(idx_BxK, l - 1), 1)
    valid_BxK = found_B[:, None] & (idx_BxK < len_B[:, None])
    return DraftTree.chain(tokens_BxK, valid_BxK), state, jnp.zeros(b, jnp.int32)

  def commit(self, state, ctx, verdict, features):
    return state


@registry.DRAFTERS.register("prompt_lookup", takes_stop_policy=False)
def _build(target, *, depth: int = 10, max_ngram: int = 3, min_ngram: int = 1):
  """Model-free n-gram lookup in prompt + output."""
  del target
  return PromptLookup(depth, max_ngram, min_ngram)
