"""EAGLE-3 heads cross between specjax and `speculators` (vLLM's serving format) with the
same draft logits, both ways, through three unrolled draft steps (speculators' own forward
is the reference); SpecForge's layout (midlayer.*, d2t/t2d) loads too; every loaded head
decodes losslessly on a tiny random 8-layer target."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from specjax import decode, models
from specjax.drafters import Eagle3Head, EagleHead, export, io, load_drafter
from specjax.drafters.heads import runtime

import doubles

TOL = 1e-4
STEPS, T, DRAFT_VOCAB = 3, 11, 64


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
  """(folder, Model): a random 8-layer Llama (EAGLE-3 reads the inputs of layers 2, 4, 5)."""
  path = doubles.write_tiny_llama(str(tmp_path_factory.mktemp("verifier")), layers=8,
                                  tokenizer=False, tie_word_embeddings=False)
  return path, models.load(path)


def _speculators_model(folder):
  from speculators.models.attention import create_float_mask  # pylint: disable=g-import-not-at-top
  from speculators.models.eagle3 import Eagle3DraftModel  # pylint: disable=g-import-not-at-top
  model = Eagle3DraftModel.from_pretrained(folder)
  # Dense masks and eager attention on CPU (its default is flex attention).
  model._attn_impl, model._create_mask_fn = "eager", create_float_mask  # pylint: disable=protected-access
  model.config.transformer_layer_config._attn_implementation = "eager"  # pylint: disable=protected-access
  return model.eval()


def _new_speculators_head(verifier_path, cfg, folder, layer_kw=None, **variants):
  """A head made and saved by speculators: random weights, a random 64-token vocabulary
  (`layer_kw`: more fields of its draft layer's config)."""
  from speculators import SpeculatorsConfig, VerifierConfig  # pylint: disable=g-import-not-at-top
  from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig  # pylint: disable=g-import-not-at-top
  from speculators.proposals.greedy import GreedyTokenProposalConfig  # pylint: disable=g-import-not-at-top
  layer = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=1,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      rms_norm_eps=cfg.norm_eps, max_position_embeddings=2048, **(layer_kw or {}))
  layer._attn_implementation = "eager"  # pylint: disable=protected-access
  config = Eagle3SpeculatorConfig(
      transformer_layer_config=layer, draft_vocab_size=DRAFT_VOCAB,
      eagle_aux_hidden_state_layer_ids=[2, 4, 5], **variants,
      speculators_config=SpeculatorsConfig(
          algorithm="eagle3", default_proposal_method="greedy",
          proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=STEPS)],
          verifier=VerifierConfig(name_or_path=verifier_path,
                                  architectures=["LlamaForCausalLM"])))
  model = Eagle3DraftModel(config)
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "embed_tokens" not in name and "verifier" not in name:
        p.copy_(0.3 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))
  ids = np.sort(np.random.default_rng(0).choice(cfg.vocab_size, DRAFT_VOCAB, replace=False))
  t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
  t2d[ids] = True
  model.load_vocab_mappings(t2d, torch.tensor(ids - np.arange(DRAFT_VOCAB)))
  model.load_verifier_weights()
  model.save_pretrained(folder)
  return folder


def _inputs(cfg):
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(1, T, 3 * cfg.hidden_size)).astype(np.float32)
  ids = rng.integers(0, cfg.vocab_size, (1, T))
  return hidden, ids


def _their_logits(model, hidden, ids):
  """Draft-vocabulary logits of each TTT step of speculators' forward."""
  out = []
  hook = model.lm_head.register_forward_hook(lambda m, i, o: out.append(o.detach().numpy()))
  with torch.no_grad():
    model(torch.tensor(hidden), torch.tensor(ids), torch.zeros((1, T), dtype=torch.long),
          ttt_steps=STEPS)
  hook.remove()
  return out


def _our_logits(head, params, target, hidden, ids):
  """The same steps through specjax: pair t = (fused features t, token ids[t])."""
  h = target.config.hidden_size

  @jax.jit  # one program, not hundreds of op-by-op ones
  def steps(head, params, hidden, ids):
    feats = tuple(hidden[..., i * h:(i + 1) * h] for i in range(3))
    tokens = jnp.concatenate([jnp.zeros((1, 1), jnp.int32), ids.astype(jnp.int32)], 1)
    shared = models.shared_params(target.config, target.params)
    gs = runtime.unroll(head, params, shared, head.fuse(params, feats), tokens, STEPS)
    return [head.draft_logits(params, g) for g in gs]

  return [np.asarray(x) for x in steps(head, params, hidden, ids)]


def _assert_same(ours, theirs, steps=STEPS):
  for s, (a, b) in enumerate(list(zip(ours, theirs))[:steps]):
    valid = T - s  # step s reads token t + s: speculators pads past the end, we clip
    assert np.abs(a[:, :valid] - b[:, :valid]).max() <= TOL, s


def _decodes_losslessly(path, target):
  prompts = [[5, 70, 3, 9, 100], list(range(40, 110))]
  ar = decode.generate(target, prompts, max_new_tokens=16, eos=None)
  for knobs in ({"depth": 3}, {"top_k": 2, "depth": 3, "num_nodes": 5}):
    spec = decode.generate(target, prompts, max_new_tokens=16, eos=None,
                           drafter=load_drafter(path, target, **knobs))
    assert spec.token_lists() == ar.token_lists()


