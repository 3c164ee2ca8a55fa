"""Model: a config, its params pytree and a tokenizer, plus the one pure forward.

`forward(cfg, params, tokens, positions, visible, cache)` is the only way any part of
specjax runs a network: full causal passes (no cache), prefill, one-token decode steps and
the verification of a whole draft tree (explicit positions + ancestor mask) all go through
it.

Heads that share the target's weights reach them through `shared_params`, `embed` and
`lm_head` (and a self-drafter through `Model.truncated`), never by picking parameter names
themselves.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from specjax.models import quant
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.gpt2 import GPT2
from specjax.models.hybrid import Hybrid
from specjax.models.llama import Llama

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# A feature index names what a drafter reads from the target: i >= 0 is the input of layer
# i (the residual stream before it); FINAL is the final normed state the LM head reads.
FINAL = -1
# Where each architecture keeps its token embedding (the LM head too, when tied).
_EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "hybrid": "embed_tokens"}


def parse_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}.")
    return DTYPES[dtype]
  return jnp.dtype(dtype).type


def param_dtype(params: Any) -> jnp.dtype:
  """The dtype a params pytree computes in (that of its first float leaf: a quantized
  tree's codes are integers)."""
  return next(x.dtype for x in jax.tree.leaves(params)
              if jnp.issubdtype(x.dtype, jnp.inexact))


def module(cfg: ModelConfig, dtype=jnp.float32):
  return {"llama": Llama, "gpt2": GPT2, "hybrid": Hybrid}[cfg.arch](cfg, dtype)


class Forward(NamedTuple):
  logits: jax.Array  # float32[B, T, V]
  hidden: jax.Array  # [B, T, H], the final normed state the LM head reads
  features: tuple  # the requested features (see FINAL), each [B, T, H]
  cache: KVCache | None


def check_features(cfg: ModelConfig, features) -> tuple[int, ...]:
  """Validates feature indices against a config; returns them as a tuple of ints."""
  features = tuple(int(f) for f in features)
  bad = [f for f in features if not (f == FINAL or 0 <= f < cfg.num_layers)]
  if bad:
    raise ValueError(f"Feature indices {bad} do not exist in a {cfg.num_layers}-layer model: "
                     f"use 0..{cfg.num_layers - 1} (layer inputs) or {FINAL} (final state).")
  return features


def causal(t: int) -> jax.Array:
  """bool[1, T, T]: T new tokens in a chain, each seeing itself and those before it."""
  return jnp.tril(jnp.ones((t, t), bool))[None]


def forward(cfg: ModelConfig, params: Any, tokens_BxT: jax.Array, positions_BxT: jax.Array,
            visible_BxTxT: jax.Array, cache: KVCache | None = None,
            features: tuple[int, ...] = (), prefix_BxTxS: jax.Array | None = None,
            extra_embeddings_NxH: jax.Array | None = None) -> Forward:
  """Runs the network on T new tokens per sequence.

  New token t sees new token t' when `visible_BxTxT[b, t, t']` (`causal(T)` for a chain, an
  ancestor mask for a tree). With a cache it also sees the committed slots
  `[0, cache.lengths)` (or the slots `prefix_BxTxS` marks, see `KVCache.prefix_mask`; only
  the committed form reaches a tree-attention kernel, `cfg.attention_impl`),
  and its key/value is written at slot `cache.lengths + t`; the returned cache has the same
  `lengths` (commit or advance afterwards). `features` names hidden states to return
  (layer inputs, or FINAL), in that order. `extra_embeddings_NxH` (Llama family): token
  id V + i, past the vocabulary, embeds as row i (trainable prompt tokens: PPD).

  Mamba-2 layers (`cfg.ssm_layers`) read the cache's committed recurrent state and see
  only it and the new tokens' ancestors (`visible_BxTxT` must be a tree: each token's
  visible set one root-to-token path); the returned cache carries their pending
  ingredients until `commit` / `advance` (`models.ssm`).
  """
  if cfg.arch == "hybrid" and cfg.state_layers and prefix_BxTxS is not None:
    raise ValueError(
        f"A {cfg.model_type} model's Mamba-2 layers keep one recurrent state of the committed "
        "tokens: they cannot also see uncommitted entries past them (prefix_BxTxS), as a "
        "drafter that writes its tree level by level into its own cache needs. Draft for "
        "this target with an attention-only model (e.g. an independent draft LM, or a "
        "truncation that ends before the first Mamba-2 layer).")
  layers = tuple(sorted({f for f in features if f != FINAL}))
  params = quant.materialize(params)  # quantized kernels dequantised before their matmuls
  if cache is not None and prefix_BxTxS is None and cfg.attention_impl == "xla":
    prefix_BxTxS = cache.prefix_mask(tokens_BxT.shape[1])  # once, not per layer
  extra = {} if extra_embeddings_NxH is None else {"extra_embeds": extra_embeddings_NxH}
  logits, hidden, layer_inputs, cache = module(cfg, param_dtype(params)).apply(
      {"params": params}, tokens_BxT, positions_BxT, visible_BxTxT, cache, prefix_BxTxS, layers,
      **extra)
  picked = tuple(hidden if f == FINAL else layer_inputs[layers.index(f)] for f in features)
  return Forward(logits, hidden, picked, cache)


# Prompt tokens per prefill forward: prompts of any length share one compiled program.
PREFILL_CHUNK = 64


def prefill(cfg: ModelConfig, params: Any, cache: KVCache, tokens_BxL: jax.Array,
            n_B: jax.Array, features: tuple[int, ...] = (),
            chunk: int = PREFILL_CHUNK) -> tuple[KVCache, tuple]:
  """Forwards the first n[b] tokens of each row into an empty cache, `chunk` tokens a
  forward (at most the cache size), in a loop that runs as many chunks as the longest row
  needs.

  Only the cache size and `chunk` are static, so one compiled program serves every prompt
  length. Returns the cache (lengths = n) and the requested features, each [B, L, H] and
  valid at positions < n[b].
  """
  b, l = tokens_BxL.shape
  chunk = min(chunk, cache.max_len)
  width = -(-l // chunk) * chunk
  tokens_BxW = jnp.pad(tokens_BxL, ((0, 0), (0, width - l)))
  dtype = param_dtype(params)
  feats = tuple(jnp.zeros((b, width, cfg.hidden_size), dtype) for _ in features)

  def body(i, carry):
    cache, feats = carry
    start = i * chunk
    tokens = jax.lax.dynamic_slice_in_dim(tokens_BxW, start, chunk, axis=1)
    # Padding past the longest row may run past the context: clamp its positions.
    positions_T = jnp.minimum(start + jnp.arange(chunk), cfg.max_position_embeddings - 1)
    positions = jnp.broadcast_to(positions_T, (b, chunk))
    out = forward(cfg, params, tokens, positions, causal(chunk),
                  cache.replace(lengths=jnp.full((b,), start, jnp.int32)), features)
    feats = tuple(jax.lax.dynamic_update_slice_in_dim(f, new, start, axis=1)
                  for f, new in zip(feats, out.features))
    if out.cache.ssm:  # recurrent states: each row's state at its own length
      return out.cache.advance(jnp.clip(n_B - start, 0, chunk)), feats
    return out.cache, feats

  num_chunks = -(-jnp.max(n_B) // chunk)
  cache, feats = jax.lax.fori_loop(0, num_chunks, body, (cache, feats))
  return cache.replace(lengths=n_B.astype(jnp.int32)), tuple(f[:, :l] for f in feats)


def embed(cfg: ModelConfig, params: Any, tokens_BxT: jax.Array) -> jax.Array:
  """[B, T, H]: the token embeddings (no positions), as heads that share them read them."""
  return jnp.take(params[_EMBEDDING[cfg.arch]]["embedding"], tokens_BxT, axis=0)


def shared_params(cfg: ModelConfig, params: Any) -> dict[str, Any]:
  """The target params `embed` and `lm_head` read: what heads share with it, frozen (the
  same buffers, no copy)."""
  keys = [_EMBEDDING[cfg.arch]] + ([] if cfg.tie_embeddings else ["lm_head"])
  return {k: params[k] for k in keys}


def lm_head_rows(cfg: ModelConfig, params: Any, ids_N: jax.Array) -> jax.Array:
  """[N, H]: the LM head's output rows for token ids (a reduced-vocabulary head's start)."""
  if cfg.tie_embeddings:
    return jnp.take(params[_EMBEDDING[cfg.arch]]["embedding"], ids_N, axis=0)
  return jnp.take(params["lm_head"]["kernel"], ids_N, axis=1).T


def lm_head(cfg: ModelConfig, params: Any, hidden_BxTxH: jax.Array) -> jax.Array:
  """float32[B, T, V]: the target's LM head applied to final-normed hidden states."""
  if cfg.tie_embeddings:
    w_VxH = params[_EMBEDDING[cfg.arch]]["embedding"]
    logits = jnp.einsum("...h,vh->...v", hidden_BxTxH.astype(w_VxH.dtype), w_VxH)
  else:
    w_HxV = params["lm_head"]["kernel"]
    logits = hidden_BxTxH.astype(w_HxV.dtype) @ w_HxV
  return logits.astype(jnp.float32)


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Any:
  """Random params (for tests and drafters trained from scratch)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return module(cfg, dtype).init(rng, tokens, tokens, causal(1), None)["params"]


@functools.partial(jax.jit, static_argnames=("cfg", "features"))
def causal_forward(cfg, params, tokens_BxT, features=()) -> Forward:
  """A full causal forward without cache (every position, every requested feature)."""
  b, t = tokens_BxT.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  return forward(cfg, params, tokens_BxT, positions, causal(t), features=features)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A loaded LM. `params` is a flax params pytree; `tokenizer` may be None."""

  config: ModelConfig
  params: Any
  tokenizer: Any = None
  name: str = ""
  # The Medusa-2 head folder whose LoRA is merged into these params (`medusa.merged_target`):
  # that head decodes losslessly relative to this model only. None for a plain model.
  merged_head: str | None = None

  @property
  def dtype(self):
    return param_dtype(self.params)

  def logits(self, tokens_BxT) -> jax.Array:
    """float32[B, T, V]: a full causal forward without cache."""
    tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
    if tokens_BxT.ndim != 2:
      raise ValueError(f"tokens must be [batch, time]; got shape {tokens_BxT.shape}.")
    return causal_forward(self.config, self.params, tokens_BxT).logits

  def with_attention(self, impl: str) -> "Model":
    """The same model (same params) whose forward uses attention `impl` ("xla",
    "pallas", ...: `specjax.kernels.attention`)."""
    return dataclasses.replace(self, config=self.config.replace(attention_impl=impl))

  def truncated(self, num_layers: int) -> "Model":
    """The first `num_layers` layers + the final norm and LM head, sharing these params
    (no copy: the forward of the shorter config never reads the later layers)."""
    cfg = self.config
    if not 1 <= num_layers < cfg.num_layers:
      raise ValueError(f"num_layers must be in [1, {cfg.num_layers}); got {num_layers}.")
    return dataclasses.replace(self, config=cfg.replace(num_layers=num_layers),
                               name=f"{self.name}[:{num_layers}]")

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return KVCache.for_config(self.config, batch, max_len, self.dtype)

  def quantized(self, bits: int, group: int = 64) -> "Model":
    """This model with int`bits` weight-only attention and MLP kernels, `group` input rows
    a scale (`models.quant`): a different model, which speculation is lossless against."""
    if self.config.arch != "llama":
      raise ValueError(f"Weight-only quantization is built for Llama-family targets; this "
                       f"one is {self.config.arch!r}.")
    return dataclasses.replace(self, params=quant.quantize(self.params, bits, group),
                               name=f"{self.name}@int{bits}g{group}")
