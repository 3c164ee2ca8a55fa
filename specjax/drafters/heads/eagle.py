"""EAGLE-1/2: feature-level drafting with one decoder layer over the target's own features.

Pair t of a sequence is (f_t, x_{t+1}): the target's final normed hidden state at
position t (the `FINAL` feature, what its LM head reads) and the token after it. The head

  h_t = fc(concat(embed(x_{t+1}), f_t))         2H -> H with bias; embedding = target's
  g_t = decoder_layer(h_t)                      Llama layer without its input norm,
                                                causal over pairs, RoPE at position t
  p(x_{t+2}) = softmax(lm_head(g_t))            the target's frozen LM head

predicts f_{t+1} (g_t) and through it the token after next. Drafting feeds a drafted
token back with the head's own predicted feature; training regresses g_t on f_{t+1}
(SmoothL1) plus 0.1 x soft cross-entropy against the target's distribution, with uniform
noise on the input features (EAGLE-1's recipe; docs/training.md, "Training recipes").

FSPAD (`feature_sampling`, `partial_alignment`; built on EAGLE-2, whose head this is):
feature sampling refines fc's output h' by an MLP the token embedding gates,
h = h' + W_down(SiLU(W_gate e) * W_up RMSNorm(h')); partial alignment distillation doubles
the layer's output, g = [x; x] + MLP_2H(x), the LM head reads the first half and the second
is regressed on f_{t+1} (SmoothL1, weight 1) and fed back while drafting, so the
regression no longer pulls on the logits' input (soft CE weight 0.1).

It decodes with the drafter every feature-level head shares (`runtime.FeatureDrafter`):
a chain, a static tree or EAGLE-2's dynamic tree. `from_eagle_llm` reads SafeAILab's
EAGLE-1/2 heads.
"""

from __future__ import annotations

import os
from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax import registry
from specjax.drafters import io
from specjax.drafters.base import TargetBatch, TrainableHead, check_target
from specjax.drafters.heads import runtime
from specjax.models import llama
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig, from_hf_config
from specjax.models.model import FINAL, causal, embed, lm_head, param_dtype


class EagleNet(nn.Module):
  """fc + one decoder layer (no input norm), named as eagle-llm names its weights; with
  FSPAD's options, feature sampling after fc and a doubled MLP output (`pad`)."""

  cfg: ModelConfig
  dtype: jnp.dtype = jnp.float32
  feature_sampling: bool = False
  pad: bool = False

  @nn.compact
  def __call__(self, emb_BxTxH, feat_BxTxH, positions_BxT, visible_BxTxT, kv=None,
               start_B=None, prefix_BxTxS=None):
    cfg = self.cfg
    dense = lambda n, name, bias=False: nn.Dense(n, use_bias=bias, dtype=self.dtype,
                                                 param_dtype=self.dtype, name=name)
    feat_BxTxH = feat_BxTxH[..., -cfg.hidden_size:]  # PAD's output: its regressed half
    x = dense(cfg.hidden_size, "fc", True)(
        jnp.concatenate([emb_BxTxH, feat_BxTxH], -1).astype(self.dtype))
    if self.feature_sampling:  # FSPAD: the token embedding gates an MLP over the fused feature
      e = emb_BxTxH.astype(self.dtype)
      x = x + dense(cfg.hidden_size, "fs_down")(
          jax.nn.silu(dense(cfg.intermediate_size, "fs_gate")(e)) *
          dense(cfg.intermediate_size, "fs_up")(
              llama.RMSNorm(cfg.norm_eps, self.dtype, name="fs_norm")(x)))
    cos, sin = llama.rope_cos_sin(cfg, positions_BxT, self.dtype)
    h, kv = llama.Attention(cfg, self.dtype, name="self_attn")(
        x, cos, sin, visible_BxTxT, prefix_BxTxS, kv, start_B)
    x = x + h
    if not self.pad:
      return x + llama.MLP(cfg, self.dtype, name="mlp")(
          llama.RMSNorm(cfg.norm_eps, self.dtype, name="post_attention_layernorm")(x)), kv
    # FSPAD's partial alignment: [the LM head's half, the regressed feature's half].
    y = llama.RMSNorm(cfg.norm_eps, self.dtype, name="post_attention_layernorm")(x)
    f = cfg.intermediate_size
    y = dense(2 * cfg.hidden_size, "down_proj2")(
        jax.nn.silu(dense(f, "gate_proj2")(y)) * dense(f, "up_proj2")(y))
    return jnp.concatenate([x, x], -1) + y, kv


