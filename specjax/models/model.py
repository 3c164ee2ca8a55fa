"""Model: a config, its params pytree and a tokenizer, plus the one pure forward.

`forward(cfg, params, tokens, positions, mask, cache)` is the only way any part of specjax
runs a network: full causal passes (no cache), prefill, one-token decode steps and the
verification of a whole draft tree (explicit positions + ancestor mask) all go through it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.gpt2 import GPT2
from specjax.models.llama import Llama

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}.")
    return DTYPES[dtype]
  return jnp.dtype(dtype).type


def module(cfg: ModelConfig, dtype=jnp.float32):
  return {"llama": Llama, "gpt2": GPT2}[cfg.arch](cfg, dtype)


class Forward(NamedTuple):
  logits: jax.Array  # float32[B, T, V]
  hidden: jax.Array  # [B, T, H], the final normed state the LM head reads
  layer_hidden: tuple  # inputs of the requested layers, each [B, T, H]
  cache: KVCache | None


def forward(cfg: ModelConfig, params: Any, tokens_BxT: jax.Array, positions_BxT: jax.Array,
            mask_BxTxS: jax.Array, cache: KVCache | None = None,
            hidden_layers: tuple[int, ...] = ()) -> Forward:
  """Runs the network on T new tokens per sequence.

  With a cache, the new keys/values are written at `cache.lengths + t` and
  `mask_BxTxS` ranges over all cache slots (see `KVCache.attention_mask`); the returned
  cache has the same `lengths` (commit or advance afterwards). Without one, S == T.
  """
  dtype = jax.tree.leaves(params)[0].dtype
  out = module(cfg, dtype).apply({"params": params}, tokens_BxT, positions_BxT, mask_BxTxS,
                                 cache, tuple(hidden_layers))
  return Forward(*out)


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Any:
  """Random params (for tests and drafters trained from scratch)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return module(cfg, dtype).init(rng, tokens, tokens, jnp.ones((1, 1, 1), bool), None)["params"]


@functools.partial(jax.jit, static_argnames="cfg")
def _causal_logits(cfg, params, tokens_BxT):
  b, t = tokens_BxT.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  return forward(cfg, params, tokens_BxT, positions, mask).logits


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A loaded LM. `params` is a flax params pytree; `tokenizer` may be None."""

  config: ModelConfig
  params: Any
  tokenizer: Any = None
  name: str = ""

  @property
  def dtype(self):
    return jax.tree.leaves(self.params)[0].dtype

  def logits(self, tokens_BxT) -> jax.Array:
    """float32[B, T, V]: a full causal forward without cache."""
    tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
    if tokens_BxT.ndim != 2:
      raise ValueError(f"tokens must be [batch, time]; got shape {tokens_BxT.shape}.")
    return _causal_logits(self.config, self.params, tokens_BxT)

  def forward(self, params, tokens_BxT, positions_BxT, mask_BxTxS, cache=None,
              hidden_layers=()) -> Forward:
    return forward(self.config, params, tokens_BxT, positions_BxT, mask_BxTxS, cache,
                   hidden_layers)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    c = self.config
    return KVCache.create(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, self.dtype)
