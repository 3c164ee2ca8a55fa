"""Self-speculation from a partial KV cache: the target drafts for itself while reading
only the attention sinks and a recent window of its cache; verification reads all of it.

After MagicDec and TriForce (long-context self-speculation with a StreamingLLM-style draft
cache). At long context and large batch, decoding is bound by reading the KV cache, not
the weights; a draft that runs the target's own layers over a bounded cache costs the
weights plus a constant, and it agrees with the target well because it is the target.
Lossless: the drafts are verified against the full cache by the loop's rule (greedy, or
speculative sampling against the draft distributions they were drawn from).

Each step gathers the first `sinks` committed slots and the last `window` of the target's
committed cache (`Context.cache`) into a compact cache of sinks + window + depth slots,
then drafts a chain of `depth` tokens through the full target against it, one token a
forward. Cached keys carry the rotary phase of their true positions and draft tokens run
at theirs, so the draft attends to a subset of the context at the right distances. The
compact cache's shape does not depend on the context: the draft's memory is bounded
(`cache_slots`).

The compact cache is rebuilt from the target's cache every step (a gather of
sinks + window slots a layer, `models.partial_cache`) rather than kept up to date: one
mechanism, the same entries. SpecPV (`selfdraft.specpv`, lossy) verifies with such a
partial cache as well; this one only drafts with it.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from specjax import registry
from specjax import sampling as sampling_lib
from specjax.models import partial_cache, skip
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import Model, causal, forward
from specjax.tree import DraftTree


@flax.struct.dataclass
class PartialKV:
  params: Any  # the target's
  config: ModelConfig = flax.struct.field(pytree_node=False)
  depth: int = flax.struct.field(pytree_node=False, default=4)
  sinks: int = flax.struct.field(pytree_node=False, default=4)
  window: int = flax.struct.field(pytree_node=False, default=256)
  takes_stop_policy = False
  drafts_vary = False
  features = ()

  @property
  def num_nodes(self) -> int:
    return self.depth

  @property
  def cache_slots(self) -> int:
    """Slots of the draft's cache, whatever the context: sinks + window + depth."""
    return self.sinks + self.window + self.depth

  def validate(self, target_config: ModelConfig) -> None:
    skip.check(target_config, "Partial-KV self-drafting")
    if target_config != self.config:
      raise ValueError("This partial-KV drafter was made for another target.")
    if target_config.sliding_window is not None:
      raise ValueError("Partial-KV self-drafting reads a gathered cache whose slots are not "
                       "positions; a sliding-window target is not supported.")
    if self.depth < 1 or self.sinks < 0 or self.window < 1:
      raise ValueError(f"partial_kv needs depth >= 1, sinks >= 0 and window >= 1; got "
                       f"depth={self.depth}, sinks={self.sinks}, window={self.window}.")

  def init(self, ctx, max_len, features):
    del ctx, max_len, features
    return ()

  def gather(self, cache: KVCache) -> tuple[KVCache, jax.Array]:
    """(the compact cache: sinks and the recent window of `cache`'s committed slots,
    then room for the drafts; bool[B, sinks + window]: which gathered slots hold a
    committed entry, each once)."""
    src_BxJ, valid_BxJ = partial_cache.sinks_and_window(cache.lengths, self.sinks, self.window)
    return partial_cache.gather(cache, src_BxJ, room=self.depth), valid_BxJ

  def propose(self, state, ctx, stop, sampling, key):
    del stop
    b, base = ctx.history.shape[0], self.sinks + self.window
    cache, valid_BxJ = self.gather(ctx.cache)
    tok = ctx.history[jnp.arange(b), ctx.length - 1]  # the root
    keys = jax.random.split(key, self.depth)
    toks, qs = [], []
    for i in range(self.depth):
      slots = jnp.arange(self.cache_slots)[None, :]
      seen = jnp.pad(valid_BxJ, ((0, 0), (0, self.depth))) | ((slots >= base) &
                                                                 (slots < base + i))
      out = forward(self.config, self.params, tok[:, None], (ctx.length - 1 + i)[:, None],
                    causal(1), cache.replace(lengths=jnp.full((b,), base + i, jnp.int32)),
                    prefix_BxTxS=seen[:, None, :])
      cache = out.cache
      logits = out.logits[:, 0]
      tok, q = sampling_lib.draw(keys[i], logits, sampling)
      qs.append(q)
      toks.append(tok)
    tree = DraftTree.chain(jnp.stack(toks, 1), jnp.ones((b, self.depth), bool),
                           None if sampling.greedy else jnp.stack(qs, 1),
                           sampled=not sampling.greedy)
    return tree, state, jnp.full((b,), self.depth, jnp.int32)

  def commit(self, state, ctx, verdict, features):
    del ctx, verdict, features
    return state


@registry.DRAFTERS.register("partial_kv", takes_stop_policy=False)
def _build(target: Model, *, depth: int = 4, sinks: int = 4, window: int = 256) -> PartialKV:
  """The target drafting `depth` tokens for itself over its first `sinks` and last
  `window` cached tokens (MagicDec / TriForce-style self-speculation; lossless)."""
  skip.check(target.config, "Partial-KV self-drafting")
  return PartialKV(target.params, target.config, int(depth), int(sinks), int(window))
