"""Hierarchical drafting (`drafters.selfdraft.hierarchical`): an inner drafter's trees
verified by an intermediate model become the chain a quantized target verifies. Greedy
output equals the target's AR, and the chain is the intermediate's own greedy text."""

import jax
import numpy as np
import pytest

from specjax import registry
from specjax.drafters import EagleHead, PromptLookup
from specjax.drafters.selfdraft import hierarchical
from specjax.models import shared_params

from test_engine import PROMPTS, TARGET, gen

INT4 = TARGET.quantized(4, group=16)
MID = TARGET.truncated(1)  # float: the target's first layer + its norm and LM head


def eagle_tree(model):
  """A random EAGLE-1 head for `model`, drafting EAGLE-2's dynamic tree."""
  head = EagleHead(model.config)
  params = head.init(jax.random.key(3))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  params = treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape)
                              for x, k in zip(leaves, keys)])
  return head.drafter(params, shared_params(model.config, model.params), top_k=2, depth=3,
                      num_nodes=5)


@pytest.mark.parametrize("inner", ["eagle_tree", "prompt_lookup"])
def test_hierarchical_greedy_equals_the_quantized_targets_ar(inner):
  d = hierarchical.create(MID, eagle_tree(MID) if inner == "eagle_tree"
                          else PromptLookup(depth=3), depth=6)
  want = gen(INT4, PROMPTS, max_new_tokens=24, eos=None).token_lists()
  out = gen(INT4, PROMPTS, max_new_tokens=24, eos=None, drafter=d)
  assert out.token_lists() == want
  assert (np.asarray(out.stats.draft_calls) >= np.asarray(out.stats.target_calls)).all()


def test_the_chain_is_the_intermediates_greedy_text():
  # The intermediate verifying its own chain accepts all of it: depth + 1 tokens a step.
  d = hierarchical.create(MID, eagle_tree(MID), depth=5)
  want = gen(MID, PROMPTS, max_new_tokens=24, eos=None).token_lists()
  out = gen(MID, PROMPTS, max_new_tokens=24, eos=None, drafter=d)
  assert out.token_lists() == want
  gained = np.asarray(out.stats.gained)
  assert (gained[:, :4] == 6).all() and gained[:, 4].tolist() == [0] * 4  # 24 = 4 x 6


def test_hierarchical_checks_its_parts():
  with pytest.raises(ValueError, match="must share a tokenizer"):
    from test_engine import tiny  # pylint: disable=g-import-not-at-top
    hierarchical.create(MID, PromptLookup(depth=3)).validate(tiny(vocab=80).config)
  with pytest.raises(ValueError, match="merges = True"):
    from specjax.drafters import DraftModel  # pylint: disable=g-import-not-at-top
    hierarchical.create(MID, DraftModel.from_model(MID, depth=2))
  with pytest.raises(ValueError, match="greedy-only"):
    gen(INT4, PROMPTS[:1], max_new_tokens=4, eos=None, temperature=1.0,
        drafter=hierarchical.create(MID, PromptLookup(depth=3)))
  assert registry.DRAFTERS.meta("hierarchical")["greedy_only"]
