"""The draft-and-verify engine on tiny random models: greedy losslessness, ragged batches,
per-sequence stopping, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import decode, sampling, stopping
from specjax.drafters import DraftModel, PromptLookup
from specjax.models import Model, ModelConfig, init_params


def tiny(vocab=64, layers=2, seed=0, arch="llama"):
  """A random model; untied (Llama) so that greedy text does not just repeat itself."""
  cfg = ModelConfig(arch=arch, vocab_size=vocab, hidden_size=32, intermediate_size=64,
                    num_layers=layers, num_heads=4, num_kv_heads=2 if arch == "llama" else 4,
                    head_dim=8, tie_embeddings=arch == "gpt2", max_position_embeddings=256)
  return Model(cfg, init_params(cfg, jax.random.key(seed)))


TARGET = tiny()
OTHER = tiny(layers=1, seed=7)
# Prompts with repeats so prompt lookup finds matches; ragged lengths.
PROMPTS = [[5, 9, 3, 5, 9, 3, 5, 9], [1, 2], [7, 7, 7, 8, 7, 7, 7, 8, 7, 7, 7], [11, 12, 13]]

DRAFTERS = {
    "prompt_lookup": lambda: PromptLookup(depth=5),
    "self": lambda: DraftModel.from_model(TARGET, depth=4),
    "truncated": lambda: DraftModel.truncated(TARGET, 1, depth=3),
    "other": lambda: DraftModel.from_model(OTHER, depth=3),
    # Top-k branching of the layer-truncated self-drafter: a training-free tree.
    "tree": lambda: DraftModel.truncated(TARGET, 1, tree=TREE),
}
TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0)]
CASES = [("prompt_lookup", None), ("self", "fixed"), ("truncated", "confidence"),
         ("truncated", "svip"), ("other", "fixed"), ("tree", None), ("tree", "svip")]


def gen(model, prompts, **kw):
  """generate() with one cache size, so tests share compiled loops."""
  return decode.generate(model, prompts, **{"max_len": 256, **kw})


def ar(prompts, n=24, eos=None, model=TARGET):
  return gen(model, prompts, max_new_tokens=n, eos=eos).token_lists()


@pytest.mark.parametrize("drafter,stop", CASES)
def test_greedy_speculative_equals_ar(drafter, stop):
  d = DRAFTERS[drafter]()
  want = ar(PROMPTS)
  batch = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d, stop=stop)
  assert batch.token_lists() == want
  assert (np.asarray(batch.lengths) == 24).all()
  # Each sequence alone gets exactly what it gets in the batch.
  for i, p in enumerate(PROMPTS):
    alone = gen(TARGET, [p], max_new_tokens=24, eos=None, drafter=d, stop=stop)
    assert alone.token_lists()[0] == want[i]
  # tau * target calls == new tokens, per sequence.
  np.testing.assert_allclose(batch.tau * np.asarray(batch.stats.target_calls),
                             np.asarray(batch.lengths))
  if drafter == "self" and stop == "fixed":  # the target drafting itself accepts everything
    assert (batch.tau > 4.0).all()
  if drafter == "tree" and stop is None:  # some steps accept a branch other than the first
    assert (np.asarray(batch.stats.gained) > 1).any()


def test_tree_of_the_target_itself_accepts_its_deepest_path():
  """The target drafting a tree for itself: its top-ranked path is always right, so every
  step gains depth + 1 tokens (the tree's 4 levels + the bonus)."""
  d = DraftModel.from_model(TARGET, tree=TREE)
  out = gen(TARGET, PROMPTS, max_new_tokens=20, eos=None, drafter=d)
  assert out.token_lists() == ar(PROMPTS, n=20)
  gained = np.asarray(out.stats.gained)
  assert (gained[:, :4] == 5).all()
  # One catch-up forward plus one per expanded level (3: the last level is not expanded).
  np.testing.assert_array_equal(out.stats.draft_calls, 4 * np.asarray(out.stats.target_calls))


def test_sequences_accept_different_lengths_in_one_batch():
  out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None,
                        drafter=DRAFTERS["truncated"]())
  acc = np.asarray(out.stats.gained)
  # The per-step gains differ between sequences: there is no shared minimum.
  assert len({tuple(r[:4]) for r in acc}) > 1
  assert (acc.sum(1) >= 24).all()


def naive_greedy(model, prompt, n):
  """Greedy decoding by full causal forwards, no cache: the reference for the loop."""
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(np.asarray(model.logits([seq]))[0, -1])))
  return seq[len(prompt):]


