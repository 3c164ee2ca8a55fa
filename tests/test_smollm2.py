"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers reading
the same file: logits, and greedy generation token for token (batched and one at a time).

Greedy decoding is checked against transformers by teacher forcing: one transformers forward
over prompt + our continuation must pick our token (argmax) at every generated position,
which holds iff transformers' greedy decoding produces the same continuation. That costs one
forward per prompt instead of 64; the literal `generate()` comparison is the slow test.
"""

import numpy as np
import pytest
import torch  # the dev extra: a missing parity reference fails, it does not skip

from specjax import decode


MAX_NEW = 64
QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "hi",
    "Give me three tips for sleeping better, as a short list.",
    "Explain in two sentences why the sky is blue. Keep it simple, my daughter is five "
    "years old and asks a lot of questions.",
]


@pytest.fixture(scope="module")
def prompts(smollm2):
  """Chat-formatted token lists of ragged lengths."""
  out = [smollm2.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
  assert len({len(p) for p in out}) > 1
  return out


@pytest.fixture(scope="module")
def batched(smollm2, prompts):
  """specjax greedy continuations of all five prompts in one call, never stopping at EOS."""
  out = decode.generate(smollm2, prompts, max_new_tokens=MAX_NEW, eos=None)
  assert np.asarray(out.lengths).tolist() == [MAX_NEW] * len(prompts)
  return out.token_lists()


def _first_difference(a, b):
  return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)


def test_config(smollm2):
  c = smollm2.config
  assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
          c.vocab_size, c.tie_embeddings) == ("llama", 30, 576, 9, 3, 64, 49152, True)
  assert smollm2.tokenizer is not None and smollm2.tokenizer.eos_ids


def test_logits_match_transformers(smollm2, hf_smollm2, prompts):
  tokens = np.stack([
      np.asarray(prompts[4][:20]),
      np.random.default_rng(0).integers(0, smollm2.config.vocab_size, 20),
  ])
  with torch.no_grad():
    want = hf_smollm2(torch.as_tensor(tokens)).logits.float().numpy()
  got = np.asarray(smollm2.logits(tokens))
  diff = float(np.abs(got - want).max())
  print(f"\nSmolLM2-135M: max |logits diff| = {diff:.2e} (logits std {want.std():.2f})")
  assert diff <= 1e-3
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_greedy_batched_matches_transformers(hf_smollm2, prompts, batched):
  """All five ragged prompts in one specjax call; transformers sees each prompt alone."""
  for i, (p, new) in enumerate(zip(prompts, batched)):
    with torch.no_grad():
      logits = hf_smollm2(torch.tensor([p + new[:-1]])).logits[0, len(p) - 1:].float()
    want = logits.argmax(-1).tolist()
    j = _first_difference(new, want)
    if j is not None:
      top2 = torch.topk(logits[j], 2).values
      pytest.fail(f"prompt {i}: token {j} is {new[j]}, transformers' argmax is {want[j]} "
                  f"(its top-2 margin {float(top2[0] - top2[1]):.2e})")


@pytest.mark.slow
def test_greedy_one_at_a_time_matches_batched(smollm2, prompts, batched):
  """Each prompt alone gives the batched continuation (so transformers' too)."""
  # One cache size: the five calls share one compilation whatever their prompt lengths.
  for i, (p, want) in enumerate(zip(prompts, batched)):
    got = decode.generate(smollm2, [p], max_new_tokens=MAX_NEW, eos=None, max_len=512)
    got = got.token_lists()[0]
    assert got == want, f"prompt {i}: first difference at token {_first_difference(got, want)}"


@pytest.mark.slow
def test_greedy_matches_transformers_generate(hf_smollm2, prompts, batched):
  """Literally transformers' `generate(do_sample=False)`, each prompt alone (no padding),
  never stopping at EOS (~2 minutes on a laptop CPU)."""
  for i, (p, got) in enumerate(zip(prompts, batched)):
    ids = torch.tensor([p])
    with torch.no_grad():
      g = hf_smollm2.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=MAX_NEW, eos_token_id=None,
                              pad_token_id=hf_smollm2.generation_config.pad_token_id)
    want = g[0, len(p):].tolist()
    assert len(want) == MAX_NEW
    assert got == want, f"prompt {i}: first difference at token {_first_difference(got, want)}"
