"""SmartSpec's goodput policy (`drafters.goodput`): the length it picks from hand-computed
costs and acceptance, and greedy decoding through it equal to AR."""

import jax.numpy as jnp
import numpy as np
import pytest

from specjax import registry, serve
from specjax.drafters import DraftModel, goodput

from test_engine import PROMPTS, TARGET, gen


def costs(verify_ms, draft_ms=0.0, **batches):
  c = {"verify_ms": verify_ms, "draft_ms": draft_ms}
  if batches:
    c["batches"] = {b[1:]: {"verify_ms": v, "draft_ms": d} for b, (v, d) in batches.items()}
  return c


FREE = costs({1: 10.0, 2: 10.0, 3: 10.0, 4: 10.0, 8: 10.0})


def test_free_verification_drafts_the_most_and_costly_drafts_nothing():
  a = jnp.asarray([0.5, 0.5])
  live = jnp.asarray([True, True])
  # E(k) = 1, 1.5, 1.75, 1.875 per row; every k costs 10 ms: the longest wins.
  np.testing.assert_allclose(goodput.expected_tokens(a, 3)[0], [1, 1.5, 1.75, 1.875])
  assert int(goodput.best_length(a, live, jnp.asarray(goodput.step_costs(FREE, 2, 3)))) == 3
  # Verifying 1 + k tokens costs 10, 15.5, 18 ms (k = 0, 1, 2): goodput 0.2, 0.194, 0.194
  # tokens/ms for the two rows: AR wins.
  dear = costs({1: 10.0, 2: 15.5, 3: 18.0})
  assert goodput.step_costs(dear, 2, 2) == (10.0, 15.5, 18.0)
  assert int(goodput.best_length(a, live, jnp.asarray(goodput.step_costs(dear, 2, 2)))) == 0
  # ...unless acceptance is high: a = 0.9 gives 1.9 / 15.5 = 0.123 > 1 / 10 at k = 1 and
  # 2.71 / 18 = 0.151 at k = 2.
  hi = jnp.asarray([0.9, 0.9])
  assert int(goodput.best_length(hi, live, jnp.asarray(goodput.step_costs(dear, 2, 2)))) == 2
  # Draft forwards count, at least one a step (the drafter reads each step's tokens):
  # 4 ms each makes k = 0, 1, 2 cost 14, 19.5, 26 ms, and at a = 0.5 k = 1 wins
  # (1.5 / 19.5 = 0.077 against 1 / 14 = 0.071 and 1.75 / 26 = 0.067).
  with_draft = goodput.step_costs(costs({1: 10.0, 2: 15.5, 3: 18.0}, 4.0), 1, 2)
  assert with_draft == (14.0, 19.5, 26.0)
  assert int(goodput.best_length(a, live, jnp.asarray(with_draft))) == 1
  # Only live rows count: a finished row with a high estimate does not buy drafts.
  mixed = jnp.asarray([0.9, 0.1])
  assert int(goodput.best_length(mixed, jnp.asarray([False, True]),
                                 jnp.asarray(goodput.step_costs(dear, 2, 2)))) == 0


def test_a_bigger_batch_turns_speculation_off():
  """Per-batch tables: verification is nearly free at batch 1 and costs like AR steps at
  batch 32; in between the costs are interpolated (batch 16.5: halfway)."""
  c = costs({1: 10.0, 2: 10.0, 3: 10.0},
            b1=({1: 10.0, 2: 10.5, 3: 11.0}, 0.0), b32=({1: 40.0, 2: 80.0, 3: 120.0}, 0.0))
  k = lambda b: int(goodput.best_length(  # the length at acceptance 0.6, batch b
      jnp.full((b,), 0.6), jnp.ones((b,), bool), jnp.asarray(goodput.step_costs(c, b, 2))))
  assert goodput.step_costs(c, 1, 2) == (10.0, 10.5, 11.0)
  assert goodput.step_costs(c, 32, 2)[2] == 120.0
  np.testing.assert_allclose(goodput.step_costs(c, 16.5, 2), (25.0, 45.25, 65.5))
  assert (k(1), k(32)) == (2, 0)


def _generate(cost_table, **kw):
  d = goodput.create(DraftModel.truncated(TARGET, 1, depth=3), cost_table, prior=0.8)
  return gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d, **kw)


