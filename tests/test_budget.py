"""Draft budgets chosen from measured costs."""

import pytest

from specjax.drafters import budget

CPU = {1: 47.8, 2: 88.7, 4: 124.9, 8: 129.8, 16: 183.9, 32: 277.5, 64: 517.7}  # make bench
ACCEL = {1: 10.0, 2: 10.1, 4: 10.2, 8: 10.4, 16: 10.6, 32: 10.9, 64: 11.2}  # nodes ~free


def test_chain_depth_follows_costs():
  accept = [0.7, 0.5, 0.35, 0.25, 0.15]
  d_cpu, s_cpu = budget.chain_depth(CPU, draft_ms=8.0, accept=accept)
  d_acc, s_acc = budget.chain_depth(ACCEL, draft_ms=0.2, accept=accept)
  assert d_acc == 5 and s_acc > 2.0  # cheap verification: draft as deep as the head goes
  assert d_cpu < d_acc and s_cpu < s_acc
  # No depth pays when drafts are rarely accepted: depth 0 (plain AR), speedup 1.
  assert budget.chain_depth(CPU, 8.0, [0.05, 0.01]) == (0, 1.0)


def test_tree_nodes_spend_the_nearly_free_budget():
  assert budget.tree_nodes(CPU, depth=3) == 8  # T = 4 .. 9 cost about the same here
  assert budget.tree_nodes(ACCEL, depth=4) == 63
  with pytest.raises(ValueError, match="stops at T=64"):
    budget.chain_depth(CPU, 1.0, [0.9] * 70)
