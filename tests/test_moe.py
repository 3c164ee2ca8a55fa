"""Mixture-of-experts targets (Mixtral, Qwen3-MoE): parity with transformers on tiny random
checkpoints it writes (a prompt longer than a prefill chunk included), and greedy
speculative decoding equal to AR under an expert-parallel mesh of 8 forced host devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from specjax import decode, models, sharding
from specjax.drafters import DraftModel
from specjax.models import model as model_lib

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
              initializer_range=0.2, tie_word_embeddings=False)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, intermediate_size=16,
                                                  num_local_experts=8),
    # Layer 1 dense (mlp_only_layers), the others routed, weights not renormalised.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, head_dim=8, intermediate_size=24, moe_intermediate_size=16, num_experts=8,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1]),
}


def _saved(name, path):
  torch.manual_seed(0)
  cfg = CONFIGS[name]()
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():  # norm scales off 1, so a mis-mapped one shows
    for pname, p in hf.named_parameters():
      if "norm" in pname:
        p.add_(0.1 * torch.randn_like(p))
  hf.save_pretrained(str(path), safe_serialization=True)
  return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  hf = _saved(request.param, path)
  return request.param, hf, models.load(str(path))


def test_moe_logits_match_transformers_past_a_prefill_chunk(pair):
  name, hf, model = pair
  cfg = model.config
  assert cfg.num_experts == 8 and cfg.experts_per_token == 2
  assert cfg.moe_layers == ((0, 2) if name == "qwen3_moe" else (0, 1, 2))
  assert cfg.moe_norm_topk == (name == "mixtral")
  n = model_lib.PREFILL_CHUNK + 20  # two prefill chunks
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, n + 1))
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.numpy()
  assert want.std() > 0.3
  full = np.asarray(model.logits(tokens))
  assert np.abs(full - want).max() <= 1e-3
  # Prefill n tokens in chunks, then one cached step: the last position's logits.
  cache = model.init_cache(2, 128)
  cache, _ = models.prefill(cfg, model.params, cache, jnp.asarray(tokens[:, :n]),
                            jnp.full((2,), n))
  step = models.forward(cfg, model.params, jnp.asarray(tokens[:, n:]), jnp.full((2, 1), n),
                        models.causal(1), cache)
  err = float(np.abs(np.asarray(step.logits[:, 0]) - want[:, n]).max())
  print(f"\n{name}: max |logits diff| {np.abs(full - want).max():.2e}, cached {err:.2e}")
  assert err <= 1e-3


def test_moe_decodes_on_an_expert_parallel_mesh_equal_to_ar(pair):
  """Experts split 4 ways over the `expert` axis (2-way data): the expert weights are
  placed by expert, and greedy output with a draft equals single-device AR."""
  name, _, single = pair
  plan = sharding.Plan.create("data=2,expert=4")
  placed = jax.device_put(single.params, plan.param_shardings(single.params))
  target = models.Model(single.config, placed)
  gate = target.params["layers_0"]["mlp"]["gate"]
  assert gate.sharding.spec[0] == "expert" and len(gate.sharding.device_set) == 8
  assert gate.addressable_shards[0].data.shape[0] == 2  # 8 experts over 4 devices
  prompts = [list(np.random.default_rng(i).integers(0, VOCAB, n)) for i, n in
             enumerate((5, 30, 2, 12))]
  want = decode.generate(single, prompts, max_new_tokens=12, eos=None).token_lists()
  for drafter in (None, DraftModel.truncated(target, 1, depth=3)):
    out = decode.generate(target, prompts, max_new_tokens=12, eos=None, drafter=drafter,
                          plan=plan)
    assert out.token_lists() == want, name


def test_bad_moe_configs_are_refused():
  with pytest.raises(ValueError, match="needs 1 <= experts_per_token <= num_experts"):
    models.ModelConfig(arch="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
                       num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, num_experts=4,
                       experts_per_token=5, moe_intermediate_size=8, moe_layers=(0,))
