"""Sampling settings and the warped next-token distribution both models share.

Speculative sampling is lossless for the *warped* target distribution only when the draft
is warped the same way, so target and drafters both call `probs(logits, sampling)`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 means greedy; top_k / top_p apply after the temperature."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not math.isfinite(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature must be a finite number >= 0; got {self.temperature}.")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1; got {self.top_k}.")
    if self.top_p is not None and not 0 < self.top_p <= 1:  # also refuses nan
      raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def probs(logits_xV: jax.Array, s: Sampling) -> jax.Array:
  """float32[..., V]: the distribution tokens are drawn from (one-hot argmax if greedy)."""
  logits_xV = logits_xV.astype(jnp.float32)
  if s.greedy:
    return jax.nn.one_hot(jnp.argmax(logits_xV, -1), logits_xV.shape[-1], dtype=jnp.float32)
  logits_xV = logits_xV / s.temperature
  if s.top_k is not None and s.top_k < logits_xV.shape[-1]:
    kth = jax.lax.top_k(logits_xV, s.top_k)[0][..., -1:]
    logits_xV = jnp.where(logits_xV < kth, -jnp.inf, logits_xV)
  if s.top_p is not None and s.top_p < 1:
    sorted_xV = jnp.sort(logits_xV, axis=-1)[..., ::-1]
    cum_xV = jnp.cumsum(jax.nn.softmax(sorted_xV, -1), -1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep_xV = (cum_xV - jax.nn.softmax(sorted_xV, -1)) < s.top_p
    cutoff = jnp.min(jnp.where(keep_xV, sorted_xV, jnp.inf), -1, keepdims=True)
    logits_xV = jnp.where(logits_xV < cutoff, -jnp.inf, logits_xV)
  return jax.nn.softmax(logits_xV, -1)


def entropy(p_xV: jax.Array) -> jax.Array:
  """float32[...]: the Shannon entropy (nats) of distributions over the last axis."""
  return -jnp.sum(jnp.where(p_xV > 0, p_xV * jnp.log(jnp.where(p_xV > 0, p_xV, 1.0)), 0.0), -1)


def sample(key: jax.Array, p_xV: jax.Array, s: Sampling) -> jax.Array:
  """Draws one token per row of a `probs` distribution (its argmax when greedy, which
  skips drawing V Gumbel variables per row)."""
  if s.greedy:
    return jnp.argmax(p_xV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, jnp.log(p_xV), axis=-1).astype(jnp.int32)
