"""DraftTree: the candidates one draft step proposes, with what verification needs.

A tree has a static number N of nodes per sequence, stored parents first (node i's parent
is -1 = the root, i.e. the last committed token, or an index < i). A chain is a tree whose
node i has parent i - 1. Nodes cut off by a stop policy (or that a drafter could not fill)
are marked invalid and can never be accepted, which keeps every shape static.

The target verifies `[root, node_0, ..., node_{N-1}]` in one forward: node i sits at
position `root_position + depth[i]` and sees the context, the root and its own ancestors.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class DraftTree:
  tokens: jax.Array  # int32[B, N]
  parents: jax.Array  # int32[B, N], -1 = root
  valid: jax.Array  # bool[B, N]
  # float32[B, N, V]: the draft distribution node i was drawn from (its parent's), or None
  # when the drafter picked tokens without a distribution (prompt lookup).
  probs: jax.Array | None = None
  # True when tokens were *sampled* from `probs`; False when chosen deterministically
  # (argmax, top-k, lookup): lossless verification then treats q as one-hot on the token.
  sampled: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def num_nodes(self) -> int:
    return self.tokens.shape[1]

  @classmethod
  def chain(cls, tokens_BxN, valid_BxN, probs_BxNxV=None, sampled=False) -> "DraftTree":
    b, n = tokens_BxN.shape
    parents = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) - 1, (b, n))
    return cls(tokens_BxN.astype(jnp.int32), parents, valid_BxN, probs_BxNxV, sampled)

  def ancestor_mask(self) -> jax.Array:
    """bool[B, N, N]: [b, i, j] is True when j is i or an ancestor of i."""
    n = self.num_nodes
    step_BxNxN = jax.nn.one_hot(self.parents, n, dtype=jnp.bool_) | jnp.eye(n, dtype=bool)
    closure = step_BxNxN
    for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
      closure = jnp.einsum("bij,bjk->bik", closure.astype(jnp.int32),
                           closure.astype(jnp.int32)) > 0
    return closure

  def depth(self) -> jax.Array:
    """int32[B, N]: 1 for children of the root."""
    return jnp.sum(self.ancestor_mask(), axis=-1, dtype=jnp.int32)

  def verify_inputs(self, root_B: jax.Array, root_position_B: jax.Array):
    """(tokens [B, 1+N], positions [B, 1+N], mask [B, 1+N, 1+N]) for the target forward."""
    b, n = self.tokens.shape
    anc_BxNxN = self.ancestor_mask()
    tokens = jnp.concatenate([root_B[:, None], self.tokens], axis=1)
    depth = jnp.concatenate([jnp.zeros((b, 1), jnp.int32),
                             jnp.sum(anc_BxNxN, -1, dtype=jnp.int32)], axis=1)
    mask = jnp.zeros((b, n + 1, n + 1), bool).at[:, :, 0].set(True)
    mask = mask.at[:, 1:, 1:].set(anc_BxNxN)
    return tokens, root_position_B[:, None] + depth, mask


def parents_from_choices(choices: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Static tree from Medusa-style choice lists.

  Each choice is a path of ranks, e.g. (0, 1) = the 2nd-ranked candidate after the
  top-ranked first token. Returns (parents[N], rank[N]) with nodes sorted by depth then
  lexicographically, so parents precede children and siblings come in rank order.
  """
  paths = sorted({tuple(c) for c in choices}, key=lambda c: (len(c), c))
  index = {p: i for i, p in enumerate(paths)}
  parents, ranks = [], []
  for p in paths:
    if not p or min(p) < 0:
      raise ValueError(f"Invalid tree choice {p}: paths are non-empty lists of ranks >= 0.")
    if len(p) > 1 and p[:-1] not in index:
      raise ValueError(f"Tree choice {p} has no parent {p[:-1]} in the choice list.")
    parents.append(index[p[:-1]] if len(p) > 1 else -1)
    ranks.append(p[-1])
  return np.asarray(parents, np.int32), np.asarray(ranks, np.int32)
