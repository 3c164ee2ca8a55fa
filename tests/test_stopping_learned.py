"""Learned stop policies (SpecDec++, PACER) in the engine, and the trace they train on.

On the tiny random target of test_engine: a learned policy only changes how much is
drafted, so greedy output equals AR for chains and dynamic trees; forced to stop at K it
reproduces fixed-K decoding; `generate(trace=True)` records labels that agree with what
verification accepted; predictors trained on those labels (configs/stop.py, tiny) separate
accepted from rejected drafts on held-out prompts and refuse drafters they were not
trained for.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import decode, models, stopping
from specjax.configs import stop as stop_config
from specjax.drafters import DraftModel, EagleHead, FalconHead
from specjax.drafters.base import Context
from specjax.models import shared_params
from specjax.sampling import Sampling
from specjax.stopping import learned
from specjax.training import stop as stop_training

from test_engine import OTHER, PROMPTS, TARGET, ar, gen

H = TARGET.config.hidden_size


def random_specdecpp(scale=3.0, width=H, **kw):
  """Random acceptance heads big enough that their predictions vary across nodes."""
  p = learned.specdecpp_init(jax.random.key(0), width)
  p["out"]["kernel"] = scale * jax.random.normal(jax.random.key(1), (width, 1)) / np.sqrt(width)
  p["out"]["bias"] = p["out"]["bias"] + 1.0
  return stopping.get("specdecpp", params=p, **kw)


def random_pacer(block=2, width=H, **kw):
  p = learned.pacer_init(jax.random.key(2), width, block)
  p["out"]["kernel"] = 3.0 * jax.random.normal(jax.random.key(3), p["out"]["kernel"].shape)
  return stopping.get("pacer", params=p, block=block, **kw)


def eagle_tree():
  head = EagleHead(TARGET.config)
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(4), x.shape),
                        head.init(jax.random.key(5)))
  return head.drafter(params, shared_params(TARGET.config, TARGET.params), top_k=2, depth=4,
                      num_nodes=8)


def falcon_chain():
  """Falcon blocks of 2 drafts, three forwards deep (a chain of 6)."""
  head = FalconHead(TARGET.config, block=2)
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(6), x.shape),
                        head.init(jax.random.key(7)))
  return head.drafter(params, shared_params(TARGET.config, TARGET.params), depth=6)


POLICIES = {"specdecpp": lambda w: random_specdecpp(threshold=0.5, min_len=1, width=w),
            "pacer": lambda w: random_pacer(threshold=0.5, width=w)}
DRAFTERS = {"chain": lambda: DraftModel.from_model(OTHER, depth=6),
            "eagle2_dynamic": eagle_tree, "falcon_chain": falcon_chain}


def hidden_width(drafter) -> int:
  """The width of the hidden states `drafter` puts in its trees, which a learned policy
  reads (Falcon packs features, embeddings and its carry): shapes only, nothing compiled."""
  ctx = Context(jnp.zeros((1, 32), jnp.int32), jnp.asarray([4], jnp.int32))
  feats = tuple(jnp.zeros((1, 32, H)) for _ in drafter.features)
  tree = jax.eval_shape(lambda: drafter.propose(drafter.init(ctx, 32, feats), ctx,
                                                stopping.get(None), Sampling.create(0.0),
                                                jax.random.key(0))[0])
  return tree.hidden.shape[-1]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("drafter", DRAFTERS)
def test_learned_policies_keep_greedy_output(policy, drafter):
  d = DRAFTERS[drafter]()
  stop = POLICIES[policy](hidden_width(d))
  out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d, stop=stop)
  assert out.token_lists() == ar(PROMPTS)
  if drafter == "chain":  # the policy really cut some drafts short (and not all)
    fixed = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d)
    per_call = np.asarray(out.stats.draft_calls) / np.asarray(out.stats.target_calls)
    assert per_call.min() < 7 - 1e-6 and per_call.max() > 2
    assert (np.asarray(out.stats.draft_calls) != np.asarray(fixed.stats.draft_calls)).any()


@pytest.mark.parametrize("k", [1, 3])
def test_specdecpp_forced_to_stop_at_k_is_fixed_k(k):
  """min_len=k with a threshold every prediction exceeds: exactly k drafts a step. Tokens,
  accepted lengths and target calls equal a fixed-k drafter's; the policy costs one more
  draft forward a step (the k-th token's hidden state, which its decision reads)."""
  forced = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None,
               drafter=DraftModel.from_model(OTHER, depth=6),
               stop=random_specdecpp(threshold=-1.0, min_len=k))
  fixed = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None,
              drafter=DraftModel.from_model(OTHER, depth=k))
  assert forced.token_lists() == fixed.token_lists()
  np.testing.assert_array_equal(forced.stats.gained, fixed.stats.gained)
  np.testing.assert_array_equal(forced.stats.target_calls, fixed.stats.target_calls)
  np.testing.assert_array_equal(np.asarray(forced.stats.draft_calls),
                                np.asarray(fixed.stats.draft_calls)
                                + np.asarray(fixed.stats.target_calls))
  # Verification carries the root and the narrowest compiled width that holds k drafts.
  width = min(w for w in decode.verify_widths(6) if w >= k)
  calls = np.asarray(fixed.stats.target_calls)
  np.testing.assert_array_equal(forced.stats.verified, calls * (1 + width))
  np.testing.assert_array_equal(fixed.stats.verified, calls * (1 + k))


