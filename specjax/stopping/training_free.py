"""Training-free stop policies: fixed length, draft confidence, SVIP entropy."""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp

from specjax import registry
from specjax.sampling import entropy

static = lambda default: flax.struct.field(pytree_node=False, default=default)


@registry.STOP_POLICIES.register("fixed")
@flax.struct.dataclass
class Fixed:
  """Always draft the drafter's full size."""

  def check(self, drafter) -> None:
    del drafter  # drives any drafter with a distribution

  def init(self, batch):
    return ()

  def stop(self, state, depth, q_BxKxV, hidden_BxKxH):
    return jnp.zeros(q_BxKxV.shape[:2], bool), state


@registry.STOP_POLICIES.register("confidence")
@flax.struct.dataclass
class Confidence:
  """Stop when the draft's top probability falls below `threshold` (after `min_len`)."""

  threshold: float = static(0.4)
  min_len: int = static(1)

  def check(self, drafter) -> None:
    del drafter  # drives any drafter with a distribution

  def init(self, batch):
    return ()

  def stop(self, state, depth, q_BxKxV, hidden_BxKxH):
    return (depth >= self.min_len) & (jnp.max(q_BxKxV, -1) < self.threshold), state


@registry.STOP_POLICIES.register("svip")
@flax.struct.dataclass
class SVIP:
  """SVIP (Zhang et al. 2025): stop when sqrt(gamma * H(q)) > threshold, H = draft entropy.

  Paper defaults: gamma 0.15, threshold 0.3, cap 40 (set the drafter's depth).
  """

  gamma: float = static(0.15)
  threshold: float = static(0.3)
  min_len: int = static(1)

  def check(self, drafter) -> None:
    del drafter  # drives any drafter with a distribution

  def init(self, batch):
    return ()

  def stop(self, state, depth, q_BxKxV, hidden_BxKxH):
    h = entropy(q_BxKxV)
    return (depth >= self.min_len) & (jnp.sqrt(self.gamma * h) > self.threshold), state
