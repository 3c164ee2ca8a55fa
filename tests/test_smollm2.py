"""The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers reading
the same file: logits, and greedy generation token for token (batched and one at a time)."""

import numpy as np
import pytest

from specjax import decode

torch = pytest.importorskip("torch")

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
def hf_greedy(hf_smollm2, prompts):
  """transformers' greedy continuations, each prompt alone (no padding), never stopping at
  EOS (so every continuation has MAX_NEW tokens, as with `eos=None` in specjax)."""
  out = []
  for p in prompts:
    ids = torch.tensor([p])
    with torch.no_grad():
      g = hf_smollm2.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=MAX_NEW, eos_token_id=None,
                              pad_token_id=hf_smollm2.generation_config.pad_token_id)
    new = g[0, len(p):].tolist()
    assert len(new) == MAX_NEW
    out.append(new)
  return out


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


def test_greedy_batched_matches_transformers(smollm2, prompts, hf_greedy):
  """All five ragged prompts in one call."""
  out = decode.generate(smollm2, prompts, max_new_tokens=MAX_NEW, eos=None)
  got = out.token_lists()
  for i, (g, w) in enumerate(zip(got, hf_greedy)):
    assert g == w, f"prompt {i}: first difference at token " \
                   f"{next(j for j, (a, b) in enumerate(zip(g + [-1], w)) if a != b)}"


def test_greedy_one_at_a_time_matches_transformers(smollm2, prompts, hf_greedy):
  # pad_to: every prompt gets the same width, so the five calls share one compilation.
  width = -(-max(len(p) for p in prompts) // 16) * 16
  for i, (p, w) in enumerate(zip(prompts, hf_greedy)):
    got = decode.generate(smollm2, [p], max_new_tokens=MAX_NEW, eos=None, pad_to=width)
    assert got.token_lists()[0] == w, f"prompt {i}"