VARIANTS = {"plain": {},
            # speculators' training defaults (the norm before fc, the normed output fed back)
            "defaults": {"norm_before_fc": True, "norm_output": True},
            "per_feature_norms": {"fc_norm": True, "norm_before_residual": True},
            # A draft layer that slides over 4 positions: run with its window.
            "sliding_window": {"layer_kw": {"layer_types": ["sliding_attention"],
                                            "sliding_window": 4}}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_speculators_head_loads_with_same_logits(verifier, tmp_path, variant):
  path, target = verifier
  folder = _new_speculators_head(path, target.config, str(tmp_path / "spec"),
                                 **VARIANTS[variant])
  assert io.layout(folder) == "speculators"
  kind, head, params, _ = io.load(folder, target.config)
  assert kind == "eagle3" and head.aux_layers == (2, 4, 5) and head.draft_vocab == DRAFT_VOCAB
  assert all(getattr(head, k) == v for k, v in VARIANTS[variant].items() if k != "layer_kw")
  assert head.layer_config.sliding_window == (4 if variant == "sliding_window" else None)
  model = _speculators_model(folder)
  np.testing.assert_array_equal(np.asarray(head.draft_ids),
                                np.arange(DRAFT_VOCAB) + model.d2t.numpy())
  hidden, ids = _inputs(target.config)
  # With a window, speculators' unrolled steps keep the first step's window rows (anchored
  # at the pair, not at the drafted token's position, which decoding uses): compare the
  # first step there.
  _assert_same(_our_logits(head, params, target, hidden, ids), _their_logits(model, hidden, ids),
               1 if variant == "sliding_window" else STEPS)
  _decodes_losslessly(folder, target)


def _specjax_head(target, folder):
  """A head trained-to-be by specjax: fitted vocabulary, random weights, saved."""
  head = Eagle3Head(target.config, (2, 4, 5), DRAFT_VOCAB)
  params = head.init(jax.random.key(0))
  tokens = np.random.default_rng(2).integers(0, target.config.vocab_size, (8, 40))
  head, params = head.fit(params, tokens, np.ones_like(tokens, np.float32),
                          models.shared_params(target.config, target.params))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  params = tree.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  io.save(folder, "eagle3", {"aux_layers": [2, 4, 5], "draft_vocab": DRAFT_VOCAB}, params,
          target.config, buffers=head.buffers())
  return head, params


def test_specjax_head_exports_to_speculators_with_same_logits(verifier, tmp_path):
  path, target = verifier
  head, params = _specjax_head(target, str(tmp_path / "ours"))
  out = str(tmp_path / "served")
  export.main(["--to-speculators", str(tmp_path / "ours"), out, "--target", path, "--verifier", path])
  model = _speculators_model(out)
  assert model.t2d.sum() == DRAFT_VOCAB
  np.testing.assert_array_equal(np.flatnonzero(model.t2d.numpy()), np.asarray(head.draft_ids))
  # The folder carries the target's embedding, as speculators saves it (its from_pretrained
  # leaves a missing one uninitialised).
  np.testing.assert_array_equal(model.embed_tokens.weight.numpy(),
                                target.params["embed_tokens"]["embedding"])
  hidden, ids = _inputs(target.config)
  _assert_same(_our_logits(head, params, target, hidden, ids), _their_logits(model, hidden, ids))
  # ... and the exported folder loads back into specjax unchanged.
  _, back, back_params, _ = io.load(out, target.config)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), back_params, params)
  np.testing.assert_array_equal(back.draft_ids, head.draft_ids)


def test_specforge_layout_loads(verifier, tmp_path):
  """SpecForge / SafeAILab EAGLE-3 save the decoder layer as midlayer.* beside a Llama
  config.json with draft_vocab_size; the same weights give the same logits."""
  path, target = verifier
  head, params = _specjax_head(target, str(tmp_path / "ours"))
  export.export_speculators(str(tmp_path / "ours"), str(tmp_path / "served"), target)
  served = tmp_path / "served" / "model.safetensors"
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(served).st_mode & 0o777 == 0o666 & ~umask  # not safetensors' own 0600
  sd = safetensors.numpy.load_file(str(served))
  forge = tmp_path / "forge"
  forge.mkdir()
  safetensors.numpy.save_file({k.replace("layers.0.", "midlayer."): v for k, v in sd.items()},
                              str(forge / "model.safetensors"))
  cfg = target.config
  (forge / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "num_hidden_layers": 1, "vocab_size": cfg.vocab_size, "draft_vocab_size": DRAFT_VOCAB,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "max_position_embeddings": 2048}))
  assert io.layout(str(forge)) == "specforge"
  _, loaded, loaded_params, _ = io.load(str(forge), cfg)
  hidden, ids = _inputs(cfg)
  _assert_same(_our_logits(loaded, loaded_params, target, hidden, ids),
               _our_logits(head, params, target, hidden, ids))
  _decodes_losslessly(str(forge), target)


def test_eagle3_head_for_another_target_is_refused(verifier, tmp_path):
  path, target = verifier
  _specjax_head(target, str(tmp_path / "ours"))
  export.export_speculators(str(tmp_path / "ours"), str(tmp_path / "served"), target)
  with pytest.raises(ValueError, match="was made for a target with hidden_size"):
    io.load(str(tmp_path / "served"), models.RANDOM["tiny-random"])
  io.save(str(tmp_path / "eagle1"), "eagle", {}, EagleHead(target.config).init(
      jax.random.key(0)), target.config)
  with pytest.raises(ValueError, match="only EAGLE-3 heads export"):
    export.export_speculators(str(tmp_path / "eagle1"), str(tmp_path / "y"), target)
