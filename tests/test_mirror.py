"""Mirror SD (`drafters.selfdraft.mirror`): branches rolled out from the early exit's
guesses, outputs equal to AR, the target distribution kept when sampling, and the early-exit
head trained with optax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import decode, models, registry
from specjax.drafters.selfdraft import mirror
from specjax.models import skip

from test_engine import OTHER, PROMPTS, TARGET, gen
import test_lossless_sampling as lossless


def _mirror(draft, kappa, gamma=3, target=TARGET, exit_params=None):
  d = registry.DRAFTERS.build("mirror", target, layers=1, gamma=gamma, kappa=kappa,
                              exit_params=exit_params)
  return d.replace(params=draft.params, config=draft.config)


def test_greedy_mirror_equals_ar_and_reuses_matching_branches():
  want = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None).token_lists()
  # The target as its own draft and every token a guess (kappa = vocab): every round but
  # the first takes its chain from a branch, so only the first drafts.
  out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=_mirror(TARGET, 64))
  assert out.token_lists() == want
  np.testing.assert_array_equal(out.stats.target_calls, [6] * 4)
  np.testing.assert_array_equal(out.stats.draft_calls, [3] * 4)
  # A real draft and one guess a position: a round reuses a branch exactly when the early
  # exit's top guess at the accepted depth is the target's next token.
  for draft in (TARGET.truncated(1), OTHER):
    d = _mirror(draft, 1)
    out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d)
    assert out.token_lists() == want
    calls = np.asarray(out.stats.draft_calls)
    assert (calls % 3 == 0).all() and (calls < 3 * np.asarray(out.stats.target_calls)).any()


def test_sampled_mirror_keeps_the_target_distribution():
  """The first two tokens against the exact table; with kappa = vocab the second token of
  a row whose first step accepted nothing always comes from a branch's chain."""
  target = lossless.tiny(0, layers=2)
  noise = lambda x: x + jax.random.normal(jax.random.key(5), x.shape) * (x.std() + 1e-3)
  d = registry.DRAFTERS.build("mirror", target, layers=1, gamma=2, kappa=lossless.V)
  d = d.replace(params=jax.tree.map(noise, target.params), config=target.config)
  lossless.check_generate_matches_target(dict(temperature=1.0, top_k=2), d, min_gain=0.99,
                                         target=target, n=8_000)


def test_exit_head_trains_toward_the_target():
  """A zero adapter is the target's LM head at the exit (DEL's shadow token); training
  fits it to the target's next tokens (a random tiny target's text generalises too little
  across rows to test held-out agreement reliably; the SmolLM2 bench reports that)."""
  rng = np.random.default_rng(0)
  rows = decode.generate(TARGET, [rng.integers(0, 64, 4).tolist() for _ in range(96)],
                         max_new_tokens=28, eos=None).tokens
  train = np.asarray(rows)
  fresh = mirror.init_exit(TARGET.config, 16, jax.random.key(0))
  h = jax.random.normal(jax.random.key(1), (3, TARGET.config.hidden_size))
  np.testing.assert_allclose(mirror.exit_logits(TARGET.config, TARGET.params, fresh, h),
                             skip.exit_logits(TARGET.config, TARGET.params, h), atol=1e-6)
  before = mirror.exit_agreement(TARGET, 1, fresh, train)
  trained = mirror.train_exit(TARGET, 1, train, rank=16, steps=150, positions=256, lr=1e-2)
  after = mirror.exit_agreement(TARGET, 1, trained, train)
  assert after > before + 0.15, (before, after)
  assert mirror.exit_agreement(TARGET, 1, trained, train, kappa=4) >= after


def test_mirror_round_cost_and_knobs():
  d = registry.DRAFTERS.build("mirror", TARGET, layers=1, gamma=4, kappa=2)
  # Rollouts shorter than the target's suffix are hidden; a miss adds a drafting phase.
  assert d.predicted_ms(1.0, 30.0, 15.0, 5.0, 10.0) == 30.0
  assert d.predicted_ms(0.5, 30.0, 15.0, 5.0, 20.0) == pytest.approx(35.0 + 10.0)
  with pytest.raises(ValueError, match=r"exit_layer must be in \[1, 2\)"):
    registry.DRAFTERS.build("mirror", TARGET, layers=1, exit_layer=2).validate(TARGET.config)
  with pytest.raises(ValueError, match="gamma >= 1 and 1 <= kappa"):
    d.replace(kappa=0).validate(TARGET.config)
  with pytest.raises(ValueError, match="must share a tokenizer"):
    d.replace(config=lossless.DRAFT.config).validate(TARGET.config)
  with pytest.raises(ValueError, match="train_exit needs token rows"):
    mirror.train_exit(TARGET, 1, np.zeros((5,), np.int32))


def test_speculative_streaming_drafts_several_tokens_a_forward():
  """With S - 1 stream embeddings a forward drafts S tokens: the target as its own draft
  with every guess (kappa = vocab) drafts once, in ceil(gamma / S) forwards; with a real
  draft, greedy output still equals AR, and training the embeddings makes the stream
  positions predict the rows' tokens better than the mean embedding they start from."""
  want = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None).token_lists()
  rng = np.random.default_rng(1)
  stream = jnp.asarray(rng.normal(size=(1, TARGET.config.hidden_size)), jnp.float32)
  d = _mirror(TARGET, 64).replace(stream_params=stream)
  assert d.stream == 2 and d.draft_forwards == 2
  out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d)
  assert out.token_lists() == want
  np.testing.assert_array_equal(out.stats.draft_calls, [2] * 4)
  rows = np.asarray(decode.generate(TARGET, [rng.integers(0, 64, 4).tolist()
                                             for _ in range(32)], max_new_tokens=60,
                                    eos=None).tokens)
  draft = TARGET.truncated(1)
  kw = dict(batch=32, window=16, lr=0.1)
  start = mirror.train_stream(draft, rows, 1, steps=0, **kw)
  trained = mirror.train_stream(draft, rows, 1, steps=100, **kw)
  (ce0, acc0), (ce1, acc1) = (mirror.stream_fit(draft, e, rows, window=16, every=2)
                              for e in (start, trained))
  # Measured over four row sets: cross-entropy 4.0-4.2 -> 3.3-3.7, top-1 0.06-0.09 ->
  # 0.11-0.28 (the rows of a random tiny model are hard to predict two tokens ahead).
  assert ce1 < ce0 - 0.2 and acc1 >= acc0, (ce0, ce1, acc0, acc1)
  for draft_lm in (TARGET.truncated(1), OTHER):
    d = _mirror(draft_lm, 2).replace(stream_params=trained)
    assert gen(TARGET, PROMPTS, max_new_tokens=24, eos=None,
               drafter=d).token_lists() == want
  with pytest.raises(ValueError, match="stream embeddings must be"):
    d.replace(stream_params=jnp.zeros((1, 7))).validate(TARGET.config)
