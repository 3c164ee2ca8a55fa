"""ModelConfig: the static (hashable) description of a target or draft LM.

One config covers the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3), which
differ only by flags (qkv bias, q/k norm, RoPE scaling, sliding window, tied embeddings),
its mixture-of-experts members (Mixtral, Qwen3-MoE: `num_experts` > 0 swaps the MLP of
the `moe_layers` for routed experts), GPT-2, and the state-space family ("hybrid":
Mamba-2, and Bamba's attention + Mamba-2 layers: the `ssm_layers` run a Mamba-2 mixer in
place of attention, `specjax.models.ssm`). It is hashable so that jitted functions
can take it as a static argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ARCHS = ("llama", "gpt2", "hybrid")
# Hugging Face `model_type` -> our architecture family.
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "mixtral": "llama",
    "qwen3_moe": "llama",
    "gpt2": "gpt2",
    "mamba2": "hybrid",
    "bamba": "hybrid",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a decoder-only LM; every field is static."""

  arch: str  # "llama" or "gpt2"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos) or
  # ("linear", factor) or None.
  rope_scaling: tuple | None = None
  tie_embeddings: bool = False
  attention_bias: bool = False  # q/k/v projection bias (Qwen2).
  qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3).
  sliding_window: int | None = None  # Mistral; None = full attention.
  max_position_embeddings: int = 4096
  model_type: str = "llama"  # the Hugging Face name, for messages and export.
  # How the forward attends over a cache: "xla" (dense masks) or a Pallas tree-attention
  # kernel ("pallas", "pallas_tpu", "pallas_gpu"; `specjax.kernels.attention`).
  attention_impl: str = "xla"
  # Mixture of experts (0 experts: dense). Each token's `experts_per_token` experts of the
  # softmax router's top scores (renormalised over them when `moe_norm_topk`) run an MLP of
  # `moe_intermediate_size`; the layers in `moe_layers` are MoE, the others dense.
  num_experts: int = 0
  experts_per_token: int = 0
  moe_intermediate_size: int = 0
  moe_norm_topk: bool = True
  moe_layers: tuple[int, ...] = ()
  # State-space layers (arch "hybrid"): the `ssm_layers` run a Mamba-2 mixer (`models.ssm`)
  # of `ssm_heads` heads of `ssm_head_dim` channels, `ssm_groups` groups of B/C of
  # `ssm_state` channels, a causal conv of `ssm_conv` taps; the others attention.
  # intermediate_size 0: no MLP after the mixer (Mamba-2). `rotary_dim` < head_dim: RoPE
  # on the first rotary_dim channels of each head only (Bamba), None: all of them.
  ssm_layers: tuple[int, ...] = ()
  ssm_heads: int = 0
  ssm_head_dim: int = 0
  ssm_groups: int = 1
  ssm_state: int = 0
  ssm_conv: int = 4
  ssm_dt_limit: tuple[float, float] = (0.0, float("inf"))
  ssm_conv_bias: bool = True
  ssm_proj_bias: bool = False
  rotary_dim: int | None = None

  @property
  def ssm_inner(self) -> int:
    """Channels of a Mamba-2 mixer's x (and of its gate z): heads x head_dim."""
    return self.ssm_heads * self.ssm_head_dim

  @property
  def ssm_conv_dim(self) -> int:
    """Channels the mixer's causal conv runs over: x, B and C."""
    return self.ssm_inner + 2 * self.ssm_groups * self.ssm_state

  @property
  def state_layers(self) -> tuple[int, ...]:
    """The state-space layers among the first num_layers (a truncated model's)."""
    return tuple(i for i in self.ssm_layers if i < self.num_layers)

  @property
  def attention_layers(self) -> tuple[int, ...]:
    """The layers with a KV cache: all but the state-space ones."""
    return tuple(i for i in range(self.num_layers) if i not in self.ssm_layers)

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"Unsupported architecture {self.arch!r}; supported: {ARCHS}.")
    from specjax.kernels import check_impl  # pylint: disable=g-import-not-at-top
    check_impl(self.attention_impl)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.")
    if self.num_experts and not (1 <= self.experts_per_token <= self.num_experts
                                 and self.moe_intermediate_size > 0):
      raise ValueError(f"A mixture of {self.num_experts} experts needs 1 <= experts_per_token "
                       f"<= num_experts and moe_intermediate_size > 0; got "
                       f"{self.experts_per_token}, {self.moe_intermediate_size}.")
    if self.ssm_layers and self.arch != "hybrid":
      raise ValueError(f"State-space layers need arch 'hybrid'; got {self.arch!r}.")
    if self.ssm_layers and not (self.ssm_heads > 0 and self.ssm_head_dim > 0
                                and self.ssm_state > 0 and self.ssm_conv >= 2
                                and self.ssm_groups > 0 and self.ssm_heads % self.ssm_groups == 0):
      raise ValueError(f"A Mamba-2 mixer needs heads, head_dim, state > 0, conv >= 2 and "
                       f"heads a multiple of groups; got heads={self.ssm_heads}, head_dim="
                       f"{self.ssm_head_dim}, state={self.ssm_state}, conv={self.ssm_conv}, "
                       f"groups={self.ssm_groups}.")

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def _rope_params(hf: Mapping[str, Any]) -> dict:
  """RoPE settings from either transformers<5 (`rope_theta`, `rope_scaling`) or >=5
  (`rope_parameters`) config files."""
  rp = dict(hf.get("rope_parameters") or {})
  rs = dict(hf.get("rope_scaling") or {})
  return {**rs, **rp, "rope_theta": rp.get("rope_theta", hf.get("rope_theta", 10000.0))}


