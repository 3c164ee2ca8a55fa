"""Token Recycling (Luo et al., 2024): drafts read from the target's own past predictions.

An adjacency matrix `M[V, k]` holds, for every token, the k tokens the target last ranked
highest after it. A draft tree is read from `M` along a fixed template of rank paths:
node (r_1, ..., r_d) is `M[parent's token, r_d]`, starting from the root (the last
committed token). Zero draft forwards. After every verification the decode loop hands the
drafter the target's top-k at the root and at every tree node (`Verdict.target_top_k`), and
the row of each of those tokens is overwritten with them, accepted or not: the candidates
verification would otherwise throw away are recycled. Rows of tokens seen twice in one
tree keep one of their predictions (the reference's order is arbitrary too).

The matrix starts at zeros (a never-written row drafts token 0) and persists across calls:
`generate` returns the final state and `drafter.carry(output)` is the next call's drafter
with the matrix it learned (the paper's hot start; sweeps do it per method, temperature and
seed, in prompt order). One matrix serves the whole batch.

Lossless: drafts are deterministic picks, so greedy verification keeps exactly the
target's argmax path, and at T > 0 the speculative rule treats q as one-hot on each pick
(our extension: the paper and its code verify greedily). Where we depart from the
reference: the template can be cut to `num_nodes` nodes (the most probable paths under a
rank prior, below) because on a device where verifying 81 tokens costs 10 AR steps the
paper's tree cannot pay; the matrix is not updated from the prompt (the reference does not
either) and is updated on the step that emits EOS (the reference skips that step).
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import registry
from specjax.tree import DraftTree, StaticTree

# The paper's template: 80 rank paths over 6 levels (its "2.2.2" tree), listed by level.
_L1 = [(r,) for r in range(8)]
_L2 = ([(0, r) for r in range(8)] + [(1, r) for r in range(4)] + [(2, r) for r in range(3)]
       + [(3, 0), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0)])
_L3 = ([(0, 0, r) for r in range(8)] + [(0, 1, r) for r in range(3)]
       + [(0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 4, 0), (0, 5, 0), (0, 6, 0), (0, 7, 0),
          (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0)])
_L4 = ([(0, 0, 0, r) for r in range(5)]
       + [(0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0), (0, 1, 0, 0),
          (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0)])
_L5 = [(0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0),
       (0, 0, 1, 0, 0), (0, 1, 0, 0, 0), (1, 0, 0, 0, 0)]
_L6 = [(0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0)]
PAPER_TREE = tuple(_L1 + _L2 + _L3 + _L4 + _L5 + _L6)


def path_prior(path: Sequence[int]) -> float:
  """A rank prior for cutting the template: P(rank r is right) ~ 0.5 / (r + 1), independent
  along the path. Only the order it gives matters (which nodes a small budget keeps)."""
  return float(np.prod([0.5 / (r + 1) for r in path]))


def cut_tree(paths: Sequence[Sequence[int]], num_nodes: int) -> tuple[tuple[int, ...], ...]:
  """The `num_nodes` paths of `paths` with the highest prior, closed under parents (a
  path's prefix has a higher prior than the path, so the cut keeps every parent)."""
  paths = [tuple(p) for p in paths]
  if not 1 <= num_nodes <= len(paths):
    raise ValueError(f"num_nodes must be in [1, {len(paths)}] for this template; got "
                     f"{num_nodes}.")
  order = sorted(range(len(paths)), key=lambda i: (-path_prior(paths[i]), len(paths[i]), i))
  return tuple(paths[i] for i in sorted(order[:num_nodes]))


@flax.struct.dataclass
class RecyclingState:
  matrix: jax.Array  # int32[V, k]: the target's last top-k after each token


@flax.struct.dataclass
class TokenRecycling:
  matrix: jax.Array  # int32[V, k]: the matrix a call starts from (zeros: a cold start)
  tree: StaticTree = flax.struct.field(pytree_node=False)
  takes_stop_policy = False
  merges = True  # commit needs no tree of its own (`drafters.hybrid`)
  drafts_vary = False  # every node is drafted, always
  features = ()

  @classmethod
  def create(cls, vocab_size: int, k: int = 8,
             tree: Sequence[Sequence[int]] | None = None,
             num_nodes: int | None = None) -> "TokenRecycling":
    """A cold drafter: zero matrix [vocab_size, k], the paper's template (or the rank
    paths `tree`), cut to its `num_nodes` most probable nodes when given."""
    paths = PAPER_TREE if tree is None else tuple(tuple(p) for p in tree)
    if num_nodes is not None:
      paths = cut_tree(paths, num_nodes)
    return cls(jnp.zeros((vocab_size, k), jnp.int32), StaticTree.from_choices(paths))

  @property
  def target_top_k(self) -> int:
    return self.matrix.shape[1]

  @property
  def num_nodes(self) -> int:
    return self.tree.num_nodes

  def validate(self, target_config) -> None:
    v, k = self.matrix.shape
    if v != target_config.vocab_size:
      raise ValueError(f"TokenRecycling's matrix has {v} rows; the target's vocabulary has "
                       f"{target_config.vocab_size} tokens.")
    if self.tree.max_rank >= k:
      raise ValueError(f"The tree template uses rank {self.tree.max_rank}, but the matrix "
                       f"keeps only the top {k} successors per token.")

  def init(self, ctx, max_len, features) -> RecyclingState:
    return RecyclingState(self.matrix)

  def propose(self, state: RecyclingState, ctx, stop, sampling, key):
    b = ctx.history.shape[0]
    root_B = ctx.history[jnp.arange(b), ctx.length - 1]
    parents = np.asarray(self.tree.parents)
    ranks = np.asarray(self.tree.ranks)
    depth = np.asarray(self.tree.node_depth)
    tokens_BxN = jnp.zeros((b, self.num_nodes), jnp.int32)
    for d in range(1, self.tree.depth + 1):  # a level at a time: its parents are known
      idx = np.flatnonzero(depth == d)
      par_BxW = jnp.where(parents[idx] < 0, root_B[:, None],
                          tokens_BxN[:, np.maximum(parents[idx], 0)])
      tokens_BxN = tokens_BxN.at[:, idx].set(state.matrix[par_BxW, ranks[idx]])
    tree = DraftTree(tokens_BxN, jnp.broadcast_to(jnp.asarray(parents), (b, self.num_nodes)),
                     jnp.ones((b, self.num_nodes), bool))
    return tree, state, jnp.zeros(b, jnp.int32)

  def commit(self, state: RecyclingState, ctx, verdict, features) -> RecyclingState:
    """Every verified token's row <- the target's top-k there (the root's and each
    node's; any verified tree's: inside a hybrid tree, the other drafters' nodes too)."""
    k = self.target_top_k
    top = verdict.target_top_k[..., :k].reshape(-1, k).astype(jnp.int32)
    rows = verdict.scored_tokens.reshape(-1)
    rows = jnp.where(rows < 0, state.matrix.shape[0], rows)  # unverified slots: dropped
    return RecyclingState(state.matrix.at[rows].set(top, mode="drop"))

  def carry(self, output) -> "TokenRecycling":
    """This drafter starting from the matrix `output`'s call ended with (a hot start)."""
    return self.replace(matrix=output.drafter_state.matrix)


@registry.DRAFTERS.register("token_recycling", takes_stop_policy=False)
def _build(target, *, successors: int = 8, tree: Sequence[Sequence[int]] | None = None,
           num_nodes: int | None = None) -> TokenRecycling:
  """Token Recycling: a tree read from the target's recycled top-k (the matrix keeps
  `successors` per token; training-free)."""
  return TokenRecycling.create(target.config.vocab_size, successors, tree, num_nodes)