def net(cfg: ModelConfig, layer: ModelConfig, params, shared, feat_BxTxH, next_BxT,
        positions_BxT, visible_BxTxT, cache: KVCache | None = None, prefix_BxTxS=None,
        feature_sampling: bool = False, pad: bool = False):
  """The EAGLE-1 head (decoder layer shaped by `layer`) on T pairs (f, next token) of the
  target `cfg` (see `runtime.run_layer`). Returns (predicted features [B, T, H], or
  [B, T, 2H] with FSPAD's partial alignment, cache)."""
  return runtime.run_layer(EagleNet(layer, param_dtype(params), feature_sampling, pad), params,
                   (embed(cfg, shared, next_BxT), feat_BxTxH), positions_BxT, visible_BxTxT,
                   cache, prefix_BxTxS)


@flax.struct.dataclass
class EagleHead(TrainableHead):
  """EAGLE-1 as a trainable head (`base.TrainableHead`, `runtime.FeatureHead`)."""

  config: ModelConfig = flax.struct.field(pytree_node=False)  # the target's
  noise: float = flax.struct.field(pytree_node=False, default=0.2)
  ce_weight: float = flax.struct.field(pytree_node=False, default=0.1)
  # The decoder layer's shape (heads, MLP width, RoPE); None = the target's. Heads made
  # elsewhere bring their own (eagle-llm's RoPE base is always 10000).
  layer: ModelConfig | None = flax.struct.field(pytree_node=False, default=None)
  # Start from the identity (the head's first guess is the target's own next-token
  # distribution at the right scale) instead of a random fc whose logits start ~10x off.
  init_identity: bool = flax.struct.field(pytree_node=False, default=False)
  # FSPAD: feature sampling (fc's output refined by an MLP the token embedding gates) and
  # partial alignment distillation (the layer's output doubled: one half for the LM head,
  # one regressed on the next feature and fed back while drafting).
  feature_sampling: bool = flax.struct.field(pytree_node=False, default=False)
  partial_alignment: bool = flax.struct.field(pytree_node=False, default=False)
  features = (FINAL,)

  @property
  def layer_config(self) -> ModelConfig:
    return self.layer or self.config

  def _module(self, dtype) -> EagleNet:
    return EagleNet(self.layer_config, dtype, self.feature_sampling, self.partial_alignment)

  def net(self, params, shared, *args):
    return net(self.config, self.layer_config, params, shared, *args,
               feature_sampling=self.feature_sampling, pad=self.partial_alignment)

  def regressed(self, g):
    """The part of the head's output regressed on (and fed back as) the next feature."""
    return g[..., -self.config.hidden_size:]

  def fuse(self, params, features):
    """The per-position feature the head reads: the target's final state itself."""
    return features[0]

  def logits(self, params, shared, g_BxTxH):
    return lm_head(self.config, shared, g_BxTxH[..., :self.config.hidden_size])

  def validate(self, target_config: ModelConfig) -> None:
    check_target("This EAGLE head", self.config.hidden_size, self.config.vocab_size,
                 target_config)

  def init(self, key, dtype=jnp.float32):
    z = jnp.zeros((1, 1), jnp.int32)
    h = jnp.zeros((1, 1, self.config.hidden_size), dtype)
    params = self._module(dtype).init(key, h, h, z, causal(1))["params"]
    if self.init_identity:  # start as g = f: fc passes the feature, the layer adds nothing
      hs = self.config.hidden_size
      params["fc"]["kernel"] = 0.01 * params["fc"]["kernel"] + jnp.concatenate(
          [jnp.zeros((hs, hs), dtype), jnp.eye(hs, dtype=dtype)])
      for name in ("self_attn/o_proj", "mlp/down_proj", "down_proj2", "fs_down"):
        group, *rest = name.split("/")
        if group in params:
          p = params[group][rest[0]] if rest else params[group]
          p["kernel"] *= 0
    return params

  def loss(self, params, batch: TargetBatch, key):
    cfg = self.config
    f = batch.features[0]
    b, t = batch.tokens.shape
    f_in = f[:, :-1] + self.noise * jax.random.uniform(key, f[:, :-1].shape, f.dtype, -0.5, 0.5)
    positions = jnp.broadcast_to(jnp.arange(t - 1), (b, t - 1))
    g, _ = self.net(params, batch.shared, f_in, batch.tokens[:, 1:], positions, causal(t - 1))
    logits = self.logits(params, batch.shared, g)
    target = batch.logits[:, 1:]
    # Pair t drafts token t + 2: it counts where that token is a training target.
    w = jnp.pad(batch.mask[:, 2:], ((0, 0), (0, 1)))
    denom = jnp.maximum(w.sum(), 1.0)
    reg = jnp.sum(w * optax.losses.huber_loss(self.regressed(g), f[:, 1:]).mean(-1)) / denom
    ce = jnp.sum(w * batch.distill(target, logits)) / denom
    top1 = jnp.sum(w * (logits.argmax(-1) == target.argmax(-1))) / denom
    return reg + self.ce_weight * ce, {"reg": reg, "ce": ce, "top1/1": top1}

  def accept(self, params, batch: TargetBatch, depth: int):
    """Greedy chain acceptance of `depth` draft steps from every position (`unroll`)."""
    return runtime.chain_accept(self, params, batch, batch.features[0][:, :-1], depth)

  def drafter(self, params, shared, *, depth: int = 4, top_k: int = 1,
              tree: Sequence[Sequence[int]] | None = None,
              num_nodes: int | None = None) -> runtime.FeatureDrafter:
    """A drafter with these weights (knobs: `runtime.drafter`)."""
    return runtime.drafter(self, params, shared, depth=depth, top_k=top_k, tree=tree,
                           num_nodes=num_nodes)


