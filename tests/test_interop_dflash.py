"""DFlash heads cross between specjax and z-lab's checkpoint layout unchanged (same block
logits after export and load), and specjax's block forward matches `speculators`' DFlash
training forward (the PyTorch reference) on the same weights, features and anchors: the
fused context, its keys/values at their positions, the block [root, mask, ...] at positions
r.. seeing the context < r and itself, and the target's frozen embedding and LM head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from specjax import models
from specjax.drafters import io
from specjax.drafters.heads import dflash
from specjax.models import FINAL

TOL = 1e-4
T, BLOCK, MASK = 24, 4, 7


@pytest.fixture(scope="module")
def target():
  """The tiny random 2-layer Llama (vocabulary 512, tied embedding)."""
  return models.load("tiny-random")


def _head(target, taps=(1,)):
  """A Qwen3-style DFlash head (q/k norms, as z-lab's) with random non-trivial weights:
  init plus noise, so no norm scale is one and no projection is what init gives."""
  cfg = target.config
  # model_type "qwen3" as a Qwen3 target's head has it: z-lab's config.json says q/k norms
  # only through model_type.
  layer = cfg.replace(num_layers=2, qk_norm=True, model_type="qwen3")
  head = dflash.DFlashHead(cfg, layer, taps, BLOCK, MASK)
  params = head.init(jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = tree.unflatten([x + 0.3 * jax.random.normal(k, x.shape)
                           for x, k in zip(leaves, keys)])
  return head, params


def _tokens(cfg, seed=2, batch=1):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, T)).astype(np.int32)


def _our_logits(head, params, target, tokens, anchors):
  """float32[B, A, block - 1, V]: specjax's logits of slots 1.. of each anchor's block."""
  cfg = target.config

  @jax.jit
  def run(params, tokens, anchors):
    feats = models.causal_forward(cfg, target.params, tokens, features=head.features).features
    shared = models.shared_params(cfg, target.params)
    ctx = dflash.context_kv(head.layer, params, head.fuse(params, feats),
                            jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
    g = head.blocks(params, shared, ctx, tokens, anchors, head.block_size - 1)
    return models.lm_head(cfg, shared, g)

  return np.asarray(run(params, jnp.asarray(tokens), jnp.asarray(anchors, jnp.int32)))


def test_zlab_export_round_trip_gives_identical_logits(target, tmp_path):
  """export_zlab then io.load: the same head (taps, block, mask token, layer shape) and
  the same block logits; taps z-lab cannot name (the embedding, FINAL) are refused."""
  head, params = _head(target)
  out = str(tmp_path / "zlab")
  dflash.export_zlab(out, head, params)
  assert io.layout(out) == "z-lab"
  kind, back, back_params, _ = io.load(out, target.config)
  assert kind == "dflash"
  assert (back.taps, back.block_size, back.mask_token) == (head.taps, BLOCK, MASK)
  fields = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "norm_eps", "rope_theta", "rope_scaling", "qk_norm", "attention_bias",
            "sliding_window")
  assert {f: getattr(back.layer, f) for f in fields} == {f: getattr(head.layer, f)
                                                         for f in fields}
  assert back.config == target.config
  jax.tree.map(np.testing.assert_array_equal, back_params, params)
  tokens = _tokens(target.config, batch=2)
  anchors = np.array([[0, 3, 9, 20], [1, 5, 12, 23]])
  ours = _our_logits(head, params, target, tokens, anchors)
  np.testing.assert_allclose(_our_logits(back, back_params, target, tokens, anchors), ours,
                             rtol=1e-6, atol=1e-6)
  assert np.abs(ours).max() > 1.0  # not a degenerate all-zero comparison
  for taps, what in (((0, 1), r"the embedding \(0\)"), ((1, FINAL), r"final normed state")):
    bad, bad_params = _head(target, taps)
    with pytest.raises(ValueError, match=what):
      dflash.export_zlab(str(tmp_path / "bad"), bad, bad_params)


# --- speculators' DFlash (vLLM's training library) ------------------------------------------

def _speculators_model(head, params, target):
  """speculators' DFlashDraftModel with `head`'s weights, the target's embedding and LM
  head (full vocabulary: the draft LM head is the verifier's), eager attention."""
  from speculators.models.dflash import DFlashDraftModel, DFlashSpeculatorConfig  # pylint: disable=g-import-not-at-top
  cfg, lay = target.config, head.layer
  layer = transformers.Qwen3Config(
      vocab_size=cfg.vocab_size, hidden_size=lay.hidden_size,
      intermediate_size=lay.intermediate_size, num_hidden_layers=lay.num_layers,
      num_attention_heads=lay.num_heads, num_key_value_heads=lay.num_kv_heads,
      head_dim=lay.head_dim, rms_norm_eps=lay.norm_eps, rope_theta=lay.rope_theta,
      attention_bias=False, max_position_embeddings=lay.max_position_embeddings)
  layer._attn_implementation = "eager"  # pylint: disable=protected-access  # not flex attention
  config = DFlashSpeculatorConfig(
      transformer_layer_config=layer, draft_vocab_size=cfg.vocab_size, block_size=BLOCK,
      aux_hidden_state_layer_ids=list(head.taps), mask_token_id=MASK)
  model = DFlashDraftModel(config).eval()
  p = jax.tree.map(lambda x: torch.tensor(np.asarray(x)), params)
  sd = {"fc.weight": p["fc"]["kernel"].T, "hidden_norm.weight": p["hidden_norm"]["scale"],
        "norm.weight": p["norm"]["scale"]}
  for i in range(lay.num_layers):
    lp = p[f"layers_{i}"]
    for n in ("input_layernorm", "post_attention_layernorm"):
      sd[f"layers.{i}.{n}.weight"] = lp[n]["scale"]
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
      sd[f"layers.{i}.self_attn.{n}.weight"] = lp["self_attn"][n]["kernel"].T
    for n in ("q_norm", "k_norm"):
      sd[f"layers.{i}.self_attn.{n}.weight"] = lp["self_attn"][n]["scale"]
    for n in ("gate_proj", "up_proj", "down_proj"):
      sd[f"layers.{i}.mlp.{n}.weight"] = lp["mlp"][n]["kernel"].T
  assert cfg.tie_embeddings  # the tiny target's LM head is its embedding
  emb = torch.tensor(np.asarray(target.params["embed_tokens"]["embedding"]))
  sd.update({"embed_tokens.weight": emb, "lm_head.weight": emb, "verifier_lm_head.weight": emb,
             "verifier_norm.weight": torch.tensor(np.asarray(target.params["norm"]["scale"]))})
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not missing and not unexpected, (missing, unexpected)
  return model


def test_speculators_dflash_matches(target):
  """speculators' `_backbone_forward` (random anchors among loss positions, all blocks in
  one forward) gives specjax's block logits at the anchors it chose."""
  head, params = _head(target, taps=(0, 1))
  model = _speculators_model(head, params, target)
  cfg = target.config
  tokens = _tokens(cfg)
  fwd = models.causal_forward(cfg, target.params, jnp.asarray(tokens),
                              features=head.features + (FINAL,))
  hidden = np.concatenate([np.asarray(f) for f in fwd.features[:-1]], -1)
  loss_mask = np.ones((1, T), np.int64)
  loss_mask[0, 5:9] = 0
  torch.manual_seed(0)
  with torch.no_grad():
    _, logits, _, _, idx = model._backbone_forward(  # pylint: disable=protected-access
        torch.tensor(hidden), torch.tensor(tokens, dtype=torch.long), torch.tensor(loss_mask),
        torch.tensor(np.asarray(fwd.features[-1])), torch.zeros((1, T), dtype=torch.long),
        max_anchors=8)
  anchors = idx.numpy()[::BLOCK]
  assert len(set(anchors.tolist())) == 8 and not set(anchors.tolist()) & {5, 6, 7, 8}
  theirs = logits.numpy().reshape(1, 8, BLOCK, -1)[:, :, 1:]  # slot 0 is the anchor itself
  ours = _our_logits(head, params, target, tokens, anchors[None])
  np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
