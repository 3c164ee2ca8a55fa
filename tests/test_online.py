"""Online speculative decoding (`specjax.training.online`): a tiny trained EAGLE-1 head
keeps training on a stream of served requests; every request's greedy output equals its
AR output while the head changes between requests, and the updates follow the positions
the head mispredicted."""

import os

import jax
import numpy as np
import pytest

from specjax import decode, models
from specjax.training import online, trainer

from test_training import run_dir


def test_greedy_output_equals_ar_while_the_head_learns():
  target = models.load("tiny-random")
  learner = online.OnlineLearner.from_head(
      target, os.path.join(run_dir("eagle"), trainer.HEAD_DIR), lr=3e-3, update_every=3,
      bucket=64, depth=3)
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, 512, n).tolist() for n in (9, 30, 17, 5, 40, 12, 25, 8, 33)]
  before = jax.tree.map(np.asarray, learner.state.params)
  updated = []
  for p in prompts:
    ar = decode.generate(target, [p], max_new_tokens=20, eos=None, max_len=128)
    spec = decode.generate(target, [p], max_new_tokens=20, eos=None, max_len=128,
                           drafter=learner.drafter())
    assert spec.token_lists() == ar.token_lists()
    updated.append(learner.observe([p], spec.token_lists()))
  # An update every 3 requests (when the buffer holds a mispredicted position).
  assert updated == [False, False, True] * 3 and learner.updates == 3
  assert learner.mispredicted > 0 and learner.buffer == []
  after = jax.tree.map(np.asarray, learner.state.params)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(after)))


def test_bad_settings_are_refused():
  target = models.load("tiny-random")
  with pytest.raises(ValueError, match="update_every must be >= 1"):
    online.OnlineLearner.from_head(target, os.path.join(run_dir("eagle"), trainer.HEAD_DIR),
                                   update_every=0)


def test_the_stream_is_code_the_mix_never_held():
  """The measured stream: function prompts from standard-library modules the training mix
  does not draw on (so neither a training nor an evaluation prompt)."""
  from specjax.training import prompt_mix  # pylint: disable=g-import-not-at-top
  prompts = online.stream(120)
  assert len(prompts) == len(set(prompts)) == 120
  assert all("```python\ndef " in p for p in prompts)
  assert not set(prompts) & {r["prompt"] for r in prompt_mix.build()}
  with pytest.raises(ValueError, match="asked for 100000"):
    online.stream(100000)


def test_a_drafter_from_before_an_update_stays_usable():
  """An update donates the learner's state; the frozen head of a side-by-side stream
  (`run_stream`) was made before it and must still decode, equal to AR."""
  target = models.load("tiny-random")
  learner = online.OnlineLearner.from_head(
      target, os.path.join(run_dir("eagle3"), trainer.HEAD_DIR), lr=3e-3, update_every=1,
      bucket=64, depth=3)
  frozen = learner.drafter()
  rng = np.random.default_rng(5)
  for n in (9, 30):
    p = rng.integers(0, 512, n).tolist()
    ar = decode.generate(target, [p], max_new_tokens=20, eos=None, max_len=128)
    out = decode.generate(target, [p], max_new_tokens=20, eos=None, max_len=128,
                          drafter=frozen)
    assert out.token_lists() == ar.token_lists()
    assert learner.observe([p], out.token_lists())
