"""Continuous batching (`specjax.serve`): requests of mixed lengths and budgets stream
through a few slots, every output equal to the request's own AR output (greedy), the
target's distribution kept when sampling, and refusals that leave the others running."""

import functools

import jax
import numpy as np
import pytest

from specjax import decode, models, serve, verify
from specjax.drafters import DraftModel, PromptLookup, TokenRecycling
from specjax.models import Model, ModelConfig, init_params  # noqa

from test_lossless_sampling import (DRAFT, PROMPTS as SAMPLED_PROMPTS, TARGET as SMALL,
                                    counts_of, exact_two_tokens, tv, tv_bound)
from specjax import sampling as sampling_lib

CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=512)
TARGET = Model(CFG, init_params(CFG, jax.random.key(0)))
MAX_LEN, BUDGETS = 384, (3, 11, 24)


def _requests(n=24, seed=0):
  """n requests, prompts of 1 to 300 tokens (with repeats, for prompt lookup), budgets
  from BUDGETS, arriving in two waves."""
  rng = np.random.default_rng(seed)
  lengths = np.concatenate([[1, 300], rng.integers(1, 301, n - 2)])
  out = []
  for i, n_tok in enumerate(lengths):
    motif = rng.integers(0, CFG.vocab_size, 5)
    prompt = np.resize(motif, n_tok) if i % 2 else rng.integers(0, CFG.vocab_size, n_tok)
    out.append(serve.Request(tuple(int(t) for t in prompt), BUDGETS[i % 3],
                             arrival=0.0 if i < n // 2 else 0.05, id=i))
  return out


REQUESTS = _requests()
DRAFTERS = {"ar": lambda: None, "prompt_lookup": lambda: PromptLookup(depth=5),
            "draft_model": lambda: DraftModel.truncated(TARGET, 1, depth=3)}


@functools.lru_cache(maxsize=None)
def engine(name: str, slots: int = 4) -> serve.Engine:
  return serve.Engine(TARGET, slots=slots, max_len=MAX_LEN, max_new_tokens=max(BUDGETS),
                      drafter=DRAFTERS[name](), eos=None)


@functools.lru_cache(maxsize=None)
def ar_outputs() -> tuple:
  """Each request's AR output from `generate`, one call per budget (a batch of equal
  budgets: greedy rows are independent, `test_engine` checks batch == alone)."""
  out = [None] * len(REQUESTS)
  for budget in BUDGETS:
    idx = [i for i, r in enumerate(REQUESTS) if r.max_new_tokens == budget]
    got = decode.generate(TARGET, [list(REQUESTS[i].tokens) for i in idx],
                          max_new_tokens=budget, eos=None, max_len=MAX_LEN).token_lists()
    for i, toks in zip(idx, got):
      out[i] = toks
  return tuple(out)


@pytest.mark.parametrize("name", DRAFTERS)
def test_stream_outputs_equal_each_requests_ar(name):
  results = serve.serve(engine(name), REQUESTS)
  assert [r.tokens for r in results] == list(ar_outputs())
  assert all(r.error is None and r.finished >= r.admitted >= r.arrival for r in results)
  assert [len(r.tokens) for r in results] == [r.max_new_tokens for r in REQUESTS]
  tau = serve.summary(results)["tau"]
  assert tau == 1.0 if name == "ar" else tau > 1.0  # the drafters' drafts were accepted


@pytest.mark.parametrize("policy", ["static", "exspec"])
def test_other_policies_keep_the_outputs(policy):
  results = serve.serve(engine("prompt_lookup"), REQUESTS, policy=policy, pool=8)
  assert [r.tokens for r in results] == list(ar_outputs())


def test_a_request_too_long_is_refused_and_the_others_continue():
  too_long = serve.Request(tuple(range(1, 60)) * 6 + (5,) * 10, 24, id="long")  # 364 + 24 + 2
  bad_budget = serve.Request((1, 2), 99, id="budget")
  stream = REQUESTS[:6] + [too_long, bad_budget] + REQUESTS[6:12]
  results = serve.serve(engine("ar"), stream)
  by_id = {r.id: r for r in results}
  assert "need 390 cache slots; each slot has 384" in by_id["long"].error
  assert by_id["long"].tokens == [] and by_id["long"].target_calls == 0
  assert "outside 1..24" in by_id["budget"].error
  assert [by_id[i].tokens for i in range(12)] == list(ar_outputs()[:12])
  with pytest.raises(ValueError, match="Request refused: .* need 390 cache slots"):
    engine("ar").admit(engine("ar").init(), 0, list(too_long.tokens), 24)


def test_engine_and_policy_errors_name_the_problem():
  with pytest.raises(ValueError, match="slots must be a positive integer"):
    serve.Engine(TARGET, slots=0, max_len=64, max_new_tokens=4)
  with pytest.raises(ValueError, match="max_len=3 holds no request"):
    serve.Engine(TARGET, slots=1, max_len=3, max_new_tokens=4)
  with pytest.raises(ValueError, match="Unknown scheduling policy 'lifo'"):
    serve.serve(engine("ar"), REQUESTS[:1], policy="lifo")


def test_shared_drafter_state_keeps_learning_across_requests():
  """Token Recycling's successor matrix is one table for all slots (not per row): a
  request admitted later reads what earlier requests taught it, and outputs stay AR's."""
  d = TokenRecycling.create(CFG.vocab_size, num_nodes=6)
  eng = serve.Engine(TARGET, slots=2, max_len=MAX_LEN, max_new_tokens=max(BUDGETS),
                     drafter=d, eos=None)
  assert eng._axes.drafter.matrix == -1 and eng._axes.cache.k[0] == 0  # pylint: disable=protected-access
  results = serve.serve(eng, REQUESTS[:8])
  assert [r.tokens for r in results] == list(ar_outputs()[:8])
  assert sum(r.target_calls for r in results) < sum(len(r.tokens) for r in results)


def test_poisson_arrivals_and_summary():
  t = serve.poisson_arrivals(2000, rate=4.0, seed=1)
  assert (np.diff(t) > 0).all() and abs(np.mean(np.diff(t)) - 0.25) < 0.02
  assert (serve.poisson_arrivals(3, 0) == 0).all()
  rs = [serve.Result(0, [1, 2, 3], 2, 0.0, 0.0, 2.0, 2), serve.Result(1, [4], 1, 1.0, 1.0,
                                                                      3.0, 1)]
  s = serve.summary(rs + [serve.Result(2, [], 9, 0.0, error="too long")])
  assert (s["requests"], s["refused"], s["tokens"], s["seconds"]) == (2, 1, 4, 3.0)
  assert s["tau"] == pytest.approx(4 / 3) and s["p50_latency_s"] == pytest.approx(2.0)


# The stream at T=1: the first two tokens of each request against the exact table
# (`test_lossless_sampling`'s check), with budgets of 2 and 3 so requests leave and enter
# slots at different steps; accepting every draft must fail the same bound.
N_SAMPLED = 8_000


def _sampled_stream(acceptance=None):
  chain = DraftModel.from_model(DRAFT, depth=3)
  eng = serve.Engine(SMALL, slots=256, max_len=24, max_new_tokens=3, drafter=chain,
                     temperature=1.0, eos=None, acceptance=acceptance, seed=3)
  reqs = [serve.Request(tuple(SAMPLED_PROMPTS[i % 2]), 2 + (i // 2) % 2)
          for i in range(N_SAMPLED)]
  toks = np.asarray([r.tokens[:2] for r in serve.serve(eng, reqs)])
  s = sampling_lib.Sampling.create(1.0)
  exact = [exact_two_tokens(p, s) for p in SAMPLED_PROMPTS]
  bound = max(tv_bound(e, N_SAMPLED // 2) for e in exact)
  return [tv(counts_of(toks[i::2]), exact[i]) for i in range(2)], bound


def test_sampled_stream_keeps_the_target_distribution():
  got, bound = _sampled_stream()
  assert max(got) < bound, (got, bound)
  biased, bound = _sampled_stream(verify.get("fuzzy", threshold=1e9))
  assert min(biased) > bound, (biased, bound)


def test_stream_cli_runs_and_resumes(tmp_path):
  """`python -m specjax.evaluation.stream` on the tiny config: a row per (method, policy),
  every output equal across them; a rerun skips the cells it has."""
  from specjax.configs import stream as stream_config  # pylint: disable=g-import-not-at-top
  from specjax.evaluation import stream  # pylint: disable=g-import-not-at-top
  c = stream_config.get_config("tiny")
  rows = stream.run(c, str(tmp_path))
  assert [(r["method"], r["policy"]) for r in rows] == [
      (m, p) for m in ("ar", "prompt_lookup") for p in ("static", "fifo")]
  assert all(r["outputs"] == rows[0]["outputs"] and r["requests"] == 12 for r in rows)
  assert rows[2]["tau"] > 1.0 and rows[0]["tau"] == 1.0
  assert "| prompt_lookup | fifo | 3 |" in (tmp_path / "summary.md").read_text()
  assert stream.run(c, str(tmp_path)) == rows  # nothing left to run
  c.arrivals_file = str(tmp_path / "arrivals.json")
  (tmp_path / "arrivals.json").write_text("[0, 1]")
  with pytest.raises(ValueError, match="must hold 12 arrival times"):
    stream.requests(models.load("tiny-random"), c)


def test_admit_checks_the_slot_and_one_request_object_may_repeat():
  with pytest.raises(ValueError, match="slot 4 is not one of this engine's slots 0..3"):
    engine("ar").admit(engine("ar").init(), 4, [1, 2], 3)
  same = REQUESTS[1]
  results = serve.serve(engine("ar"), [same] * 3)
  assert [r.tokens for r in results] == [ar_outputs()[1]] * 3
