"""EasySpec: a draft whose layers run in parallel groups, its cache recalibrated exactly.

After "EasySpec: Layer-Parallel Speculative Decoding for Efficient Multi-GPU
Utilization". A tensor-parallel target spans several devices; its smaller draft runs best
on fewer, so devices idle while it drafts. EasySpec breaks the draft's layer order: the
layers of a group all read the group's input, x <- x + sum_l (layer_l(x) - x)
(`models.skip.forward_layer_parallel`), so a group's layers can run on different devices
at once. The drafts are approximate (verification keeps the output exact), and so are the
keys/values the drafting writes into the draft's cache; after each round one exact
forward over the newly committed tokens rewrites them, so the error does not accumulate.

Departure: the paper drafts trees (top-k per depth); this drafts chains.

Here the draft is an LM with its own KV cache (the target's first layers or an
independent model). Its cache holds the committed tokens, computed exactly: each step
first forwards the tokens committed since the last (up to depth + 1, the calibration
forward, layers in order), whose last output gives the first draft, then drafts the rest
of a chain of `depth` with the layer-parallel forward (`group` layers a group). The
drafted entries are dropped: the next step's calibration forward recomputes whatever of
them was accepted.

On one device the groups run one after another: what is tested here is the algorithm
(outputs equal to AR on a mesh of 8 forced host devices; tau against the exact draft).
`predicted_draft_ms` gives the draft forward's time when each group's layers run on
`group` devices at once.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import models, registry
from specjax import sampling as sampling_lib
from specjax.models import skip
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import Model, causal, forward, param_dtype, prefill
from specjax.tree import DraftTree


@flax.struct.dataclass
class EasySpec:
  params: Any
  config: ModelConfig = flax.struct.field(pytree_node=False)
  depth: int = flax.struct.field(pytree_node=False, default=4)
  group: int = flax.struct.field(pytree_node=False, default=2)
  takes_stop_policy = False
  drafts_vary = False
  features = ()

  @property
  def num_nodes(self) -> int:
    return self.depth

  def validate(self, target_config: ModelConfig) -> None:
    skip.check(self.config, "EasySpec's layer-parallel draft")
    if self.config.vocab_size != target_config.vocab_size:
      raise ValueError(f"EasySpec's draft has vocab size {self.config.vocab_size}, the "
                       f"target {target_config.vocab_size}: they must share a tokenizer.")
    for name, v in (("depth", self.depth), ("group", self.group)):
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"EasySpec's {name} must be an integer >= 1; got {v!r}.")

  def init(self, ctx, max_len: int, features) -> KVCache:
    del features
    cache = KVCache.for_config(self.config, ctx.history.shape[0], max_len + 2 * self.depth + 2,
                               param_dtype(self.params))
    return prefill(self.config, self.params, cache, ctx.history, ctx.length - 1)[0]

  def propose(self, cache: KVCache, ctx, stop, sampling, key):
    del stop
    b, width = ctx.history.shape[0], self.depth + 1
    lag = ctx.length - cache.lengths  # 1..depth + 1 for live rows
    j = jnp.arange(width)[None, :]
    window = jnp.take_along_axis(
        ctx.history, jnp.minimum(cache.lengths[:, None] + j, ctx.history.shape[1] - 1), 1)
    # The calibration forward: committed tokens, layers in order (exact keys/values).
    out = forward(self.config, self.params, window, cache.lengths[:, None] + j,
                  causal(width), cache)
    logits = jnp.take_along_axis(out.logits, jnp.maximum(lag - 1, 0)[:, None, None], 1)[:, 0]
    committed = out.cache.advance(lag)
    cache = committed

    keys = jax.random.split(key, self.depth)
    tok, q = sampling_lib.draw(keys[0], logits, sampling)
    toks, qs = [tok], [q]
    for i in range(1, self.depth):  # the rest of the chain, layer-parallel
      step = skip.forward_layer_parallel(self.config, self.params, tok[:, None],
                                         cache.lengths[:, None], causal(1), cache, self.group)
      cache = step.cache.advance(jnp.ones((b,), jnp.int32))
      tok, q = sampling_lib.draw(keys[i], step.logits[:, 0], sampling)
      toks.append(tok)
      qs.append(q)
    tree = DraftTree.chain(jnp.stack(toks, 1), jnp.ones((b, self.depth), bool),
                           None if sampling.greedy else jnp.stack(qs, 1),
                           sampled=not sampling.greedy)
    # Keep the committed tokens' exact entries; drafted ones are recomputed if accepted.
    return tree, cache.replace(lengths=committed.lengths), jnp.full((b,), self.depth,
                                                                    jnp.int32)

  def commit(self, cache: KVCache, ctx, verdict, features) -> KVCache:
    del ctx, verdict, features  # the next step's calibration forward catches up
    return cache

  def predicted_draft_ms(self, layer_ms: float, head_ms: float) -> float:
    """ms of one layer-parallel draft forward when each group's attentions run on separate
    devices at once (the sequential forward: num_layers x layer_ms + head_ms), taking a
    layer's attention as half its time: a group of n costs (1 + n) / 2 layers."""
    groups = skip.layer_groups(self.config.num_layers, self.group)
    return sum((1 + len(g)) / 2 for g in groups) * layer_ms + head_ms


@registry.DRAFTERS.register("easyspec", takes_stop_policy=False)
def _build(target: Model, *, depth: int = 4, group: int = 2, layers: int | None = None,
           checkpoint: str | None = None) -> EasySpec:
  """EasySpec with the target's first `layers` layers or the model at `checkpoint` as the
  draft: a chain of `depth`, layers in groups of `group`."""
  draft = models.draft_lm(target, "easyspec", layers, checkpoint)
  return EasySpec(draft.params, draft.config, depth, group)