@registry.HEADS.register("eagle")
def _head(target_cfg: ModelConfig, *, noise: float = 0.2, ce_weight: float = 0.1,
          init_identity: bool = False, feature_sampling: bool = False,
          partial_alignment: bool = False) -> EagleHead:
  """EAGLE-1: fc + one decoder layer on the target's final features (EAGLE-2 decodes it);
  FSPAD's feature sampling and partial alignment distillation as options."""
  return EagleHead(target_cfg, noise, ce_weight, init_identity=init_identity,
                   feature_sampling=feature_sampling, partial_alignment=partial_alignment)


@registry.DRAFTERS.register("eagle", takes_stop_policy=True)
def _drafter(target, *, checkpoint: str, budget: str | None = None, depth: int | None = None,
             top_k: int | None = None, tree: Sequence[Sequence[int]] | None = None,
             num_nodes: int | None = None) -> runtime.FeatureDrafter:
  """A trained EAGLE-1 head folder (any layout `io.load` reads) as a chain, a static tree
  or EAGLE-2's dynamic tree (`num_nodes`); unset knobs come from the head's folder, or
  `budget=COSTS_JSON` sizes the draft from measured costs."""
  return io.trained_drafter("eagle", target, checkpoint, budget, depth=depth, top_k=top_k,
                            tree=tree, num_nodes=num_nodes)


def from_eagle_llm(path: str, target_cfg: ModelConfig):
  """("eagle", EagleHead, params) from eagle-llm's layout (SafeAILab EAGLE-1/2: a Llama
  config.json for the draft layer + fc.* and layers.0.* weights; Linear weights are
  [out, in])."""
  hf = io.read_json(os.path.join(path, "config.json"))
  check_target(f"The head in {path!r}", hf["hidden_size"], hf["vocab_size"], target_cfg)
  if hf.get("num_hidden_layers", 1) != 1 or hf.get("rope_scaling"):
    raise ValueError(f"{path!r}: only one-layer EAGLE heads without RoPE scaling load.")
  # eagle-llm's draft layer always rotates with base 10000, whatever config.json says.
  layer = from_hf_config({**hf, "model_type": "llama"}).replace(rope_theta=10000.0)
  sd = io.state_dict(path, io.EAGLE_FILES)
  dense = lambda name: {"kernel": sd[f"{name}.weight"].T}
  params = {"fc": {**dense("fc"), "bias": sd.get("fc.bias", np.zeros(hf["hidden_size"]))},
            "self_attn": {p: dense(f"layers.0.self_attn.{p}")
                          for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {p: dense(f"layers.0.mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")},
            "post_attention_layernorm": {"scale": sd["layers.0.post_attention_layernorm.weight"]}}
  return "eagle", EagleHead(target_cfg, layer=layer), params