def _rope_scaling(hf: Mapping[str, Any]) -> tuple | None:
  rs = _rope_params(hf)
  if rs is None:
    return None
  kind = rs.get("rope_type", rs.get("type"))
  if kind in (None, "default"):
    return None
  if kind == "llama3":
    return ("llama3", float(rs["factor"]), float(rs["low_freq_factor"]),
            float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))
  if kind == "linear":
    return ("linear", float(rs["factor"]))
  raise ValueError(f"Unsupported rope_scaling type {kind!r}; supported: llama3, linear.")


def _sliding_window(model_type: str, hf: Mapping[str, Any]) -> int | None:
  """The window every layer slides over, or None (full attention). Mistral slides on every
  layer; other configs through `layer_types` (Qwen2/3: with use_sliding_window, layers
  >= max_window_layers in transformers < 5); a window on some layers only is refused."""
  window = hf.get("sliding_window")
  qwen = ("qwen2", "qwen3", "qwen3_moe")
  if model_type in ("mistral", "mixtral"):
    return window if hf.get("use_sliding_window", True) else None
  if not window or (model_type in qwen and not hf.get("use_sliding_window")):
    return None
  types = hf.get("layer_types") or (
      ["sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
       for i in range(hf["num_hidden_layers"])] if model_type in qwen else [])
  if "sliding_attention" not in types:
    return None
  if any(t != "sliding_attention" for t in types):
    raise ValueError(f"Unsupported: {model_type} with a sliding window on some layers only "
                     f"(use_sliding_window / layer_types {list(types)}).")
  return int(window)


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
  """Builds a ModelConfig from a Hugging Face config.json dict."""
  model_type = hf.get("model_type")
  if model_type not in HF_MODEL_TYPES:
    raise ValueError(
        f"Unsupported architecture model_type={model_type!r}; supported: "
        f"{sorted(HF_MODEL_TYPES)}.")
  if HF_MODEL_TYPES[model_type] == "gpt2":
    h = hf["n_embd"]
    return ModelConfig(
        arch="gpt2", vocab_size=hf["vocab_size"], hidden_size=h,
        intermediate_size=hf.get("n_inner") or 4 * h, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], num_kv_heads=hf["n_head"], head_dim=h // hf["n_head"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=True,
        max_position_embeddings=hf["n_positions"], model_type=model_type)
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"Unsupported hidden_act {hf['hidden_act']!r} (only silu).")
  if HF_MODEL_TYPES[model_type] == "hybrid":
    return _hybrid(model_type, hf)
  if model_type in ("llama", "mistral") and hf.get("attention_bias"):
    raise ValueError("Unsupported: Llama attention_bias=True (o_proj bias).")
  window = _sliding_window(model_type, hf)
  heads = hf["num_attention_heads"]
  moe = _moe(model_type, hf)
  return ModelConfig(
      arch="llama", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(_rope_params(hf)["rope_theta"]),
      rope_scaling=_rope_scaling(hf), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias")),
      qk_norm=model_type in ("qwen3", "qwen3_moe"), sliding_window=window,
      max_position_embeddings=hf.get("max_position_embeddings", 4096), model_type=model_type,
      **moe)