def test_verify_widths():
  assert decode.verify_widths(1) == (0, 1)
  assert decode.verify_widths(6) == (0, 1, 2, 4, 6)
  assert decode.verify_widths(8) == (0, 1, 2, 4, 8)


def test_pacer_stops_only_where_a_block_closes():
  """A verifier that fails every block drafts exactly `block` tokens a step."""
  p = learned.pacer_init(jax.random.key(2), H, 3)
  p["out"]["bias"] = p["out"]["bias"] - 100.0  # P(block accepted) ~ 0
  out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None,
            drafter=DraftModel.from_model(OTHER, depth=6),
            stop=stopping.get("pacer", params=p, block=3))
  fixed = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None,
              drafter=DraftModel.from_model(OTHER, depth=3))
  np.testing.assert_array_equal(out.stats.gained, fixed.stats.gained)
  with pytest.raises(ValueError, match="blocks of 3 tokens; block=4"):
    stopping.get("pacer", params=p, block=4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_trace_labels_agree_with_verification(temperature):
  """Greedy: the accepted drafts of a step are exactly the leading nodes labelled 1.
  Sampling: labels are probabilities, 1 where the draft was drawn from the target itself
  (a self-drafter), and accepted nodes have labels > 0. Hidden states match the drafter's
  width and are real wherever the drafter forwarded the node."""
  d = DraftModel.from_model(OTHER if temperature == 0 else TARGET, depth=4)
  out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d, trace=True,
            temperature=temperature)
  tr = jax.tree.map(np.asarray, out.trace)
  steps = np.asarray(out.stats.gained) > 0
  np.testing.assert_array_equal(tr.valid.any(-1), steps)
  np.testing.assert_array_equal(tr.accepted.sum(-1), np.where(steps, out.stats.gained - 1, 0))
  assert tr.hidden.shape == tr.tokens.shape + (OTHER.config.hidden_size,)
  # The deepest node of a chain is never forwarded; the others are on every step.
  np.testing.assert_array_equal(tr.forwarded, tr.valid & (np.arange(4) < 3))
  assert (np.abs(tr.hidden[tr.forwarded]).sum(-1) > 0).all()
  if temperature == 0:
    lead = np.cumprod(tr.label, -1).sum(-1)
    np.testing.assert_array_equal(np.where(steps, lead, 0), tr.accepted.sum(-1))
    assert set(np.unique(tr.label)) <= {0.0, 1.0} and 0 < tr.label[tr.valid].mean() < 1
  else:
    np.testing.assert_allclose(tr.label[tr.valid], 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="pass a drafter"):
    gen(TARGET, PROMPTS, max_new_tokens=4, trace=True)


@pytest.fixture(scope="module", params=["specdecpp", "pacer"])
def trained(request, tmp_path_factory):
  """(kind, workdir) of a tiny predictor run (configs/stop.py:KIND,tiny=1, greedy labels)."""
  c = stop_config.get_config(f"{request.param},tiny=1")
  c.temperatures = (0.0,)
  workdir = str(tmp_path_factory.mktemp(request.param))
  stop_training.train(c, workdir)
  return request.param, workdir


def test_trained_predictor_separates_accepted_from_rejected(trained):
  """Held-out AUC of the trained predictor over a floor the untrained one stays under."""
  kind, workdir = trained
  with open(os.path.join(workdir, "metrics.json")) as f:
    m = json.load(f)
  assert m["auc"] > 0.6 > m["auc_untrained"], m
  assert m["eval_examples"] > 100
  # The threshold was calibrated to the cost file, and the fixed lengths simulated beside.
  cal = m["calibration"]
  assert cal["threshold"] in stop_training.THRESHOLDS
  assert set(cal["eval_fixed"]) == {str(k) for k in range(1, 7)}


