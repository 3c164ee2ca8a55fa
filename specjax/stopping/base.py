"""The stop-policy interface: one per-node hook that chain and tree drafters both call.

A policy is a `flax.struct.dataclass`: its knobs are static fields and learned policies
keep their weights in a `params` pytree field, so the whole policy passes through `jax.jit`
as an argument. Every policy implements

  check(drafter) -> None                        clear errors before anything compiles
  init(batch) -> state                          state of the root; leaves [B, 1, ...]
  stop(state, depth, q_BxKxV, hidden_BxKxH) -> (bool[B, K], state)

A drafter asks `stop` about the K nodes whose children it is about to propose (a chain:
K = 1, the last drafted token; a tree: one level of the tree). `depth` (0-based) is the
depth of those children, `q_BxKxV` the draft's raw (temperature-1) next-token
distributions at the K nodes and `hidden_BxKxH` the drafter's hidden states there. True
means: do not expand that node (its children are not proposed). Per-node state carries
down the tree with `gather(state, parent_BxK)` (identity for chains); the drafter's size
(its `depth`, its tree) is the hard cap.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp


class StopPolicy(Protocol):

  def check(self, drafter) -> None:
    ...

  def init(self, batch: int) -> Any:
    ...

  def stop(self, state: Any, depth: jax.Array, q_BxKxV: jax.Array,
           hidden_BxKxH: jax.Array) -> tuple[jax.Array, Any]:
    ...


def gather(state: Any, parent_BxK: jax.Array) -> Any:
  """Per-node policy state of K children from their parents' (index into axis 1)."""
  return jax.tree.map(
      lambda x: jnp.take_along_axis(x, parent_BxK.reshape(parent_BxK.shape + (1,) * (x.ndim - 2)),
                                    1), state)
