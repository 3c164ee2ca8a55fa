"""Training-free stop policies: fixed length, draft confidence, SVIP entropy."""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

static = lambda default: flax.struct.field(pytree_node=False, default=default)


def entropy(q_BxV):
  return -jnp.sum(jnp.where(q_BxV > 0, q_BxV * jnp.log(q_BxV), 0.0), -1)


@flax.struct.dataclass
class Fixed:
  """Always draft the drafter's full `num_draft` tokens."""

  def init(self, batch):
    return ()

  def stop(self, state, step, q_BxV, hidden_BxH):
    return jnp.zeros(q_BxV.shape[0], bool), state


@flax.struct.dataclass
class Confidence:
  """Stop when the draft's top probability falls below `threshold` (after `min_len`)."""

  threshold: float = static(0.4)
  min_len: int = static(1)

  def init(self, batch):
    return ()

  def stop(self, state, step, q_BxV, hidden_BxH):
    return (step >= self.min_len) & (jnp.max(q_BxV, -1) < self.threshold), state


@flax.struct.dataclass
class SVIP:
  """SVIP (Zhang et al. 2025): stop when sqrt(gamma * H(q)) > threshold, H = draft entropy.

  Paper defaults: gamma 0.15, threshold 0.3, cap 40 (set the drafter's num_draft).
  """

  gamma: float = static(0.15)
  threshold: float = static(0.3)
  min_len: int = static(1)

  def init(self, batch):
    return ()

  def stop(self, state, step, q_BxV, hidden_BxH):
    h = entropy(q_BxV)
    return (step >= self.min_len) & (jnp.sqrt(self.gamma * h) > self.threshold), state
