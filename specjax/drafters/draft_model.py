"""Independent draft model: any `Model` config sharing the target's vocabulary.

`DraftModel.truncated(target, n)` keeps the target's first n layers, final norm and LM
head: a training-free self-speculative drafter that needs no extra weights.

The drafter keeps its own KV cache. Its invariant: the cache holds a prefix of the
committed history. Each draft first "catches up" on the 1 or 2 committed tokens it has not
seen (the last accepted draft token, if every draft was accepted, and the new root), then
drafts autoregressively. After verification the cache is cut back to the accepted prefix.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from specjax import sampling as sampling_lib
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import Model, forward
from specjax.tree import DraftTree

_CATCH_UP = 2  # committed tokens the draft may lag behind after a verification


@flax.struct.dataclass
class DraftModel:
  params: Any
  config: ModelConfig = flax.struct.field(pytree_node=False)
  num_draft: int = flax.struct.field(pytree_node=False, default=4)
  takes_stop_policy = True

  @classmethod
  def from_model(cls, model: Model, num_draft: int = 4) -> "DraftModel":
    return cls(model.params, model.config, num_draft)

  @classmethod
  def truncated(cls, target: Model, num_layers: int, num_draft: int = 4) -> "DraftModel":
    """The target's first `num_layers` layers + its final norm and LM head."""
    cfg = target.config
    if not 1 <= num_layers < cfg.num_layers:
      raise ValueError(f"num_layers must be in [1, {cfg.num_layers}); got {num_layers}.")
    prefix = "h_" if cfg.arch == "gpt2" else "layers_"
    params = {k: v for k, v in target.params.items()
              if not k.startswith(prefix) or int(k[len(prefix):]) < num_layers}
    return cls(params, cfg.replace(num_layers=num_layers), num_draft)

  @property
  def num_nodes(self) -> int:
    return self.num_draft

  def validate(self, target_config: ModelConfig) -> None:
    if self.config.vocab_size != target_config.vocab_size:
      raise ValueError(f"Draft vocab size {self.config.vocab_size} != target vocab size "
                       f"{target_config.vocab_size}: draft and target must share a tokenizer.")
    if self.num_draft < 1:
      raise ValueError(f"num_draft must be >= 1; got {self.num_draft}.")

  def init(self, ctx, max_len: int, prompt_width: int) -> KVCache:
    b = ctx.history.shape[0]
    c = self.config
    dtype = jax.tree.leaves(self.params)[0].dtype
    cache = KVCache.create(c.num_layers, b, max_len, c.num_kv_heads, c.head_dim, dtype)
    if prompt_width > 1:
      t = prompt_width - 1
      tokens = ctx.history[:, :t]
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      cache = forward(c, self.params, tokens, positions, cache.attention_mask(num_new=t),
                      cache).cache
    return cache.advance(ctx.length - 1)

  def _step(self, cache: KVCache, tokens_BxT, last_B):
    """Forwards T tokens; returns logits/hidden of token last_B and the written cache."""
    b, t = tokens_BxT.shape
    positions = cache.lengths[:, None] + jnp.arange(t)
    out = forward(self.config, self.params, tokens_BxT, positions,
                  cache.attention_mask(num_new=t), cache)
    pick = lambda x: jnp.take_along_axis(x, last_B[:, None, None], 1)[:, 0]
    return pick(out.logits), pick(out.hidden), out.cache

  def propose(self, cache: KVCache, ctx, stop, sampling, key):
    b, k = ctx.history.shape[0], self.num_draft
    lag_B = ctx.length - cache.lengths  # 1 or 2 for live sequences
    idx = jnp.minimum(cache.lengths[:, None] + jnp.arange(_CATCH_UP), ctx.history.shape[1] - 1)
    catch_up = jnp.take_along_axis(ctx.history, idx, 1)
    logits, hidden, cache = self._step(cache, catch_up, jnp.clip(lag_B - 1, 0, _CATCH_UP - 1))
    cache = cache.advance(jnp.maximum(lag_B, 0))

    def draw(j, logits, hidden, carry):
      tokens, valid, probs, active, pstate, key = carry
      key, sub = jax.random.split(key)
      stop_B, pstate = stop.stop(pstate, j, jax.nn.softmax(logits, -1), hidden)
      active = active & ~stop_B
      q = sampling_lib.probs(logits, sampling)
      tok = sampling_lib.sample(sub, q, sampling)
      return (tokens.at[:, j].set(tok), valid.at[:, j].set(active),
              None if probs is None else probs.at[:, j].set(q), active, pstate, key)

    probs0 = None if sampling.greedy else jnp.zeros((b, k, self.config.vocab_size), jnp.float32)
    carry = (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool), probs0,
             jnp.ones((b,), bool), stop.init(b), key)
    carry = draw(0, logits, hidden, carry)
    calls = jnp.ones((b,), jnp.int32)

    def cond(loop):
      j, _, _, carry = loop
      return (j < k) & carry[3].any()

    def body(loop):
      j, cache, calls, carry = loop
      calls = calls + carry[3]
      last_token = jax.lax.dynamic_slice_in_dim(carry[0], j - 1, 1, axis=1)
      logits, hidden, cache = self._step(cache, last_token, jnp.zeros((b,), jnp.int32))
      return j + 1, cache.advance(jnp.ones((b,), jnp.int32)), calls, draw(j, logits, hidden, carry)

    _, cache, calls, carry = jax.lax.while_loop(cond, body, (1, cache, calls, carry))
    tokens, valid, probs = carry[:3]
    return DraftTree.chain(tokens, valid, probs, sampled=not sampling.greedy), cache, calls

  def commit(self, cache: KVCache, ctx, verdict, target_hidden_BxTxH):
    written_B = cache.lengths - ctx.length
    return cache.replace(lengths=ctx.length + jnp.minimum(verdict.num_accepted, written_B))
