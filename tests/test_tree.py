"""DraftTree structure, Medusa-style choice lists and the KV-cache commit of a tree path."""

import jax.numpy as jnp
import numpy as np
import pytest

from specjax.models import KVCache
from specjax.tree import DraftTree, parents_from_choices

CHOICES = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]


def test_choices_give_parents_first_order():
  parents, ranks = parents_from_choices(CHOICES[::-1])  # input order does not matter
  np.testing.assert_array_equal(parents, [-1, -1, 0, 0, 1, 2])
  np.testing.assert_array_equal(ranks, [0, 1, 0, 1, 0, 0])
  with pytest.raises(ValueError, match="no parent"):
    parents_from_choices([(0,), (1, 0)])


def test_ancestor_mask_depth_and_verify_inputs():
  parents, _ = parents_from_choices(CHOICES)
  tree = DraftTree(jnp.arange(10, 16)[None], jnp.asarray(parents)[None],
                   jnp.ones((1, 6), bool))
  anc = np.asarray(tree.ancestor_mask()[0])
  want = np.eye(6, dtype=bool)
  for i, p in enumerate(parents):  # walk up to the root
    while p >= 0:
      want[i, p] = True
      p = parents[p]
  np.testing.assert_array_equal(anc, want)
  np.testing.assert_array_equal(tree.depth()[0], [1, 1, 2, 2, 2, 3])
  tokens, positions, mask = tree.verify_inputs(jnp.asarray([7]), jnp.asarray([20]))
  np.testing.assert_array_equal(tokens[0], [7, 10, 11, 12, 13, 14, 15])
  np.testing.assert_array_equal(positions[0], [20, 21, 21, 22, 22, 22, 23])
  assert mask[0, :, 0].all() and not mask[0, 0, 1:].any()  # all see the root; root sees itself
  np.testing.assert_array_equal(mask[0, 1:, 1:], want)


def test_chain_is_a_tree_of_width_one():
  chain = DraftTree.chain(jnp.asarray([[4, 5, 6]]), jnp.ones((1, 3), bool))
  np.testing.assert_array_equal(chain.depth()[0], [1, 2, 3])
  np.testing.assert_array_equal(chain.ancestor_mask()[0], np.tril(np.ones((3, 3), bool)))


def test_cache_commit_gathers_the_accepted_path():
  cache = KVCache.create(num_layers=1, batch=2, max_len=12, num_kv_heads=1, head_dim=1)
  cache = cache.advance(jnp.asarray([2, 4]))
  # Pretend a forward wrote root + 4 tree nodes: slot value = slot index.
  slots = jnp.arange(12, dtype=jnp.float32)[None, None, :, None].repeat(2, 0)  # [B,K,S,D]
  cache = cache.replace(k=(slots,), v=(slots,))
  keep = jnp.asarray([[0, 2, 4, 0, 0], [0, 1, 0, 0, 0]])  # root, then path nodes + 1
  out = cache.commit(keep, jnp.asarray([3, 2]))
  np.testing.assert_array_equal(out.lengths, [5, 6])
  np.testing.assert_array_equal(out.k[0][0, 0, :5, 0], [0, 1, 2, 4, 6])
  np.testing.assert_array_equal(out.k[0][1, 0, :6, 0], [0, 1, 2, 3, 4, 5])
  # The committed slots, plus the written-but-uncommitted ones a query is told it sees.
  np.testing.assert_array_equal(out.prefix_mask(1)[0, 0, :8], [1, 1, 1, 1, 1, 0, 0, 0])
  pending = jnp.asarray([[[False, True], [True, False]]] * 2)  # [B, T=2, N=2]
  mask = out.prefix_mask(2, pending)
  np.testing.assert_array_equal(mask[0, 0, :8], [1, 1, 1, 1, 1, 0, 1, 0])
  np.testing.assert_array_equal(mask[1, 1, :8], [1, 1, 1, 1, 1, 1, 1, 0])
