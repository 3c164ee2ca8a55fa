"""Heads made by the PyTorch reference packages load in specjax with the same draft logits:
EAGLE-1/2 heads in eagle-llm's layout (its `cnets.Model` is the reference) and Medusa
heads in medusa-llm's (its `ResBlock` + per-head LM heads), on tiny random targets."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from specjax import decode, models
from specjax.drafters import io, load_drafter
from specjax.drafters.heads import eagle as eagle_lib
from specjax.drafters.heads import medusa as medusa_lib
from specjax.models import causal

import doubles

TOL = 1e-4


@pytest.fixture(scope="module")
def target(tmp_path_factory):
  return models.load(doubles.write_tiny_llama(str(tmp_path_factory.mktemp("t"))))


def _randomize(module, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.2 * torch.randn_like(p))


@pytest.fixture(scope="module")
def eagle_llm_head(target, tmp_path_factory):
  """A head saved as eagle-llm saves its `ea_layer` (config.json + pytorch_model.bin)."""
  from eagle.model import cnets  # pylint: disable=g-import-not-at-top
  cfg = target.config
  hf = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=1,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      rms_norm_eps=cfg.norm_eps, max_position_embeddings=2048)
  hf.rope_scaling = None
  net = cnets.Model(hf, bias=True).eval()
  _randomize(net, 0)
  with torch.no_grad():  # EAGLE heads carry the base model's embedding
    net.embed_tokens.weight.copy_(torch.tensor(np.asarray(target.params["embed_tokens"][
        "embedding"])))
  path = str(tmp_path_factory.mktemp("eagle_llm"))
  hf.to_json_file(os.path.join(path, "config.json"))
  torch.save(net.state_dict(), os.path.join(path, "pytorch_model.bin"))
  return path, net


def test_eagle_llm_head_same_draft_logits(target, eagle_llm_head):
  path, net = eagle_llm_head
  assert io.layout(path) == "eagle-llm"
  kind, head, params, _ = io.load(path, target.config)
  assert kind == "eagle"
  rng = np.random.default_rng(0)
  h = rng.normal(size=(2, 9, target.config.hidden_size)).astype(np.float32)
  ids = rng.integers(0, target.config.vocab_size, (2, 9))
  with torch.no_grad():
    want = net(torch.tensor(h), torch.tensor(ids)).numpy()
  shared = models.shared_params(target.config, target.params)
  got, _ = eagle_lib.net(target.config, head.layer_config, params, shared, jnp.asarray(h),
                         jnp.asarray(ids), jnp.broadcast_to(jnp.arange(9), (2, 9)), causal(9))
  assert np.abs(np.asarray(got) - want).max() <= TOL
  want_logits = np.asarray(models.lm_head(target.config, shared, jnp.asarray(want)))
  got_logits = np.asarray(models.lm_head(target.config, shared, got))
  assert np.abs(got_logits - want_logits).max() <= TOL


def test_eagle_llm_head_decodes_losslessly(target, eagle_llm_head):
  path, _ = eagle_llm_head
  prompts = [[5, 70, 3, 9, 100], list(range(40, 110))]
  ar = decode.generate(target, prompts, max_new_tokens=16, eos=None)
  for knobs in ({"depth": 3}, {"top_k": 2, "depth": 2}):
    spec = decode.generate(target, prompts, max_new_tokens=16, eos=None,
                           drafter=load_drafter(path, target, **knobs))
    assert spec.token_lists() == ar.token_lists()


@pytest.fixture(scope="module")
def medusa_llm_head(target, tmp_path_factory):
  """Heads saved as medusa-llm saves `medusa_head` (config.json + medusa_lm_head.pt)."""
  from medusa.model.medusa_model import ResBlock  # pylint: disable=g-import-not-at-top
  h, v, k = target.config.hidden_size, target.config.vocab_size, 3
  heads = torch.nn.ModuleList([torch.nn.Sequential(ResBlock(h), torch.nn.Linear(h, v, bias=False))
                               for _ in range(k)]).eval()
  _randomize(heads, 1)
  path = str(tmp_path_factory.mktemp("medusa_llm"))
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump({"medusa_num_heads": k, "medusa_num_layers": 1,
               "base_model_name_or_path": "tiny"}, f)
  torch.save(heads.state_dict(), os.path.join(path, "medusa_lm_head.pt"))
  return path, heads


def test_medusa_llm_head_same_draft_logits(target, medusa_llm_head):
  path, heads = medusa_llm_head
  assert io.layout(path) == "medusa-llm"
  kind, head, params, _ = io.load(path, target.config)
  assert kind == "medusa" and head.num_heads == 3
  f = np.random.default_rng(1).normal(size=(4, target.config.hidden_size)).astype(np.float32)
  with torch.no_grad():
    want = np.stack([hd(torch.tensor(f)).numpy() for hd in heads], 1)  # [B, K, V]
  got = medusa_lib.head_logits(target.config, params, None,
                               medusa_lib.heads(params, jnp.asarray(f)))
  assert np.abs(np.asarray(got) - want).max() <= TOL
  prompts = [[5, 70, 3, 9, 100], list(range(40, 110))]
  ar = decode.generate(target, prompts, max_new_tokens=16, eos=None)
  spec = decode.generate(target, prompts, max_new_tokens=16, eos=None,
                         drafter=load_drafter(path, target, tree=[(0,), (1,), (0, 0)]))
  assert spec.token_lists() == ar.token_lists()


def test_foreign_head_for_another_target_is_refused(eagle_llm_head, medusa_llm_head):
  other = models.RANDOM["tiny-random"]  # hidden 64, vocab 512
  for path, _ in (eagle_llm_head, medusa_llm_head):
    with pytest.raises(ValueError, match="was made for a target with hidden_size"):
      io.load(path, other)


def test_unknown_folder_layout(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="not a head folder"):
    io.layout(str(tmp_path))
