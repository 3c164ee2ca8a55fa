"""Draft budgets chosen from measured costs."""

import json

import jax
import pytest

from specjax import models, registry
from specjax.drafters import EagleHead, budget, io

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


def _head_folder(path, sim_accept):
  target = models.load("tiny-random")
  params = EagleHead(target.config).init(jax.random.key(0))
  extra = {"sim_accept": sim_accept} if sim_accept else {}
  io.save(str(path), "eagle", {}, params, target.config, {"depth": 2, "top_k": 1}, **extra)
  return target


def test_sweep_knob_budget_sizes_the_draft_from_a_cost_file(tmp_path):
  accept = [0.9, 0.8, 0.7, 0.3, 0.1]
  target = _head_folder(tmp_path / "head", accept)
  costs = tmp_path / "costs.json"
  costs.write_text(json.dumps({"device": "cpu", "verify_ms": CPU, "draft_ms": 8.0}))
  want, _ = budget.chain_depth(CPU, 8.0, accept)
  chain = registry.DRAFTERS.build("eagle", target, checkpoint=str(tmp_path / "head"),
                                  budget=str(costs))
  assert 1 < want < len(accept) and chain.tree.num_nodes == want and chain.dynamic is None
  tree = registry.DRAFTERS.build("eagle", target, checkpoint=str(tmp_path / "head"),
                                 budget=str(costs), top_k=3)
  assert tree.dynamic == (3, want, budget.tree_nodes(CPU, want))
  with pytest.raises(ValueError, match="sets \\['depth'\\]"):
    registry.DRAFTERS.build("eagle", target, checkpoint=str(tmp_path / "head"),
                            budget=str(costs), depth=4)
  with pytest.raises(FileNotFoundError, match="make bench"):
    registry.DRAFTERS.build("eagle", target, checkpoint=str(tmp_path / "head"),
                            budget=str(tmp_path / "none.json"))
  costs.write_text(json.dumps({"verify_ms": CPU}))
  with pytest.raises(ValueError, match="lacks \\['draft_ms'\\]"):
    registry.DRAFTERS.build("eagle", target, checkpoint=str(tmp_path / "head"),
                            budget=str(costs))


def test_budget_needs_the_heads_simulated_acceptance(tmp_path):
  target = _head_folder(tmp_path / "head", None)
  costs = tmp_path / "costs.json"
  costs.write_text(json.dumps({"verify_ms": CPU, "draft_ms": 8.0}))
  with pytest.raises(ValueError, match="no simulated acceptance"):
    registry.DRAFTERS.build("eagle", target, checkpoint=str(tmp_path / "head"),
                            budget=str(costs))


def test_knobs_draft_at_least_one_and_say_when_ar_would_win():
  sized, speedup = budget.knobs({"verify_ms": CPU, "draft_ms": 8.0}, [0.05, 0.01])
  assert sized == {"depth": 1} and speedup < 1.0  # what a 1-draft chain is predicted to give
  sized, speedup = budget.knobs({"verify_ms": ACCEL, "draft_ms": 0.2}, [0.9, 0.8, 0.7], 4)
  assert sized == {"depth": 3, "num_nodes": 63} and speedup > 2.0


def test_ppd_sizes_its_tree_at_its_own_verification_width(tmp_path):
  """PPD drafts for free but verifies (1 + N)(1 + K) tokens: the same costs give it a
  chain on this CPU's table and a tree of siblings where wide verification is free."""
  target = models.load("tiny-random")
  head = registry.HEADS.build("ppd", target.config, num_prompts=3)
  io.save(str(tmp_path / "ppd"), "ppd", {"num_prompts": 3}, head.init(jax.random.key(0)),
          target.config, {"depth": 3, "top_k": 1}, sim_accept=[0.9, 0.8, 0.7])
  width = lambda n: (1 + n) * 4
  sized, speedup = budget.knobs({"verify_ms": CPU, "draft_ms": 8.0}, [0.9, 0.8, 0.7], 3,
                                width=width, draft_ms=0.0)
  # At PPD's width no depth beats AR on this CPU (depth 1 verifies 8 tokens, 129.8 ms:
  # 1.9 x 47.8 / 129.8); at the plain width, free drafts of depth 3 would predict 1.30x.
  assert sized == {"depth": 1, "num_nodes": 1} and speedup == pytest.approx(1.9 * 47.8 / 129.8)
  assert budget.knobs({"verify_ms": CPU, "draft_ms": 0.0}, [0.9, 0.8, 0.7])[0] == {"depth": 3}
  assert budget.sibling_tree(3, 15, 3) == [(0,), (1,), (2,), (0, 0), (0, 1), (0, 2),
                                           (0, 0, 0), (0, 0, 1), (0, 0, 2)]
  for table, depth, nodes in ((CPU, 1, 1), (ACCEL, 3, 9)):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"verify_ms": table, "draft_ms": 8.0}))
    ppd = registry.DRAFTERS.build("ppd", target, checkpoint=str(tmp_path / "ppd"),
                                  budget=str(costs), top_k=3)
    assert ppd.tree.num_nodes == nodes and ppd.tree.depth == depth
  with pytest.raises(ValueError, match="sizes the tree"):
    registry.DRAFTERS.build("ppd", target, checkpoint=str(tmp_path / "ppd"),
                            budget=str(costs), depth=2)


def test_memory_budget_falls_back_to_a_smaller_tree_with_a_message():
  """SpecMemo's budget from the compiled programs' own memory analysis: a budget between
  the chain's and the tree's needs gets the chain, with a message naming the tree; one
  below every candidate is an error before anything runs."""
  from specjax import decode  # pylint: disable=g-import-not-at-top
  from specjax.drafters import DraftModel  # pylint: disable=g-import-not-at-top
  from test_engine import PROMPTS, TARGET  # pylint: disable=g-import-not-at-top
  tree = DraftModel.truncated(TARGET, 1, top_k=3, depth=4)  # 120 nodes
  chain = DraftModel.truncated(TARGET, 1, depth=2)
  kw = dict(max_new_tokens=8, eos=None, max_len=288)
  big, small = (decode.program_bytes(TARGET, PROMPTS, drafter=d, **kw) for d in (tree, chain))
  assert big > small
  said = []
  label, got, n = budget.fit_memory(TARGET, PROMPTS, [("tree", tree), ("chain", chain)],
                                    (big + small) // 2, log=said.append, **kw)
  assert (label, got, n) == ("chain", chain, small)
  assert len(said) == 1 and said[0].startswith("memory budget: tree needs")
  out = decode.generate(TARGET, PROMPTS, drafter=got, **kw)  # and it runs
  assert out.token_lists() == decode.generate(TARGET, PROMPTS, **kw).token_lists()
  with pytest.raises(ValueError, match="No candidate fits .* the smallest, chain, needs"):
    budget.fit_memory(TARGET, PROMPTS, [("tree", tree), ("chain", chain)], small - 1,
                      log=said.append, **kw)
