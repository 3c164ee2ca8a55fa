"""Greedy speculative decoding on the real SmolLM2 equals greedy AR, batched and alone
(`make test-slow`: every drafter's greedy == AR runs in `make test` on tiny targets)."""

import numpy as np
import pytest

from specjax import decode
from specjax.drafters import DraftModel, PromptLookup

QUESTIONS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of France? Answer in one sentence.",
    "List three colors of the rainbow, then repeat the list.",
    "Explain what a hash map is.",
]


@pytest.fixture(scope="module")
def setup(smollm2):
  prompts = [smollm2.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
  assert len({len(p) for p in prompts}) > 1  # ragged
  gen = lambda ps, **kw: decode.generate(smollm2, ps, max_new_tokens=40, **kw)
  return prompts, gen, gen(prompts).token_lists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prompt_lookup", "self_draft_svip"])
def test_greedy_speculative_equals_ar_on_smollm2(smollm2, setup, name):
  prompts, gen, want = setup
  if name == "prompt_lookup":
    kw = dict(drafter=PromptLookup(depth=6))
  else:
    kw = dict(drafter=DraftModel.truncated(smollm2, 15, depth=4), stop="svip")
  batch = gen(prompts, **kw)
  assert batch.token_lists() == want
  alone = gen(prompts[2:3], **kw)
  assert alone.token_lists()[0] == want[2]
  assert np.all(batch.tau >= 1.0) and batch.tau.max() > 1.0  # drafts were accepted
