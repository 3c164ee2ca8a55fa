"""Sampling settings and the warped next-token distribution both models share.

Speculative sampling is lossless for the *warped* target distribution only when the draft
is warped the same way, so target and drafters both call `probs(logits, sampling)`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Sampling:
  """How the next token is drawn: temperature, then a top-k cut (0 = none), then a top-p
  cut (1 = none). Build it with `Sampling.create`, which checks the numbers.

  Only `greedy` (temperature 0: argmax everywhere) and `without_replacement` shape a
  compiled decode. The three numbers are pytree leaves, traced inside `jax.jit`: one
  program serves every temperature, top-k and top-p, so a sweep over them compiles once.

  `without_replacement`: tree drafters draw each node's children as distinct tokens
  (Gumbel-top-k, kept in the order drawn) instead of i.i.d.; what Recursive SD's
  verification needs, set by `generate` when acceptance="rsd".
  """

  temperature: Any = 0.0
  top_k: Any = 0
  top_p: Any = 1.0
  greedy: bool = flax.struct.field(pytree_node=False, default=True)
  without_replacement: bool = flax.struct.field(pytree_node=False, default=False)

  def __post_init__(self):
    if isinstance(self.temperature, (int, float)) and self.greedy != (self.temperature == 0):
      raise ValueError(f"Sampling(temperature={self.temperature}) says greedy={self.greedy}; "
                       "build it with Sampling.create.")

  @classmethod
  def create(cls, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None) -> "Sampling":
    if not math.isfinite(temperature) or temperature < 0:
      raise ValueError(f"temperature must be a finite number >= 0; got {temperature}.")
    if top_k is not None and (not isinstance(top_k, (int, np.integer))
                              or isinstance(top_k, (bool, np.bool_)) or top_k < 1):
      raise ValueError(f"top_k must be an integer >= 1 (or None: no cut); got {top_k!r}.")
    if top_p is not None and not 0 < top_p <= 1:  # also refuses nan
      raise ValueError(f"top_p must be in (0, 1]; got {top_p}.")
    return cls(float(temperature), 0 if top_k is None else int(top_k),
               1.0 if top_p is None else float(top_p), greedy=temperature == 0)


def probs(logits_xV: jax.Array, s: Sampling) -> jax.Array:
  """float32[..., V]: the distribution tokens are drawn from (one-hot argmax if greedy)."""
  logits_xV = logits_xV.astype(jnp.float32)
  if s.greedy:
    return jax.nn.one_hot(jnp.argmax(logits_xV, -1), logits_xV.shape[-1], dtype=jnp.float32)
  logits_xV = logits_xV / s.temperature
  # The cuts sort the vocabulary: skipped at run time when neither is set.
  cut = ((s.top_k > 0) & (s.top_k < logits_xV.shape[-1])) | (s.top_p < 1)
  return jax.nn.softmax(jax.lax.cond(cut, _cut, lambda x, _: x, logits_xV, s), -1)


def _cut(logits_xV: jax.Array, s: Sampling) -> jax.Array:
  """`logits_xV` with -inf outside the top-k, then outside the top-p nucleus (ties with
  the last kept logit stay; the most likely token always stays)."""
  v = logits_xV.shape[-1]
  sorted_xV = jnp.sort(logits_xV, axis=-1)[..., ::-1]
  k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, v), v)
  kth = jax.lax.dynamic_index_in_dim(sorted_xV, k - 1, axis=-1)
  sorted_xV = jnp.where(sorted_xV < kth, -jnp.inf, sorted_xV)
  p_xV = jax.nn.softmax(sorted_xV, -1)
  # The smallest prefix whose mass reaches top_p (none of it cut when top_p is 1).
  keep_xV = ((jnp.cumsum(p_xV, -1) - p_xV) < s.top_p) | (s.top_p >= 1)
  cutoff = jnp.min(jnp.where(keep_xV & (sorted_xV > -jnp.inf), sorted_xV, jnp.inf), -1,
                   keepdims=True)
  return jnp.where(logits_xV < cutoff, -jnp.inf, logits_xV)


def entropy(p_xV: jax.Array) -> jax.Array:
  """float32[...]: the Shannon entropy (nats) of distributions over the last axis."""
  return -jnp.sum(jnp.where(p_xV > 0, p_xV * jnp.log(jnp.where(p_xV > 0, p_xV, 1.0)), 0.0), -1)


def sample(key: jax.Array, p_xV: jax.Array, s: Sampling) -> jax.Array:
  """Draws one token per row of a `probs` distribution (its argmax when greedy, which
  skips drawing V Gumbel variables per row)."""
  if s.greedy:
    return jnp.argmax(p_xV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, jnp.log(p_xV), axis=-1).astype(jnp.int32)


def draw(key: jax.Array, logits_xV: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array | None]:
  """A drafter's next token from its logits, with the distribution it was drawn from (what
  speculative sampling verifies against): the argmax and None when greedy."""
  if s.greedy:
    return jnp.argmax(logits_xV, axis=-1).astype(jnp.int32), None
  q = probs(logits_xV, s)
  return sample(key, q, s), q


def sample_distinct(key: jax.Array, p_xV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(int32[..., k], bool[..., k]): k distinct tokens drawn without replacement from each
  row of `p_xV`, in the order drawn (Gumbel-top-k: the k largest log p + Gumbel noise),
  and whether each is real (a row with fewer than k tokens of nonzero mass pads with
  invalid ones)."""
  g_xV = jnp.log(p_xV) + jax.random.gumbel(key, p_xV.shape)
  score, tok = jax.lax.top_k(g_xV, k)
  return tok.astype(jnp.int32), jnp.isfinite(score)
