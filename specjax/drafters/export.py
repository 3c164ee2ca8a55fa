"""Export a trained EAGLE-3 head to the `speculators` format vLLM serves (the
`specjax-export` command): train in JAX, serve in vLLM."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from specjax import assets
from specjax.drafters import io
from specjax.models import model as model_lib
from specjax.models.model import FINAL


def export_speculators(path: str, out: str, target: Any, verifier: str | None = None,
                       speculative_tokens: int = 3) -> None:
  """Writes the EAGLE-3 head at `path` (any layout), trained for `target` (a Model), in the
  `speculators` format vLLM serves: config.json + model.safetensors, which holds the
  target's token embedding as speculators itself saves it. `verifier` is the target's name
  or folder as the server knows it (speculators reads the target's norm and LM head from
  it)."""
  target_cfg = target.config
  kind, head, params, _ = io.load(path, target_cfg)
  if kind != "eagle3":
    raise ValueError(f"{path!r} holds a {kind} head; only EAGLE-3 heads export to speculators.")
  if FINAL in head.aux_layers:
    raise ValueError(f"{path!r} reads the final normed state, which speculators cannot feed.")
  layer = head.layer_config
  p = jax.tree.map(np.asarray, params)
  w = lambda d: np.ascontiguousarray(d["kernel"].T)
  sd = {"fc.weight": w(p["fc"]), "norm.weight": p["norm"]["scale"],
        "lm_head.weight": w(p["lm_head"]),
        "embed_tokens.weight": np.asarray(model_lib.embed(  # every row of the target's table
            target_cfg, target.params, np.arange(target_cfg.vocab_size)),
            p["fc"]["kernel"].dtype)}
  pre = "layers.0."
  for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
    sd[f"{pre}{name}.weight"] = p["layer"][name]["scale"]
  for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                       ("mlp", ("gate_proj", "up_proj", "down_proj"))):
    for n in names:
      sd[f"{pre}{group}.{n}.weight"] = w(p["layer"][group][n])
      if "bias" in p["layer"][group][n]:
        sd[f"{pre}{group}.{n}.bias"] = p["layer"][group][n]["bias"]
  if layer.qk_norm:
    for n in ("q_norm", "k_norm"):
      sd[f"{pre}self_attn.{n}.weight"] = p["layer"]["self_attn"][n]["scale"]
  if head.draft_vocab:
    ids = np.asarray(head.draft_ids, np.int64)
    sd["d2t"] = ids - np.arange(len(ids))
    t2d = np.zeros(target_cfg.vocab_size, bool)
    t2d[ids] = True
    sd["t2d"] = t2d
  layer_hf = {"model_type": layer.model_type or "llama", "vocab_size": layer.vocab_size,
              "hidden_size": layer.hidden_size, "intermediate_size": layer.intermediate_size,
              "num_hidden_layers": 1, "num_attention_heads": layer.num_heads,
              "num_key_value_heads": layer.num_kv_heads, "head_dim": layer.head_dim,
              "rms_norm_eps": layer.norm_eps, "hidden_act": "silu",
              "max_position_embeddings": layer.max_position_embeddings,
              "rope_parameters": {"rope_type": "default", "rope_theta": layer.rope_theta},
              "attention_bias": layer.attention_bias, "tie_word_embeddings": False}
  if layer.rope_scaling:
    raise ValueError(f"{path!r}: exporting a head with RoPE scaling is not supported.")
  config = {
      "speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"],
      "transformer_layer_config": layer_hf, "draft_vocab_size": head.vocab,
      "norm_before_residual": False, "norm_before_fc": False, "fc_norm": False,
      "norm_output": False, "embed_requires_grad": False, "target_hidden_size": None,
      "eagle_aux_hidden_state_layer_ids": list(head.aux_layers), "tie_word_embeddings": False,
      "speculators_config": {
          "algorithm": "eagle3", "default_proposal_method": "greedy",
          "proposal_methods": [{"proposal_type": "greedy",
                                "speculative_tokens": speculative_tokens}],
          "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]}}}
  os.makedirs(out, exist_ok=True)
  assets.save_arrays(os.path.join(out, "model.safetensors"), sd, metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=1)


def main(argv=None) -> None:
  """specjax-export --to-speculators HEAD OUT [--target T] [--verifier V]"""
  import argparse  # pylint: disable=g-import-not-at-top

  from specjax import models  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="specjax-export",
                              description="Convert a trained EAGLE-3 head to the speculators "
                              "format vLLM serves.")
  p.add_argument("--to-speculators", nargs=2, metavar=("HEAD", "OUT"), required=True)
  p.add_argument("--target", default=models.DEFAULT,
                 help="the target the head was trained for (a preset or a folder)")
  p.add_argument("--verifier", default=None,
                 help="the target's name or folder as the server knows it (e.g. a hub id)")
  args = p.parse_args(argv)
  head, out = args.to_speculators
  try:
    io.layout(head)  # a missing or foreign folder fails before the target loads
    export_speculators(head, out, models.load(args.target), verifier=args.verifier)
  except (FileNotFoundError, ValueError) as e:
    p.error(str(e))
  print(f"wrote {out}: config.json + model.safetensors (speculators EAGLE-3)")