def _moe(model_type: str, hf: Mapping[str, Any]) -> dict:
  """The mixture-of-experts fields of a Mixtral or Qwen3-MoE config ({} for dense ones).
  Mixtral: every layer, experts of `intermediate_size`, weights renormalised over the
  top k. Qwen3-MoE: layers (i + 1) % decoder_sparse_step == 0 not in mlp_only_layers,
  experts of `moe_intermediate_size`, renormalised when norm_topk_prob."""
  if model_type not in ("mixtral", "qwen3_moe"):
    return {}
  layers = hf["num_hidden_layers"]
  experts = hf.get("num_experts") or hf.get("num_local_experts")
  if model_type == "mixtral":
    return dict(num_experts=experts, experts_per_token=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["intermediate_size"], moe_norm_topk=True,
                moe_layers=tuple(range(layers)))
  step, dense = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
  return dict(num_experts=experts, experts_per_token=hf["num_experts_per_tok"],
              moe_intermediate_size=hf["moe_intermediate_size"],
              moe_norm_topk=bool(hf.get("norm_topk_prob", False)),
              moe_layers=tuple(i for i in range(layers)
                               if i not in dense and (i + 1) % step == 0))


def _number(x) -> float:
  """A float from config.json, where transformers writes infinity as {"__float__": ...}."""
  return float(x["__float__"] if isinstance(x, Mapping) else x)


def _hybrid(model_type: str, hf: Mapping[str, Any]) -> ModelConfig:
  """Mamba-2 (every layer a mixer, no MLP, no positions) or Bamba (attention at
  `attn_layer_indices`, Mamba-2 mixers elsewhere, an MLP after each; RoPE on a
  `partial_rotary_factor` of each head)."""
  layers = hf["num_hidden_layers"]
  limit = tuple(_number(x) for x in hf.get("time_step_limit") or (0.0, float("inf")))
  if model_type == "mamba2":
    hidden = hf["hidden_size"]
    if hf["num_heads"] * hf["head_dim"] != int(hf["expand"] * hidden):
      raise ValueError(f"mamba2: num_heads * head_dim = {hf['num_heads'] * hf['head_dim']} "
                       f"must equal expand * hidden_size = {int(hf['expand'] * hidden)}.")
    return ModelConfig(
        arch="hybrid", vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=0,
        num_layers=layers, num_heads=1, num_kv_heads=1, head_dim=hidden,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=1 << 30, model_type=model_type,
        ssm_layers=tuple(range(layers)), ssm_heads=hf["num_heads"],
        ssm_head_dim=hf["head_dim"], ssm_groups=hf.get("n_groups", 1),
        ssm_state=hf["state_size"], ssm_conv=hf.get("conv_kernel", 4), ssm_dt_limit=limit,
        ssm_conv_bias=bool(hf.get("use_conv_bias", True)),
        ssm_proj_bias=bool(hf.get("use_bias", False)))
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ValueError("Unsupported: bamba with attention_bias or mlp_bias.")
  heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
  head_dim = hf.get("head_dim") or hidden // heads
  rope = _rope_params(hf)
  rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
  attn = set(hf.get("attn_layer_indices") or ())
  inner = int(hf.get("mamba_expand", 2) * hidden)
  ssm_heads = hf["mamba_n_heads"]
  d_head = hf.get("mamba_d_head")
  d_head = inner // ssm_heads if d_head in (None, "auto") else d_head
  if ssm_heads * d_head != inner:
    raise ValueError(f"bamba: mamba_n_heads * mamba_d_head = {ssm_heads * d_head} must equal "
                     f"mamba_expand * hidden_size = {inner}.")
  return ModelConfig(
      arch="hybrid", vocab_size=hf["vocab_size"], hidden_size=hidden,
      intermediate_size=hf["intermediate_size"], num_layers=layers, num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
      norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(rope["rope_theta"]),
      rope_scaling=_rope_scaling(hf), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 4096), model_type=model_type,
      ssm_layers=tuple(i for i in range(layers) if i not in attn), ssm_heads=ssm_heads,
      ssm_head_dim=d_head, ssm_groups=hf.get("mamba_n_groups", 1),
      ssm_state=hf["mamba_d_state"], ssm_conv=hf.get("mamba_d_conv", 4), ssm_dt_limit=limit,
      ssm_conv_bias=bool(hf.get("mamba_conv_bias", True)),
      ssm_proj_bias=bool(hf.get("mamba_proj_bias", False)),
      rotary_dim=None if rotary == head_dim else rotary)
