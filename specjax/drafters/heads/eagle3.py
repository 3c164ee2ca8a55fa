"""EAGLE-3: multi-layer feature fusion, a reduced draft vocabulary, training-time test.

Pair t of a sequence is (u_t, x_{t+1}) with u_t the fusion of the target's hidden states
at position t from A depths (the inputs of layers 2, L//2 and L-3 by default):

  u_t = fc(concat(f^a_t, f^b_t, f^c_t))                 A*H -> H, no bias
  a_t = attention(concat(norm1(embed(x_{t+1})), norm2(u_t)))   2H -> heads, RoPE at t
  g_t = u_t + a_t;  g_t = g_t + mlp(norm3(g_t))         one Llama layer, residual on u_t
  p(x_{t+2}) = softmax(lm_head(norm(g_t)))              own LM head, draft vocabulary

The next draft step feeds g_t back in place of u (the head never regresses a target
feature: EAGLE-3 drops EAGLE-1's feature loss). The LM head covers the `draft_vocab` most
frequent response tokens of the training data (`fit`); `draft_ids[d]` is the target id of
draft id d, and draft logits map back to the target vocabulary with every other token at
the lowest float, so the drafter never proposes a token outside the map and verification
stays lossless (it only ever sees a draft distribution with zero mass there).

Training-time test (`loss`): unroll `ttt_steps` draft steps from every position at once
(`runtime.unroll`), each step feeding back the head's own g, and sum 0.8^(j-1) x soft
cross-entropy of step j against the target's distribution over the draft vocabulary.
Decoding uses the drafter every feature-level head shares (`runtime.FeatureDrafter`): a
chain, a static tree or EAGLE-2's dynamic tree. Parameter names follow the `speculators`
layout: `from_speculators` and `from_specforge` read those heads, `drafters.export`
writes ours.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import registry
from specjax.drafters import io
from specjax.drafters.base import TargetBatch, TrainableHead, check_target
from specjax.drafters.heads import runtime
from specjax.models import llama
from specjax.models.config import ModelConfig, from_hf_config
from specjax.models.model import FINAL, causal, check_features, embed, lm_head_rows, param_dtype


class Eagle3Layer(nn.Module):
  """The decoder layer whose attention reads concat(norm(embedding), norm(feature))."""

  cfg: ModelConfig
  dtype: jnp.dtype = jnp.float32
  norm_before_residual: bool = False  # the residual is the normed feature (speculators)

  @nn.compact
  def __call__(self, emb_BxTxH, feat_BxTxH, positions_BxT, visible_BxTxT, kv=None, start_B=None,
               prefix_BxTxS=None):
    cfg, dt = self.cfg, self.dtype
    normed = llama.RMSNorm(cfg.norm_eps, dt, name="hidden_norm")(feat_BxTxH)
    x = jnp.concatenate([llama.RMSNorm(cfg.norm_eps, dt, name="input_layernorm")(emb_BxTxH),
                         normed], -1)
    cos, sin = llama.rope_cos_sin(cfg, positions_BxT, dt)
    a, kv = llama.Attention(cfg, dt, name="self_attn")(x, cos, sin, visible_BxTxT, prefix_BxTxS,
                                                      kv, start_B)
    g = (normed if self.norm_before_residual else feat_BxTxH) + a
    g = g + llama.MLP(cfg, dt, name="mlp")(
        llama.RMSNorm(cfg.norm_eps, dt, name="post_attention_layernorm")(g))
    return g, kv


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
  """EAGLE-3's depths: the inputs of layers 2, L//2 and L-3."""
  return (2, num_layers // 2, num_layers - 3)


@flax.struct.dataclass
class Eagle3Head(TrainableHead):
  """EAGLE-3 as a trainable head (`base.TrainableHead`, `runtime.FeatureHead`)."""

  config: ModelConfig = flax.struct.field(pytree_node=False)  # the target's
  aux_layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  draft_vocab: int = flax.struct.field(pytree_node=False, default=0)  # 0: the full vocabulary
  ttt_steps: int = flax.struct.field(pytree_node=False, default=7)
  decay: float = flax.struct.field(pytree_node=False, default=0.8)
  noise: float = flax.struct.field(pytree_node=False, default=0.0)
  layer: ModelConfig | None = flax.struct.field(pytree_node=False, default=None)
  # int32[draft_vocab]: the target id of each draft id, ascending (set by `fit` or loading).
  draft_ids: Any = None
  # speculators' variants (its training defaults set norm_before_fc and norm_output): an
  # RMSNorm over the concatenated features before fc, or one per feature (fc_norm); the
  # normed feature as the layer's residual; the normed output fed back between steps.
  norm_before_fc: bool = flax.struct.field(pytree_node=False, default=False)
  fc_norm: bool = flax.struct.field(pytree_node=False, default=False)
  norm_before_residual: bool = flax.struct.field(pytree_node=False, default=False)
  norm_output: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def features(self) -> tuple[int, ...]:
    return self.aux_layers

  @property
  def layer_config(self) -> ModelConfig:
    return self.layer or self.config

  @property
  def vocab(self) -> int:
    """Rows of the head's own LM head."""
    return self.draft_vocab or self.config.vocab_size

  def init(self, key, dtype=jnp.float32):
    h = self.config.hidden_size
    k_layer, k_fc, k_lm = jax.random.split(key, 3)
    z = jnp.zeros((1, 1, h), dtype)
    layer = self._layer(dtype).init(k_layer, z, z, jnp.zeros((1, 1), jnp.int32),
                                    causal(1))["params"]
    a = len(self.aux_layers)
    fc = nn.initializers.lecun_normal()(k_fc, (a * h, h), dtype)
    lm = 0.02 * jax.random.normal(k_lm, (h, self.vocab), dtype)
    params = {"fc": {"kernel": fc}, "layer": layer, "norm": {"scale": jnp.ones((h,), dtype)},
              "lm_head": {"kernel": lm}}
    if self.norm_before_fc:
      params["input_norm"] = {"scale": jnp.ones((a * h,), dtype)}
    if self.fc_norm:
      params["fc_norm"] = {str(i): {"scale": jnp.ones((h,), dtype)} for i in range(a)}
    return params

  def _layer(self, dtype) -> Eagle3Layer:
    return Eagle3Layer(self.layer_config, dtype, self.norm_before_residual)

  def _rms(self, p, x):
    return llama.RMSNorm(self.layer_config.norm_eps, param_dtype(p)).apply({"params": p}, x)

  def fit(self, params, tokens, mask, shared):
    """(head, params) ready to train on this data: the draft vocabulary is its
    `draft_vocab` most frequent response tokens (ties to the lower id, topped up with the
    lowest unused ids), and the LM head starts as the target's rows for them."""
    v = self.config.vocab_size
    if self.draft_vocab and self.draft_vocab < v:
      counts = np.bincount(np.asarray(tokens)[np.asarray(mask) > 0], minlength=v)[:v]
      ids = np.sort(np.lexsort((np.arange(v), -counts))[:self.draft_vocab]).astype(np.int32)
      head = self.replace(draft_ids=jnp.asarray(ids))
    else:
      ids, head = np.arange(v, dtype=np.int32), self.replace(draft_ids=None)
    rows = lm_head_rows(self.config, shared, jnp.asarray(ids))
    params = {**params, "lm_head": {"kernel": rows.T.astype(param_dtype(params))}}
    return head, params

  def buffers(self) -> dict[str, np.ndarray]:
    """The arrays saved beside the params (`io.save`): the vocabulary map."""
    return {} if self.draft_ids is None else {"draft_ids": np.asarray(self.draft_ids)}

  def with_buffers(self, buffers: dict[str, np.ndarray], path: str) -> "Eagle3Head":
    """This head with its draft-to-target id map, checked against its shapes."""
    ids = buffers.get("draft_ids")
    if not self.draft_vocab and ids is None:
      return self
    where = os.path.join(path, io.BUFFERS)
    if ids is None:
      raise ValueError(f"{path!r} holds an EAGLE-3 head with a {self.draft_vocab}-token draft "
                       f"vocabulary but no draft-to-target map ({where} is missing or "
                       "lacks draft_ids).")
    if ids.shape != (self.draft_vocab,) or ids.min() < 0 or ids.max() >= self.config.vocab_size:
      raise ValueError(f"{where} does not hold a draft-to-target map of {self.draft_vocab} "
                       f"target ids for this head (got shape {ids.shape}).")
    return self.replace(draft_ids=jnp.asarray(ids, jnp.int32))

  def validate(self, target_config: ModelConfig) -> None:
    check_target("This EAGLE-3 head", self.config.hidden_size, self.config.vocab_size,
                 target_config)
    check_features(target_config, self.aux_layers)

  def fuse(self, params, features):
    """u = fc(concat of the target's features at the head's depths), each feature or their
    concatenation normed first in speculators' variants."""
    dt = params["fc"]["kernel"].dtype
    features = [f.astype(dt) for f in features]
    if self.fc_norm:
      features = [self._rms(params["fc_norm"][str(i)], f) for i, f in enumerate(features)]
    f = jnp.concatenate(features, -1)
    if self.norm_before_fc:
      f = self._rms(params["input_norm"], f)
    return f @ params["fc"]["kernel"]

  def net(self, params, shared, feat_BxTxH, next_BxT, positions_BxT, visible_BxTxT, cache=None,
          prefix_BxTxS=None):
    g, cache = runtime.run_layer(self._layer(param_dtype(params)), params["layer"],
                                 (embed(self.config, shared, next_BxT), feat_BxTxH),
                                 positions_BxT, visible_BxTxT, cache, prefix_BxTxS)
    return (self._rms(params["norm"], g) if self.norm_output else g), cache

  def draft_logits(self, params, g_BxTxH):
    """float32[..., vocab]: logits over the draft vocabulary."""
    if self.draft_vocab and self.draft_ids is None:
      raise ValueError("This EAGLE-3 head has a reduced vocabulary but no map: `fit` it to "
                       "data or load it from a head folder.")
    x = g_BxTxH if self.norm_output else self._rms(params["norm"], g_BxTxH)
    return (x @ params["lm_head"]["kernel"]).astype(jnp.float32)

  def logits(self, params, shared, g_BxTxH):
    """float32[..., V]: draft logits in target ids, the lowest float outside the map."""
    d = self.draft_logits(params, g_BxTxH)
    if self.draft_ids is None:
      return d
    full = jnp.full(d.shape[:-1] + (self.config.vocab_size,), jnp.finfo(jnp.float32).min)
    return full.at[..., self.draft_ids].set(d)

  def _inputs(self, params, batch: TargetBatch, key=None):
    u = self.fuse(params, batch.features)[:, :-1]
    if key is not None and self.noise:
      u = u + self.noise * jax.random.uniform(key, u.shape, u.dtype, -0.5, 0.5)
    return u

  def loss(self, params, batch: TargetBatch, key):
    b, t = batch.tokens.shape
    rows = jnp.arange(t - 1)
    target = batch.logits if self.draft_ids is None else batch.logits[..., self.draft_ids]
    target_top = batch.logits.argmax(-1)
    ids = jnp.arange(self.vocab) if self.draft_ids is None else self.draft_ids
    gs = runtime.unroll(self, params, batch.shared, self._inputs(params, batch, key), batch.tokens,
                      self.ttt_steps)
    total, metrics = 0.0, {}
    for j, g in enumerate(gs, 1):  # step j from pair t drafts token t + j + 1
      src = jnp.minimum(rows + j, t - 1)
      w = jnp.where(rows + j + 1 < t, jnp.take(batch.mask, jnp.minimum(rows + j + 1, t - 1), 1),
                    0.0)
      denom = jnp.maximum(w.sum(), 1.0)
      logits = self.draft_logits(params, g)
      ce = jnp.sum(w * batch.distill(target[:, src], logits)) / denom
      total = total + self.decay ** (j - 1) * ce
      metrics[f"ce/{j}"] = ce
      metrics[f"top1/{j}"] = jnp.sum(w * (ids[logits.argmax(-1)] == target_top[:, src])) / denom
    return total, metrics

  def accept(self, params, batch: TargetBatch, depth: int):
    return runtime.chain_accept(self, params, batch, self._inputs(params, batch), depth)

  def drafter(self, params, shared, *, depth: int = 4, top_k: int = 1,
              tree: Sequence[Sequence[int]] | None = None,
              num_nodes: int | None = None) -> runtime.FeatureDrafter:
    """An EAGLE drafter with these weights (knobs: `runtime.drafter`)."""
    return runtime.drafter(self, params, shared, depth=depth, top_k=top_k, tree=tree,
                           num_nodes=num_nodes)


@registry.HEADS.register("eagle3")
def _head(target_cfg: ModelConfig, *, aux_layers: Sequence[int] | None = None,
          draft_vocab: int = 0, ttt_steps: int = 7, decay: float = 0.8,
          noise: float = 0.0, norm_before_fc: bool = False, fc_norm: bool = False,
          norm_before_residual: bool = False, norm_output: bool = False) -> Eagle3Head:
  """EAGLE-3: fused features from `aux_layers` (layer inputs; models.FINAL = the final
  normed state; default 2, L//2, L-3), a `draft_vocab`-token LM head (0 = the full
  vocabulary), `ttt_steps` unrolled draft steps weighted decay^j in training; speculators'
  norm variants as flags."""
  if norm_before_fc and fc_norm:
    raise ValueError("norm_before_fc and fc_norm exclude each other: give one.")
  aux = tuple(int(a) for a in (aux_layers if aux_layers is not None
                               else default_aux_layers(target_cfg.num_layers)))
  if not aux or len(set(aux)) != len(aux) or any(
      not (a == FINAL or 0 <= a < target_cfg.num_layers) for a in aux):
    raise ValueError(f"EAGLE-3 aux_layers {list(aux)} must be distinct layer inputs in "
                     f"[0, {target_cfg.num_layers}) (or {FINAL}, the final state) of this "
                     f"{target_cfg.num_layers}-layer target; give aux_layers explicitly.")
  if not 0 <= draft_vocab <= target_cfg.vocab_size:
    raise ValueError(f"draft_vocab={draft_vocab} must be in [0, {target_cfg.vocab_size}] "
                     "(0 = the target's full vocabulary).")
  if ttt_steps < 1:
    raise ValueError(f"ttt_steps={ttt_steps} must be >= 1.")
  return Eagle3Head(target_cfg, aux, 0 if draft_vocab == target_cfg.vocab_size else draft_vocab,
                    ttt_steps, decay, noise, norm_before_fc=norm_before_fc, fc_norm=fc_norm,
                    norm_before_residual=norm_before_residual, norm_output=norm_output)


@registry.DRAFTERS.register("eagle3", takes_stop_policy=True)
def _drafter(target, *, checkpoint: str, budget: str | None = None, depth: int | None = None,
             top_k: int | None = None, tree: Sequence[Sequence[int]] | None = None,
             num_nodes: int | None = None) -> runtime.FeatureDrafter:
  """A trained EAGLE-3 head folder (specjax, speculators or SpecForge layout) as a chain, a
  static tree or EAGLE-2's dynamic tree (`num_nodes`); unset knobs come from the head's
  folder, or `budget=COSTS_JSON` sizes the draft from measured costs."""
  return io.trained_drafter("eagle3", target, checkpoint, budget, depth=depth, top_k=top_k,
                            tree=tree, num_nodes=num_nodes)


def _from_state_dict(path: str, target_cfg: ModelConfig, sd: dict, layer_hf: dict,
                     prefix: str, aux, **variants) -> tuple[str, Eagle3Head, Any]:
  """("eagle3", head, params) from a PyTorch EAGLE-3 state dict (speculators' names; the
  decoder layer under `prefix`; Linear weights are [out, in]; d2t holds target id - draft
  id)."""
  layer = from_hf_config(layer_hf)
  check_target(f"The head in {path!r}", layer.hidden_size, layer.vocab_size, target_cfg)
  if layer_hf.get("num_hidden_layers", 1) != 1:
    raise ValueError(f"{path!r}: only one-layer EAGLE-3 heads load.")
  aux = tuple(aux) if aux else default_aux_layers(target_cfg.num_layers)
  if any(not 0 <= a < target_cfg.num_layers for a in aux):
    raise ValueError(f"{path!r} reads target layers {list(aux)}; this {target_cfg.num_layers}"
                     "-layer target has layer inputs 0.."
                     f"{target_cfg.num_layers - 1} (the final hidden state is not supported).")
  try:
    dense = lambda n: {"kernel": sd[f"{n}.weight"].T, **(
        {"bias": sd[f"{n}.bias"]} if f"{n}.bias" in sd else {})}
    norm = lambda n: {"scale": sd[f"{n}.weight"]}
    attn = {p: dense(f"{prefix}self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if layer.qk_norm:
      attn.update(q_norm=norm(f"{prefix}self_attn.q_norm"),
                  k_norm=norm(f"{prefix}self_attn.k_norm"))
    params = {"fc": dense("fc"), "norm": norm("norm"), "lm_head": dense("lm_head"), "layer": {
        "input_layernorm": norm(f"{prefix}input_layernorm"),
        "hidden_norm": norm(f"{prefix}hidden_norm"), "self_attn": attn,
        "mlp": {p: dense(f"{prefix}mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")},
        "post_attention_layernorm": norm(f"{prefix}post_attention_layernorm")}}
    if variants.get("norm_before_fc"):
      params["input_norm"] = norm("input_norm")
    if variants.get("fc_norm"):
      params["fc_norm"] = {str(i): norm(f"fc_norm.{i}") for i in range(len(aux))}
  except KeyError as e:
    raise ValueError(f"{path!r} is missing EAGLE-3 weight {e}.") from None
  vocab = params["lm_head"]["kernel"].shape[1]
  head = Eagle3Head(target_cfg, aux, 0 if vocab == target_cfg.vocab_size else vocab,
                    layer=layer, **variants)
  if head.draft_vocab:
    if "d2t" not in sd:
      raise ValueError(f"{path!r}: a {vocab}-token draft vocabulary needs the d2t map.")
    head = head.with_buffers({"draft_ids": np.arange(vocab) + sd["d2t"].astype(np.int64)},
                             path)
  return "eagle3", head, params


def from_speculators(path: str, target_cfg: ModelConfig):
  """An EAGLE-3 head in the `speculators` format (what vLLM serves)."""
  hf = io.read_json(os.path.join(path, "config.json"))
  variants = {k: bool(hf.get(k)) for k in VARIANTS}
  if variants["norm_before_fc"] and variants["fc_norm"]:
    raise ValueError(f"{path!r} sets both norm_before_fc and fc_norm, which exclude each other.")
  return _from_state_dict(path, target_cfg, io.state_dict(path, ("model.safetensors",)),
                          hf["transformer_layer_config"], "layers.0.",
                          hf.get("eagle_aux_hidden_state_layer_ids"), **variants)


VARIANTS = ("norm_before_fc", "fc_norm", "norm_before_residual", "norm_output")


def from_specforge(path: str, target_cfg: ModelConfig):
  """An EAGLE-3 head as SafeAILab's EAGLE-3 and SGLang's SpecForge save it: a Llama
  config.json with draft_vocab_size, the decoder layer as midlayer.*, d2t/t2d maps."""
  hf = io.read_json(os.path.join(path, "config.json"))
  sd = io.state_dict(path, io.EAGLE_FILES)
  prefix = "midlayer." if any(k.startswith("midlayer.") for k in sd) else "layers.0."
  aux = (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
  return _from_state_dict(path, target_cfg, sd,
                          {"model_type": "llama", **hf, "num_hidden_layers": 1}, prefix, aux)