def test_chunked_prefill_of_any_prompt_length_in_one_program():
  """Prompts across several 64-token prefill chunks, ragged, decode as a cache-free loop
  does; one cache size compiles once for every prompt length."""
  rng = np.random.default_rng(0)
  long, short = rng.integers(0, 64, 150).tolist(), [3, 1, 4]
  want = [naive_greedy(TARGET, p, 6) for p in (long, short)]
  compiled = decode._generate._cache_size()  # pylint: disable=protected-access
  kw = dict(max_new_tokens=6, eos=None, max_len=200)
  assert gen(TARGET, [long, short], **kw).token_lists() == want
  assert gen(TARGET, [short, long], **kw).token_lists() == want[::-1]
  assert gen(TARGET, [long[:70], short[:2]], **kw).token_lists() == [
      naive_greedy(TARGET, long[:70], 6), naive_greedy(TARGET, short[:2], 6)]
  assert decode._generate._cache_size() == compiled + 1  # pylint: disable=protected-access


def test_eos_stops_each_sequence_on_its_own():
  free = ar(PROMPTS, n=24)
  eos = free[0][5]  # a token that sequence 0 emits at step 6
  want = ar(PROMPTS, n=24, eos=eos)
  for i, toks in enumerate(want):
    cut = free[i].index(eos) + 1 if eos in free[i] else 24
    assert toks == free[i][:cut]
  for name in ("prompt_lookup", "self", "truncated"):
    out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=eos, drafter=DRAFTERS[name]())
    assert out.token_lists() == want, name


def test_gpt2_target_with_truncated_drafter():
  gpt = tiny(arch="gpt2", seed=3)
  want = ar(PROMPTS, model=gpt)
  out = gen(gpt, PROMPTS, max_new_tokens=24, eos=None,
                        drafter=DraftModel.truncated(gpt, 1, depth=3))
  assert out.token_lists() == want


def test_stop_policies_shorten_drafts():
  d = DraftModel.from_model(OTHER, depth=6)
  fixed = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d)
  svip = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d,
             stop=stopping.SVIP(threshold=0.0, min_len=1))
  # Fixed drafts all 6 tokens: 6 draft forwards per target call (catch-up included).
  np.testing.assert_array_equal(fixed.stats.draft_calls, 6 * np.asarray(fixed.stats.target_calls))
  # Threshold 0 stops before the 2nd token every time, which costs the forward of the
  # 1st: 2 draft calls per target call, and at most 1 accepted draft + 1 bonus per step.
  np.testing.assert_array_equal(svip.stats.draft_calls, 2 * np.asarray(svip.stats.target_calls))
  assert np.asarray(svip.stats.gained).max() <= 2
  assert svip.token_lists() == fixed.token_lists() == ar(PROMPTS)


def test_lossy_rules_are_labelled_and_never_default():
  from specjax import verify
  assert verify.get("greedy").lossless and verify.get("speculative").lossless
  assert not verify.get("typical").lossless and not verify.get("fuzzy").lossless
  # Without an explicit rule, a drafter at temperature 0 gives exactly AR's tokens; the
  # lossy typical rule with a zero threshold ignores the target and keeps every draft.
  d = DraftModel.from_model(OTHER, depth=4)
  default = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d)
  assert default.token_lists() == ar(PROMPTS)
  lenient = verify.get("typical", eps=0.0, delta=0.0)
  lossy = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d, acceptance=lenient,
              temperature=1.0)
  assert (np.asarray(lossy.stats.gained)[:, :4] == 5).all()
  honest = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d, temperature=1.0)
  assert (np.asarray(honest.stats.gained)[:, :4] < 5).any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(drafter=DraftModel.from_model(tiny(vocab=32))), "vocab size 32 != target vocab"),
    (dict(drafter=PromptLookup(depth=8), max_len=30), "cache slots; max_len is 30"),
    (dict(acceptance="medusa"), "Unknown acceptance rule 'medusa'"),
    (dict(drafter=DraftModel.from_model(OTHER), stop="sometimes"), "Unknown stop policy"),
    (dict(drafter=PromptLookup(), stop="svip"), "stop policies do not apply"),
    (dict(drafter=PromptLookup(), acceptance="greedy", temperature=1.0), "needs temperature=0"),
    (dict(acceptance="greedy"), "takes no acceptance rule"),
    (dict(stop="svip"), "needs a drafter"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_bad_input_errors(kwargs, match):
  kw = dict(max_new_tokens=8, eos=None) | kwargs
  with pytest.raises(ValueError, match=match):
    gen(TARGET, PROMPTS, **kw)


def test_bad_prompts():
  with pytest.raises(ValueError, match="got no prompts"):
    decode.generate(TARGET, [], max_new_tokens=4)
  with pytest.raises(ValueError, match="Prompt 0 holds float64 values, not integer token ids"):
    decode.generate(TARGET, [[1.5, 2.7]], max_new_tokens=4)
  with pytest.raises(ValueError, match="temperature must be a finite number"):
    decode.generate(TARGET, [[1, 2]], max_new_tokens=4, temperature=float("nan"))
  with pytest.raises(ValueError, match="depth >= 1"):
    decode.generate(TARGET, [[1, 2]], max_new_tokens=4, drafter=PromptLookup(depth=0))
  with pytest.raises(ValueError, match="at least 1 token"):
    DraftModel.from_model(OTHER, depth=0)
  with pytest.raises(ValueError, match="node 1 has parent 1"):
    from specjax.tree import check_parents_first
    check_parents_first([-1, 1])
  with pytest.raises(ValueError, match="Prompt 1 is empty"):
    decode.generate(TARGET, [[1], []], max_new_tokens=4)
  with pytest.raises(ValueError, match="outside"):
    decode.generate(TARGET, [[1, 999]], max_new_tokens=4)
  with pytest.raises(ValueError, match="context of 256 positions"):
    decode.generate(TARGET, [[1] * 250], max_new_tokens=10)


def test_compilation_cache_off_and_on(tmp_path, monkeypatch):
  """SPECJAX_COMPILE_CACHE=off leaves JAX's cache alone; a folder turns it on there (the
  tests' own run-wide folder, `conftest.py`, is restored after)."""
  import jax  # pylint: disable=g-import-not-at-top
  from specjax import runtime  # pylint: disable=g-import-not-at-top

  before = jax.config.jax_compilation_cache_dir
  monkeypatch.setenv("SPECJAX_COMPILE_CACHE", "off")
  assert runtime.enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir == before
  monkeypatch.setenv("SPECJAX_COMPILE_CACHE", str(tmp_path))
  try:
    assert runtime.enable_compilation_cache() == str(tmp_path)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path)
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_low_map_count_is_reported(tmp_path, monkeypatch):
  from specjax import runtime  # pylint: disable=g-import-not-at-top

  limit = tmp_path / "max_map_count"
  monkeypatch.setattr(runtime, "MAP_COUNT", str(limit))
  limit.write_text("65530\n")
  assert "sysctl -w vm.max_map_count" in runtime.check_map_count()
  limit.write_text("1048576\n")
  assert runtime.check_map_count() is None
  monkeypatch.setattr(runtime, "MAP_COUNT", str(tmp_path / "absent"))
  assert runtime.check_map_count() is None