def test_greedy_through_goodput_equals_ar_and_follows_the_costs():
  want = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None).token_lists()
  free = _generate(FREE)
  assert free.token_lists() == want
  assert (np.asarray(free.stats.draft_calls) > 0).all() and (free.tau > 1).all()
  dear = _generate(costs({1: 10.0, 2: 40.0, 3: 60.0, 4: 80.0}))  # AR at any acceptance
  assert dear.token_lists() == want
  assert (dear.tau == 1).all()  # AR steps (the draft model still reads each root)
  assert (np.asarray(dear.stats.verified) == np.asarray(dear.stats.target_calls)).all()


def test_goodput_in_a_stream_and_bad_input(tmp_path):
  d = goodput.create(DraftModel.truncated(TARGET, 1, depth=3), FREE)
  eng = serve.Engine(TARGET, slots=2, max_len=128, max_new_tokens=12, drafter=d, eos=None)
  reqs = [serve.Request(tuple(p), 12) for p in PROMPTS]
  assert [r.tokens for r in serve.serve(eng, reqs)] == gen(
      TARGET, PROMPTS, max_new_tokens=12, eos=None).token_lists()
  with pytest.raises(ValueError, match="goodput wraps a drafter"):
    registry.DRAFTERS.check("goodput", None, inner="eagle", costs=None)
  with pytest.raises(FileNotFoundError, match="No cost file"):
    registry.DRAFTERS.check("goodput", None, inner={"drafter": "prompt_lookup"},
                            costs=str(tmp_path / "none.json"))
  with pytest.raises(ValueError, match="verify-cost table stops at T=2"):
    goodput.create(DraftModel.truncated(TARGET, 1, depth=3),
                   costs({1: 1.0, 2: 1.0})).validate(TARGET.config)
  with pytest.raises(ValueError, match="prior must be in"):
    goodput.create(DraftModel.truncated(TARGET, 1, depth=3), FREE, prior=2.0).validate(
        TARGET.config)


def test_acceptance_estimate_is_the_geometric_rate_and_resets_per_slot():
  """A / (A + R) from moving averages of accepted drafts and rejections: all 4 of 4
  accepted moves the estimate from 0.5 up to 0.9, 1 of 4 (one acceptance, one rejection)
  keeps it at 0.5 where accepted / drafted would say 0.25; a slot's estimate restarts at the prior
  when a new request takes it."""
  from specjax.verify import Verdict  # pylint: disable=g-import-not-at-top
  d = goodput.create(DraftModel.truncated(TARGET, 1, depth=4), FREE, prior=0.5, decay=0.5)
  st = goodput.GoodputState((), jnp.full((2,), 0.5), jnp.full((2,), 0.5),
                            jnp.asarray([4, 4], jnp.int32))
  d = d.replace(inner=_Inert())
  v = Verdict(accepted_drafts=jnp.asarray([4, 1]), path=None, next_token=None)
  st = d.commit(st, None, v, ())
  np.testing.assert_allclose(st.accept_B, [2.25 / 2.5, 0.75 / 1.5])  # 0.9 and 0.5
  # A row that drafts nothing drifts back toward the prior (relax 0.05 a step), so a row
  # whose estimate stopped its drafting probes again: from A, R = 0, 1 the estimate after
  # n idle steps is 0.5 (1 - 0.95^n), and with free verification any a > 0 drafts again.
  idle = goodput.GoodputState((), jnp.asarray([0.0]), jnp.asarray([1.0]),
                              jnp.asarray([0], jnp.int32))
  for _ in range(10):
    idle = d.commit(idle, None, Verdict(None, jnp.zeros((1,), jnp.int32), None), ())
  np.testing.assert_allclose(idle.accept_B, [0.5 * (1 - 0.95 ** 10)], rtol=1e-5)
  assert d.replace(relax=0.0).commit(st.replace(drafted_B=jnp.zeros((2,), jnp.int32)), None,
                                     v, ()).accept_B.tolist() == st.accept_B.tolist()
  eng = serve.Engine(TARGET, slots=2, max_len=128, max_new_tokens=12, drafter=goodput.create(
      DraftModel.truncated(TARGET, 1, depth=3), FREE, prior=0.3), eos=None)
  state = eng.init().replace(drafter=eng.init().drafter.replace(
      accepted_B=jnp.full((2,), 9.0)))
  state = eng.admit(state, 1, PROMPTS[0], 12)
  np.testing.assert_allclose(state.drafter.accept_B, [9 / 9.7, 0.3], rtol=1e-6)


class _Inert:
  """An inner drafter whose commit does nothing (the estimate alone is under test)."""

  def commit(self, state, ctx, verdict, features):
    return state
