"""EasySpec (`drafters.selfdraft.easyspec`): the layer-parallel draft forward, the exact
recalibration of the draft's cache, outputs equal to AR on one device and on a mesh of 8,
and the target distribution kept when sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import registry
from specjax.drafters.base import Context
from specjax.drafters.selfdraft.easyspec import EasySpec
from specjax.models import KVCache, causal, forward, prefill
from specjax.models.skip import forward_layer_parallel
from specjax.sampling import Sampling

from test_engine import PROMPTS, TARGET, gen, tiny
import test_lossless_sampling as lossless

DEEP = tiny(layers=4, seed=3)  # a 4-layer draft sharing TARGET's vocabulary


def _cache(model, tokens):
  c = KVCache.for_config(model.config, 1, 32, jnp.float32)
  return prefill(model.config, model.params, c, jnp.asarray([tokens + [0] * (32 - len(tokens))]),
                 jnp.asarray([len(tokens)]))[0]


def test_layer_parallel_forward_is_exact_in_groups_of_one_and_approximate_beyond():
  cache = _cache(DEEP, [3, 1, 4, 1, 5])
  args = (DEEP.config, DEEP.params, jnp.asarray([[9, 2]]), jnp.asarray([[5, 6]]), causal(2), cache)
  exact = forward(*args)
  one = forward_layer_parallel(*args, group=1)
  np.testing.assert_allclose(one.logits, exact.logits, atol=1e-5)
  np.testing.assert_allclose(one.cache.k[3], exact.cache.k[3], atol=1e-5)
  two = forward_layer_parallel(*args, group=2)  # groups (0), (1, 2), (3)
  assert np.abs(np.asarray(two.logits - exact.logits)).max() > 1e-2  # an approximation
  np.testing.assert_allclose(two.cache.k[1], exact.cache.k[1], atol=1e-5)  # the group's input
  assert np.abs(np.asarray(two.cache.k[2] - exact.cache.k[2])).max() > 1e-3  # not layer 2's


def test_the_calibration_forward_rewrites_drafted_entries_exactly():
  """After a step whose drafts were all accepted, the next propose's first forward leaves
  the draft's cache equal to an exact prefill of everything committed."""
  d = EasySpec(DEEP.params, DEEP.config, depth=3, group=4)
  hist = [7, 3, 9, 2, 5]
  L = 32
  ctx = lambda toks: Context(jnp.asarray([toks + [0] * (L - len(toks))]), jnp.asarray([len(toks)]))
  state = d.init(ctx(hist), L - 2 * 3 - 2, ())
  tree, state, _ = d.propose(state, ctx(hist), None, Sampling.create(0.0), jax.random.key(0))
  drafts = np.asarray(tree.tokens[0]).tolist()
  new = hist + drafts + [11]  # all accepted, then a bonus token (the new root)
  state = d.commit(state, ctx(hist), None, ())
  _, state, _ = d.propose(state, ctx(new), None, Sampling.create(0.0), jax.random.key(1))
  assert int(state.lengths[0]) == len(new)
  exact = _cache(DEEP, new[:-1] + [new[-1]])  # every committed token, the root included
  n = len(new)
  for i in range(DEEP.config.num_layers):
    np.testing.assert_allclose(state.k[i][:, :, :n], exact.k[i][:, :, :n], atol=1e-5)


@pytest.mark.parametrize("group", [1, 2])
def test_greedy_easyspec_equals_ar(group):
  want = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None).token_lists()
  d = EasySpec(DEEP.params, DEEP.config, depth=3, group=group)
  out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d)
  assert out.token_lists() == want
  # The target as its own draft: every draft accepted when the layers run in order.
  if group == 1:
    own = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None,
              drafter=EasySpec(TARGET.params, TARGET.config, depth=3, group=1))
    assert own.token_lists() == want and (own.tau > 3.4).all()


def test_sampled_easyspec_keeps_the_target_distribution():
  deep = lossless.tiny(2, layers=3)  # a 3-layer draft on the vocabulary of 8
  lossless.check_generate_matches_target(
      lossless.SAMPLINGS[0], EasySpec(deep.params, deep.config, depth=2, group=3),
      min_gain=1.05, n=8_000)


def test_easyspec_knobs_are_checked():
  with pytest.raises(ValueError, match="layers=N .* or checkpoint=PATH"):
    registry.DRAFTERS.build("easyspec", TARGET)
  with pytest.raises(ValueError, match="group must be an integer >= 1"):
    EasySpec(DEEP.params, DEEP.config, group=0).validate(TARGET.config)
  d = EasySpec(DEEP.params, DEEP.config, group=2)
  from specjax.models.skip import layer_groups  # pylint: disable=g-import-not-at-top
  assert layer_groups(4, 2) == ((0,), (1, 2), (3,)) and layer_groups(7, 4) == (
      (0,), (1, 2, 3, 4), (5,), (6,))
  assert d.predicted_draft_ms(2.0, 1.0) == 1.0 + 2.0 * (1 + 1.5 + 1)  # (0), (1, 2), (3)