def cut_reference(logits, temperature, top_k, top_p):
  """numpy: temperature, then keep the logits >= the k-th largest, then the smallest set of
  the largest whose mass reaches top_p (ties with its last logit kept)."""
  x = logits / temperature
  if 0 < top_k < len(x):
    x = np.where(x < np.sort(x)[::-1][top_k - 1], -np.inf, x)
  if top_p < 1:
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-x, kind="stable")
    mass_before = np.cumsum(p[order]) - p[order]
    cutoff = x[order][mass_before < top_p].min()
    x = np.where(x < cutoff, -np.inf, x)
  p = np.exp(x - x.max())
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.7, 3, None), (1.3, None, 0.6), (0.8, 5, 0.9), (1.0, 1, None),
    (2.0, 40, 0.3), (0.5, None, 1.0)])
def test_warped_distribution(temperature, top_k, top_p):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 32)).astype(np.float32)
  logits[:, 7] = logits[:, 3]  # ties
  s = sampling.Sampling.create(temperature, top_k, top_p)
  got = np.asarray(jax.jit(sampling.probs)(jnp.asarray(logits), s))
  want = np.stack([cut_reference(row, temperature, top_k or 0, top_p or 1.0)
                   for row in logits])
  np.testing.assert_allclose(got, want, atol=1e-6)
  # A cut changes something in every case that sets one.
  assert ((top_k or 99) >= 32 and (top_p or 1.0) == 1.0) or (got == 0).any()


def test_sampling_settings_share_one_compiled_program():
  """Only greedy-or-not shapes the program: other temperatures, top-k and top-p reuse it."""
  drafter = DraftModel.truncated(TARGET, 1, depth=3)
  kw = dict(max_new_tokens=4, eos=None, drafter=drafter, max_len=64)
  before = decode._generate._cache_size()  # pylint: disable=protected-access
  outs = [decode.generate(TARGET, PROMPTS, temperature=t, top_k=k, top_p=p, seed=3, **kw)
          for t, k, p in ((1.0, None, None), (0.6, 5, 0.9), (1.4, 2, None))]
  assert decode._generate._cache_size() == before + 1  # pylint: disable=protected-access
  assert outs[0].token_lists() != outs[1].token_lists()  # the settings do reach the program
  with pytest.raises(ValueError, match="build it with Sampling.create"):
    sampling.Sampling(1.0)  # greedy would disagree with the temperature
  with pytest.raises(ValueError, match="top_p must be in"):
    decode.generate(TARGET, PROMPTS, temperature=1.0, top_p=0.0, **kw)
