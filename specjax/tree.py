"""DraftTree: the candidates one draft step proposes, with what verification needs.

A tree has a static number N of nodes per sequence, stored parents first (node i's parent
is -1 = the root, i.e. the last committed token, or an index < i). A chain is a tree whose
node i has parent i - 1. Nodes cut off by a stop policy (or that a drafter could not fill)
are marked invalid and can never be accepted, which keeps every shape static.

Draft distributions are stored once per *parent*: siblings were drawn from the same
distribution, so `probs[b, m]` holds M distributions and `dist[b, i]` says which one node
i was drawn from (a chain has M = N and dist = arange(N)).

The target verifies `[root, node_0, ..., node_{N-1}]` in one forward: node i sits at
position `root_position + depth[i]` and sees the context, the root and its own ancestors.

`StaticTree` is a fixed topology (a Medusa-style choice list, or a chain) laid out in
levels for drafters that expand it one depth at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def check_parents_first(parents: np.ndarray) -> None:
  """Raises unless every parent index is -1 (root) or smaller than its child's index:
  the order verification walks and cache commits rely on."""
  parents = np.asarray(parents)
  idx = np.arange(parents.shape[-1])
  bad = np.argwhere((parents < -1) | (parents >= idx))
  if bad.size:
    i = tuple(bad[0])
    raise ValueError(f"Tree nodes must come after their parents: node {i[-1]} has parent "
                     f"{parents[i]}.")


@flax.struct.dataclass
class DraftTree:
  tokens: jax.Array  # int32[B, N]
  parents: jax.Array  # int32[B, N], -1 = root
  valid: jax.Array  # bool[B, N]
  # float32[B, M, V]: the draft distributions children were drawn from (one per parent),
  # or None when the drafter picked tokens without a distribution (prompt lookup).
  probs: jax.Array | None = None
  dist: jax.Array | None = None  # int32[B, N]: the row of `probs` node i was drawn from
  # True when tokens were *sampled* from `probs`; False when chosen deterministically
  # (argmax, top-k, lookup): lossless verification then treats q as one-hot on the token.
  sampled: bool = flax.struct.field(pytree_node=False, default=False)
  # True when each node's sampled children are distinct, drawn without replacement and
  # stored in the order drawn (`Sampling.without_replacement`): Recursive SD verifies them.
  distinct: bool = flax.struct.field(pytree_node=False, default=False)
  # float[B, N, H]: the drafter's hidden state at each node after reading its token (what
  # stop policies see there), and bool[B, N]: whether the drafter forwarded the node at all
  # (its deepest level never is). None for drafters without a network (lookup, Medusa).
  hidden: jax.Array | None = None
  forwarded: jax.Array | None = None

  @property
  def num_nodes(self) -> int:
    return self.tokens.shape[1]

  @classmethod
  def chain(cls, tokens_BxN, valid_BxN, probs_BxNxV=None, sampled=False) -> "DraftTree":
    """Node i follows node i - 1 and was drawn from probs[:, i]."""
    b, n = tokens_BxN.shape
    parents = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) - 1, (b, n))
    dist = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    return cls(tokens_BxN.astype(jnp.int32), parents, valid_BxN, probs_BxNxV, dist, sampled)

  def first(self, m: int) -> "DraftTree":
    """Nodes [0, m) alone (static m): what verification needs when no later node is
    valid. Parents come first, so every kept node's parent is kept; `probs` stays whole
    (rows are addressed through `dist`)."""
    cut = lambda x: None if x is None else x[:, :m]
    return self.replace(tokens=self.tokens[:, :m], parents=self.parents[:, :m],
                        valid=self.valid[:, :m], dist=cut(self.dist), hidden=cut(self.hidden),
                        forwarded=cut(self.forwarded))

  def draft_probs(self, i: int) -> jax.Array:
    """float32[B, V]: the distribution node i was drawn from."""
    return jnp.take_along_axis(self.probs, self.dist[:, i, None, None], 1)[:, 0]

  def ancestor_mask(self) -> jax.Array:
    """bool[B, N, N]: [b, i, j] is True when j is i or an ancestor of i."""
    return ancestor_mask(self.parents)

  def depth(self) -> jax.Array:
    """int32[B, N]: 1 for children of the root."""
    return jnp.sum(self.ancestor_mask(), axis=-1, dtype=jnp.int32)

  def verify_inputs(self, root_B: jax.Array, root_position_B: jax.Array):
    """(tokens [B, 1+N], positions [B, 1+N], mask [B, 1+N, 1+N]) for the target forward."""
    b, n = self.tokens.shape
    anc_BxNxN = self.ancestor_mask()
    tokens = jnp.concatenate([root_B[:, None], self.tokens], axis=1)
    depth = jnp.concatenate([jnp.zeros((b, 1), jnp.int32),
                             jnp.sum(anc_BxNxN, -1, dtype=jnp.int32)], axis=1)  # root: 0
    mask = jnp.zeros((b, n + 1, n + 1), bool).at[:, :, 0].set(True)
    mask = mask.at[:, 1:, 1:].set(anc_BxNxN)
    return tokens, root_position_B[:, None] + depth, mask


def ancestor_mask(parents_xN) -> jax.Array:
  """bool[..., N, N]: [..., i, j] is True when j is i or an ancestor of i."""
  n = parents_xN.shape[-1]
  closure = jax.nn.one_hot(parents_xN, n, dtype=jnp.int32) | jnp.eye(n, dtype=jnp.int32)
  for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):
    closure = (jnp.einsum("...ij,...jk->...ik", closure, closure) > 0).astype(jnp.int32)
  return closure > 0


def parents_from_choices(choices: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Static tree from Medusa-style choice lists.

  Each choice is a path of ranks, e.g. (0, 1) = the 2nd-ranked candidate after the
  top-ranked first token. Returns (parents[N], rank[N]) with nodes sorted by depth then
  lexicographically, so parents precede children and siblings come in rank order.
  """
  paths = sorted({tuple(c) for c in choices}, key=lambda c: (len(c), c))
  if not paths:
    raise ValueError("A tree needs at least one choice path.")
  index = {p: i for i, p in enumerate(paths)}
  parents, ranks = [], []
  for p in paths:
    if not p or min(p) < 0:
      raise ValueError(f"Invalid tree choice {p}: paths are non-empty lists of ranks >= 0.")
    if len(p) > 1 and p[:-1] not in index:
      raise ValueError(f"Tree choice {p} has no parent {p[:-1]} in the choice list.")
    parents.append(index[p[:-1]] if len(p) > 1 else -1)
    ranks.append(p[-1])
  parents = np.asarray(parents, np.int32)
  check_parents_first(parents)
  return parents, np.asarray(ranks, np.int32)


