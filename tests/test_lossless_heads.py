"""Speculative sampling with the trainable heads preserves the target distribution: EAGLE
and EAGLE-3 with a reduced vocabulary (sampled chain, EAGLE-2 dynamic tree), Hydra (sampled
chain), Hydra++ (sampled tree), Falcon (sampled tree over two forwards), Medusa (top-k
tree), DFlash (a tree sampled from its block's per-slot distributions) and DSpark (a chain
each slot conditioned on the token drafted before it, cut by its confidences), with random
head weights (PPD's prompt tokens after every verified token), under the same exact-table test and biased control as
the draft model's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import registry
from specjax.drafters import Eagle3Head, EagleHead, FalconHead, HydraHead, MedusaHead
from specjax.models import FINAL, shared_params

from test_lossless_sampling import SAMPLINGS, TARGET, check_generate_matches_target

pytestmark = pytest.mark.usefixtures("optimized_decode")  # run-bound, not compile-bound

DRAFTERS = {
    "eagle_chain": lambda: EagleHead(TARGET.config).drafter(
        *head_params(EagleHead(TARGET.config)), depth=3),
    "eagle2_dynamic": lambda: EagleHead(TARGET.config).drafter(
        *head_params(EagleHead(TARGET.config)), top_k=2, depth=3, num_nodes=5),
    # A reduced draft vocabulary: target tokens outside it are never drafted, and the
    # residual distribution must still give them their probability.
    "eagle3_chain_reduced_vocab": lambda: eagle3_head().drafter(*eagle3_params(), depth=3),
    "eagle3_dynamic_reduced_vocab": lambda: eagle3_head().drafter(
        *eagle3_params(), top_k=2, depth=3, num_nodes=5),
    "hydra_chain": lambda: HydraHead(TARGET.config, num_heads=3).drafter(
        *head_params(HydraHead(TARGET.config, num_heads=3)), depth=3),
    "hydrapp_tree": lambda: HYDRAPP.drafter(*hydrapp_params(), tree=[(0,), (1,), (0, 0)]),
    # Falcon (2 drafts a forward): two candidates for the first, a second forward on the
    # backbone for the third.
    "falcon_tree": lambda: FalconHead(TARGET.config, block=2).drafter(
        *head_params(FalconHead(TARGET.config, block=2)), tree=[(0,), (1,), (0, 0), (0, 0, 0)]),
    "medusa_tree": lambda: MedusaHead(TARGET.config, num_heads=2).drafter(
        *head_params(MedusaHead(TARGET.config, num_heads=2)), tree=[(0,), (1,), (0, 0)]),
    # Siblings i.i.d. from one slot's distribution, whatever their parent.
    "dflash_tree": lambda: DFLASH.drafter(*head_params(DFLASH), tree=[(0,), (1,), (0, 0)]),
    "dspark_cut_chain": lambda: DSPARK.drafter(*head_params(DSPARK), depth=2, threshold=0.3),
    # Prompt tokens riding on the verification forward; levels sampled from their guesses.
    "ppd_tree": lambda: PPD.drafter(*head_params(PPD), tree=[(0,), (1,), (0, 0)],
                                    target_params=TARGET.params),
}


# Over the 1-layer target's embedding output and final state.
DFLASH = registry.HEADS.build("dflash", TARGET.config, num_layers=1, taps=(0, FINAL),
                              block_size=3)
DSPARK = registry.HEADS.build("dspark", TARGET.config, num_layers=1, taps=(0, FINAL),
                              block_size=3, markov_rank=4)
PPD = registry.HEADS.build("ppd", TARGET.config, num_prompts=2)


HYDRAPP = HydraHead(TARGET.config, num_heads=2, mlp_layers=2, prefix_layer=True, teacher=True)


def hydrapp_params():
  """Random params whose prefix layer stays near the identity (its output projections
  shrunk): drafts agree with the target often enough for the test to mean something."""
  params, shared = head_params(HYDRAPP)
  block = params["prefix"]["block"]
  block["self_attn"]["o_proj"]["kernel"] *= 0.05
  block["mlp"]["down_proj"]["kernel"] *= 0.05
  return params, shared


def eagle3_head():
  """EAGLE-3 over the 1-layer target's layer-0 input and final state, drafting from all
  but two of its tokens (the two least frequent in some data)."""
  v = TARGET.config.vocab_size
  head = Eagle3Head(TARGET.config, (0, FINAL), draft_vocab=v - 2)
  tokens = np.tile(np.arange(v), 3)[None, :3 * v - 2]  # tokens v-2 and v-1 appear twice
  head, _ = head.fit(head.init(jax.random.key(3)), tokens, np.ones_like(tokens, np.float32),
                     shared_params(TARGET.config, TARGET.params))
  assert np.asarray(head.draft_ids).tolist() == list(range(v - 2))
  return head


def eagle3_params():
  """Random params, except that fc passes the final state through and the LM head is the
  target's (rows of the draft vocabulary): drafts agree with the target often enough
  for the test to mean something."""
  head = eagle3_head()
  params, shared = head_params(head)
  hs = TARGET.config.hidden_size
  params["fc"]["kernel"] = jnp.concatenate([jnp.zeros((hs, hs)), jnp.eye(hs)])
  params["lm_head"]["kernel"] = head.fit(params, np.zeros((1, 1), np.int32), np.ones((1, 1)),
                                         shared)[1]["lm_head"]["kernel"]
  return params, shared


def head_params(h):
  """Random (not zero) head params, and the target weights the head shares."""
  params = h.init(jax.random.key(3))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(4), len(leaves))
  params = treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape)
                              for x, k in zip(leaves, keys)])
  return params, shared_params(TARGET.config, TARGET.params)


# Every drafter at temperature 1; the warped sampling (t0.8, top-k 5, top-p 0.9) for one
# drafter of each head family (each case draws 40k sequences twice: ~40 s).
CASES = [(0, d) for d in DRAFTERS] + [(1, d) for d in (
    "eagle_chain", "eagle3_dynamic_reduced_vocab", "hydrapp_tree", "medusa_tree")]


@pytest.mark.parametrize("s,drafter", CASES,
                         ids=[f"{['t1', 't0.8_k5_p0.9'][s]}-{d}" for s, d in CASES])
def test_head_speculative_sampling_matches_target(s, drafter):
  check_generate_matches_target(SAMPLINGS[s], DRAFTERS[drafter]())
