"""Speculative sampling with the trainable heads preserves the target distribution: EAGLE
(sampled chain, EAGLE-2 dynamic tree) and Medusa (top-k tree), with random head weights,
under the same exact-table test and biased control as the draft model's."""

import jax
import pytest

from specjax.drafters import EagleHead, MedusaHead
from specjax.models import shared_params

from test_lossless_sampling import SAMPLINGS, TARGET, check_generate_matches_target

DRAFTERS = {
    "eagle_chain": lambda: EagleHead(TARGET.config).drafter(
        *head_params(EagleHead(TARGET.config)), depth=3),
    "eagle2_dynamic": lambda: EagleHead(TARGET.config).drafter(
        *head_params(EagleHead(TARGET.config)), top_k=2, depth=3, num_nodes=5),
    "medusa_tree": lambda: MedusaHead(TARGET.config, num_heads=2).drafter(
        *head_params(MedusaHead(TARGET.config, num_heads=2)), tree=[(0,), (1,), (0, 0)]),
}


def head_params(h):
  """Random (not zero) head params, and the target weights the head shares."""
  params = h.init(jax.random.key(3))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  params = treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape)
                              for x, k in zip(leaves, keys)])
  return params, shared_params(TARGET.config, TARGET.params)


@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("s", SAMPLINGS, ids=["t1", "t0.8_k5_p0.9"])
def test_head_speculative_sampling_matches_target(s, drafter):
  check_generate_matches_target(s, DRAFTERS[drafter]())