@dataclasses.dataclass(frozen=True)
class StaticTree:
  """A fixed draft-tree topology, laid out in levels of equal (padded) width.

  Level d holds the nodes at depth d + 1; slot j of level d is padded node d * width + j.
  Real nodes (those of the choice list) are numbered parents first as the verifier sees
  them; `padded_index[i]` is where real node i sits in the level layout. Padding slots
  exist only so that every level is one static-width forward of the drafter.
  """

  parents: tuple[int, ...]  # real node -> real parent (-1 = root)
  ranks: tuple[int, ...]  # real node -> rank among its parent's candidates

  @classmethod
  def chain(cls, n: int) -> "StaticTree":
    if n < 1:
      raise ValueError(f"A draft chain needs at least 1 token; got depth={n}.")
    return cls(tuple(range(-1, n - 1)), (0,) * n)

  @classmethod
  def build(cls, depth: int, top_k: int = 1,
            tree: Sequence[Sequence[int]] | None = None) -> "StaticTree":
    """The static tree of the draft-size knobs every drafter takes: the choice paths
    `tree` when given, else the full `top_k`-ary tree `depth` levels deep (a chain of
    `depth` tokens when top_k = 1)."""
    if tree is not None:
      return cls.from_choices(tree)
    if top_k < 1:
      raise ValueError(f"A draft tree needs top_k >= 1; got top_k={top_k}.")
    if top_k == 1:
      return cls.chain(depth)
    if depth < 1:
      raise ValueError(f"A draft tree needs depth >= 1; got depth={depth}.")
    paths, level = [], [()]
    for _ in range(depth):
      level = [p + (r,) for p in level for r in range(top_k)]
      paths += level
    return cls.from_choices(paths)

  @classmethod
  def from_choices(cls, choices: Sequence[Sequence[int]]) -> "StaticTree":
    parents, ranks = parents_from_choices(choices)
    return cls(tuple(parents.tolist()), tuple(ranks.tolist()))

  @property
  def num_nodes(self) -> int:
    return len(self.parents)

  @property
  def node_depth(self) -> tuple[int, ...]:
    d = []
    for p in self.parents:
      d.append(1 if p < 0 else d[p] + 1)
    return tuple(d)

  @property
  def depth(self) -> int:
    return max(self.node_depth)

  @property
  def width(self) -> int:
    return max(np.bincount(self.node_depth))

  @property
  def max_rank(self) -> int:
    return max(self.ranks)

  def check_rank_prefixes(self) -> None:
    """Raises unless every node's children hold ranks 0..m-1 (no gap): children drawn
    without replacement are then the first m draws, which Recursive SD verifies."""
    for p in sorted(set(self.parents)):
      ranks = sorted(r for q, r in zip(self.parents, self.ranks) if q == p)
      if ranks != list(range(len(ranks))):
        raise ValueError(f"acceptance='rsd' draws each node's children without replacement "
                         f"in rank order, so ranks must be 0..m-1; the children of "
                         f"{'the root' if p < 0 else f'node {p}'} have ranks {ranks}.")

  @property
  def padded_index(self) -> np.ndarray:
    """int32[N]: slot of each real node in the level layout."""
    depth, seen, out = self.node_depth, {}, []
    for d in depth:
      out.append((d - 1) * self.width + seen.get(d, 0))
      seen[d] = seen.get(d, 0) + 1
    return np.asarray(out, np.int32)

  def padded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parent slot within the previous level [depth, width] (0 for level 0 = the root),
    rank [depth, width], real [depth, width]) of the level layout."""
    shape = (self.depth, self.width)
    parent, rank, real = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, bool)
    slots = self.padded_index
    for i, (p, r) in enumerate(zip(self.parents, self.ranks)):
      d, j = divmod(int(slots[i]), self.width)
      parent[d, j] = 0 if p < 0 else slots[p] % self.width
      rank[d, j], real[d, j] = r, True
    return parent, rank, real