def test_trained_predictor_decodes_and_refuses_other_drafters(trained, tmp_path):
  kind, workdir = trained
  target = models.load("tiny-random")
  policy = stopping.get(kind, checkpoint=os.path.join(workdir, "predictor"))
  assert policy.drafter == "DraftModel"
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert policy.threshold == json.load(f)["calibration"]["threshold"]
  assert stopping.get(kind, checkpoint=os.path.join(workdir, "predictor"),
                      threshold=0.123).threshold == 0.123
  chain = DraftModel.truncated(target, 1, depth=6)
  prompts = [[1, 2, 3], list(range(40, 60))]
  want = decode.generate(target, prompts, max_new_tokens=16, eos=None).token_lists()
  got = decode.generate(target, prompts, max_new_tokens=16, eos=None, drafter=chain,
                        stop=policy)
  assert got.token_lists() == want
  head = EagleHead(target.config)
  eagle = head.drafter(head.init(jax.random.key(0)), shared_params(target.config,
                                                                    target.params), depth=4)
  with pytest.raises(ValueError, match="trained for a DraftModel drafter; it was given a "
                     "EagleHead"):
    decode.generate(target, prompts, max_new_tokens=4, drafter=eagle, stop=policy)
  with pytest.raises(ValueError, match="reads hidden states of width 64"):
    decode.generate(TARGET, PROMPTS, max_new_tokens=4, eos=None,
                    drafter=DraftModel.from_model(OTHER, depth=4), stop=policy)
  with pytest.raises(FileNotFoundError, match="No stop predictor"):
    stopping.get(kind, checkpoint=str(tmp_path))
  bad = tmp_path / "bad"
  shutil.copytree(os.path.join(workdir, "predictor"), bad)
  (bad / learned.PARAMS).write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="is corrupt"):
    stopping.get(kind, checkpoint=str(bad))
  other = "pacer" if kind == "specdecpp" else "specdecpp"
  with pytest.raises(ValueError, match=f"not '{other}'"):
    stopping.get(other, checkpoint=os.path.join(workdir, "predictor"))


def test_labels_made_with_other_settings_are_refused(tmp_path):
  d = DraftModel.from_model(OTHER, depth=4)
  stop_training.collect(TARGET, d, [], str(tmp_path), temperature=0.0, max_new_tokens=8,
                        spec={"drafter": "other"})
  with pytest.raises(ValueError, match=r"other settings \(\['max_new_tokens'\] differ\)"):
    stop_training.collect(TARGET, d, [], str(tmp_path), temperature=0.0, max_new_tokens=16,
                          spec={"drafter": "other"})


def test_simulated_speedup_of_a_stop_depth():
  """The calibration's cost model on two hand-made chains of 4 greedy labels."""
  data = {"label": np.array([[1, 1, 0, 1], [0, 1, 1, 1]], np.float32),
          "valid": np.ones((2, 4), bool)}
  costs = {"verify_ms": {"1": 10.0, "2": 12.0, "4": 16.0, "8": 24.0}}
  # Fixed 2: 2 + 0 accepted, 2 forwards, 3 tokens verified (14 ms).
  fixed = stop_training.simulate(data, np.array([2, 2]), costs, 1.0, policy=False)
  assert fixed == pytest.approx({"tau": 2.0, "ms_per_step": 16.0, "speedup": 4 / 32 * 10})
  # A policy stopping at 3 read the third draft (4 forwards) and verifies width 4 (18 ms).
  pol = stop_training.simulate(data, np.array([3, 3]), costs, 1.0, policy=True)
  assert pol == pytest.approx({"tau": 2.0, "ms_per_step": 22.0, "speedup": 4 / 44 * 10})
  # Stopping at the cap reads nothing more.
  full = stop_training.simulate(data, np.array([4, 4]), costs, 1.0, policy=True)
  assert full["ms_per_step"] == pytest.approx(4 + 18) and full["tau"] == pytest.approx(2.0)
  # The oracle stops the first chain after its two accepted drafts (17 ms for 3 tokens)
  # and the second after one draft, the fewest a policy drafts.
  np.testing.assert_array_equal(stop_training.oracle_depths(data, costs, 1.0), [2, 1])
