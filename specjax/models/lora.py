"""LoRA adapters on a target's projections: W' = W + (alpha / r) A B, B zero-initialised.

Medusa-2 fine-tunes the target jointly with its heads through these; decoding then uses
the merged target (`merge`), and speculative decoding is lossless relative to *that*
model, not the original (the merged model's name says so).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from specjax.models.config import ModelConfig

PROJECTIONS = ("q_proj", "v_proj")


def init(cfg: ModelConfig, key, rank: int, dtype=jnp.float32,
         projections=PROJECTIONS) -> dict[str, Any]:
  """{layers_i: {self_attn: {proj: {a [in, r], b [r, out]}}}} for every layer."""
  out_dims = {"q_proj": cfg.num_heads * cfg.head_dim, "k_proj": cfg.num_kv_heads * cfg.head_dim,
              "v_proj": cfg.num_kv_heads * cfg.head_dim, "o_proj": cfg.hidden_size}
  keys = iter(jax.random.split(key, cfg.num_layers * len(projections)))
  in_dim = lambda p: cfg.num_heads * cfg.head_dim if p == "o_proj" else cfg.hidden_size
  return {f"layers_{i}": {"self_attn": {
      p: {"a": jax.random.normal(next(keys), (in_dim(p), rank), dtype) / rank ** 0.5,
          "b": jnp.zeros((rank, out_dims[p]), dtype)} for p in projections}}
      for i in range(cfg.num_layers)}


def merge(params: Any, lora: dict[str, Any], alpha: float) -> Any:
  """The target's params with every adapter folded into its kernel."""
  from specjax.models import quant  # pylint: disable=g-import-not-at-top
  if quant.is_quantized(params):
    raise ValueError("Medusa-2's LoRA merges into float kernels; this target is quantized. "
                     "Merge into the float model, then quantize the merged one.")
  out = dict(params)
  for layer, sub in lora.items():
    attn = dict(out[layer]["self_attn"])
    for proj, ab in sub["self_attn"].items():
      rank = ab["a"].shape[1]
      kernel = attn[proj]["kernel"]
      attn[proj] = {**attn[proj], "kernel": kernel + (alpha / rank) * (ab["a"] @ ab["b"]).astype(
          kernel.dtype)}
    out[layer] = {**out[layer], "self_attn": attn}
  return out
