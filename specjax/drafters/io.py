"""Trained heads on disk: `save` writes specjax's layout; `load` reads any head folder and
detects its layout, the way `specjax.models.load` does for targets:

  specjax      head.json + params.safetensors [+ buffers.safetensors] (below)
  speculators  config.json with speculators_model_type "eagle3" + model.safetensors
               (vLLM's EAGLE-3 serving format; `export_speculators` writes it)
  specforge    config.json with draft_vocab_size + model.safetensors or pytorch_model.bin
               with midlayer.* (SafeAILab EAGLE-3 / SGLang SpecForge EAGLE-3 heads)
  eagle-llm    config.json (the draft layer's Llama config) + pytorch_model.bin or
               model.safetensors with fc.* and layers.0.* (SafeAILab's EAGLE-1/2 heads)
  medusa-llm   config.json with medusa_num_heads + medusa_lm_head.pt or .safetensors
               ("{k}.0.linear.*" residual blocks, "{k}.1.weight" per-head LM heads)

specjax's layout is a folder with

  head.json            {"format": "specjax-head", "kind", "head_kwargs", "decode",
                        "target": {arch, hidden_size, vocab_size, num_layers, name},
                        "sim_accept": held-out P(first k drafts accepted), ...}
  params.safetensors   the head's params, keys = "/"-joined pytree paths
  buffers.safetensors  arrays the head derives from its data and does not train (EAGLE-3's
                       draft-to-target id map); absent when it has none

The target's shared weights (embedding, LM head) are never stored: the head reads them
from the target it is loaded for, after checking that target has the same hidden size and
vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from specjax import assets, registry
from specjax.drafters import budget as budget_lib
from specjax.drafters.base import check_target
from specjax.models.config import ModelConfig
from specjax.models import model as model_lib
from specjax.models.model import FINAL

FORMAT = "specjax-head"
META, PARAMS, BUFFERS = "head.json", "params.safetensors", "buffers.safetensors"


def save(path: str, kind: str, head_kwargs: dict, params: Any, target_cfg: ModelConfig,
         decode: dict | None = None, buffers: dict | None = None, **extra) -> None:
  """Writes a head folder (atomically per file)."""
  os.makedirs(path, exist_ok=True)
  if buffers:
    assets.save_arrays(os.path.join(path, BUFFERS), buffers)
  meta = {"format": FORMAT, "kind": kind, "head_kwargs": head_kwargs, "decode": decode or {},
          "target": {"arch": target_cfg.arch, "hidden_size": target_cfg.hidden_size,
                     "vocab_size": target_cfg.vocab_size, "num_layers": target_cfg.num_layers},
          **extra}
  assets.save_arrays(os.path.join(path, PARAMS), assets.flat_params(params))
  assets.save_json(os.path.join(path, META), meta)


def read_meta(path: str) -> dict[str, Any]:
  """A specjax head folder's metadata; clear errors for a missing or corrupt file."""
  meta_path = os.path.join(path, META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{path!r} is not a specjax head folder: it has no {META}.")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{meta_path} is corrupt: {e}") from e
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path} is not a {FORMAT} file.")
  return meta


def layout(path: str) -> str:
  """"specjax", "eagle-llm" or "medusa-llm": which layout the folder at `path` holds."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No head folder at {path!r}.")
  if os.path.exists(os.path.join(path, META)):
    return "specjax"
  cfg_path = os.path.join(path, "config.json")
  if os.path.exists(cfg_path):
    with open(cfg_path, encoding="utf-8") as f:
      hf = json.load(f)
    if "medusa_num_heads" in hf:
      return "medusa-llm"
    if hf.get("speculators_model_type") == "eagle3":
      return "speculators"
    if "draft_vocab_size" in hf and any(os.path.exists(os.path.join(path, n))
                                        for n in _EAGLE_FILES):
      return "specforge"
    if any(os.path.exists(os.path.join(path, n)) for n in _EAGLE_FILES):
      return "eagle-llm"
  raise FileNotFoundError(f"{path!r} is not a head folder: no {META} (specjax), no "
                          f"config.json + {' or '.join(_EAGLE_FILES)} (eagle-llm, or "
                          "specforge with draft_vocab_size), no config.json with "
                          "medusa_num_heads (medusa-llm) or speculators_model_type (speculators).")


_EAGLE_FILES = ("pytorch_model.bin", "model.safetensors")
_MEDUSA_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")


def _state_dict(path: str, names) -> dict[str, np.ndarray]:
  """A PyTorch state dict from the first of `names` in `path`, as numpy arrays."""
  file = next(os.path.join(path, n) for n in names if os.path.exists(os.path.join(path, n)))
  try:
    if file.endswith(".safetensors"):
      return safetensors.numpy.load_file(file)
    import torch  # pylint: disable=g-import-not-at-top  (only .bin/.pt heads need it)
    return {k: v.float().numpy() for k, v in torch.load(file, map_location="cpu",
                                                       weights_only=True).items()}
  except ImportError as e:
    raise ImportError(f"Reading {file} needs PyTorch (pip install torch).") from e
  except Exception as e:
    raise ValueError(f"Could not read {file}: {type(e).__name__}: {e}") from e


def _from_eagle_llm(path: str, target_cfg: ModelConfig):
  """EagleHead + params from eagle-llm's layout (Linear weights are [out, in])."""
  from specjax.drafters.eagle import EagleHead  # pylint: disable=g-import-not-at-top
  from specjax.models.config import from_hf_config  # pylint: disable=g-import-not-at-top

  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    hf = json.load(f)
  check_target(f"The head in {path!r}", hf["hidden_size"], hf["vocab_size"], target_cfg)
  if hf.get("num_hidden_layers", 1) != 1 or hf.get("rope_scaling"):
    raise ValueError(f"{path!r}: only one-layer EAGLE heads without RoPE scaling load.")
  # eagle-llm's draft layer always rotates with base 10000, whatever config.json says.
  layer = from_hf_config({**hf, "model_type": "llama"}).replace(rope_theta=10000.0)
  sd = _state_dict(path, _EAGLE_FILES)
  dense = lambda name: {"kernel": sd[f"{name}.weight"].T}
  params = {"fc": {**dense("fc"), "bias": sd.get("fc.bias", np.zeros(hf["hidden_size"]))},
            "self_attn": {p: dense(f"layers.0.self_attn.{p}")
                          for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {p: dense(f"layers.0.mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")},
            "post_attention_layernorm": {"scale": sd["layers.0.post_attention_layernorm.weight"]}}
  return "eagle", EagleHead(target_cfg, layer=layer), params


def _from_medusa_llm(path: str, target_cfg: ModelConfig):
  """MedusaHead (own LM heads) + params from medusa-llm's layout."""
  from specjax.drafters.medusa import MedusaHead  # pylint: disable=g-import-not-at-top

  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    hf = json.load(f)
  k = hf["medusa_num_heads"]
  if hf.get("medusa_num_layers", 1) != 1:
    raise ValueError(f"{path!r}: only Medusa heads with one residual block load "
                     f"(medusa_num_layers={hf['medusa_num_layers']}).")
  sd = _state_dict(path, _MEDUSA_FILES)
  lm = np.stack([sd[f"{i}.1.weight"] for i in range(k)])  # [K, V, H]
  check_target(f"The head in {path!r}", lm.shape[2], lm.shape[1], target_cfg)
  params = {"w": np.stack([sd[f"{i}.0.linear.weight"].T for i in range(k)]),
            "b": np.stack([sd[f"{i}.0.linear.bias"] for i in range(k)]), "lm_head": lm}
  return "medusa", MedusaHead(target_cfg, num_heads=k, own_lm_head=True), params


def _with_buffers(head, buffers: dict, path: str):
  """`head` with its saved buffers (EAGLE-3's id map), checked against its shapes."""
  ids = buffers.get("draft_ids")
  if ids is None or ids.shape != (getattr(head, "draft_vocab", -1),) or ids.min() < 0 or \
      ids.max() >= head.config.vocab_size:
    raise ValueError(f"{os.path.join(path, BUFFERS)} does not hold a draft-to-target map of "
                     f"{getattr(head, 'draft_vocab', '?')} ids for this head.")
  return head.replace(draft_ids=jnp.asarray(ids, jnp.int32))


def _eagle3(path: str, target_cfg: ModelConfig, sd: dict, layer_hf: dict, prefix: str,
            aux) -> tuple[str, Any, Any]:
  """Eagle3Head + params from a PyTorch EAGLE-3 state dict (speculators' names; the decoder
  layer under `prefix`; Linear weights are [out, in]; d2t holds target id - draft id)."""
  from specjax.drafters.eagle3 import Eagle3Head, default_aux_layers  # pylint: disable=g-import-not-at-top
  from specjax.models.config import from_hf_config  # pylint: disable=g-import-not-at-top

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
  except KeyError as e:
    raise ValueError(f"{path!r} is missing EAGLE-3 weight {e}.") from None
  vocab = params["lm_head"]["kernel"].shape[1]
  head = Eagle3Head(target_cfg, aux, 0 if vocab == target_cfg.vocab_size else vocab,
                    layer=layer)
  if head.draft_vocab:
    if "d2t" not in sd:
      raise ValueError(f"{path!r}: a {vocab}-token draft vocabulary needs the d2t map.")
    head = _with_buffers(head, {"draft_ids": np.arange(vocab) + sd["d2t"].astype(np.int64)},
                         path)
  return "eagle3", head, params


def _from_speculators(path: str, target_cfg: ModelConfig):
  """An EAGLE-3 head in the `speculators` format (what vLLM serves)."""
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    hf = json.load(f)
  odd = [k for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")
         if hf.get(k)]
  if odd:
    raise ValueError(f"{path!r} uses EAGLE-3 variants specjax does not implement: {odd}.")
  return _eagle3(path, target_cfg, _state_dict(path, ("model.safetensors",)),
                 hf["transformer_layer_config"], "layers.0.",
                 hf.get("eagle_aux_hidden_state_layer_ids"))


def _from_specforge(path: str, target_cfg: ModelConfig):
  """An EAGLE-3 head as SafeAILab's EAGLE-3 and SGLang's SpecForge save it: a Llama
  config.json with draft_vocab_size, the decoder layer as midlayer.*, d2t/t2d maps."""
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    hf = json.load(f)
  sd = _state_dict(path, _EAGLE_FILES)
  prefix = "midlayer." if any(k.startswith("midlayer.") for k in sd) else "layers.0."
  aux = (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
  return _eagle3(path, target_cfg, sd, {"model_type": "llama", **hf, "num_hidden_layers": 1},
                 prefix, aux)


def export_speculators(path: str, out: str, target: Any, verifier: str | None = None,
                       speculative_tokens: int = 3) -> None:
  """Writes the EAGLE-3 head at `path` (any layout), trained for `target` (a Model), in the
  `speculators` format vLLM serves: config.json + model.safetensors, which holds the
  target's token embedding as speculators itself saves it. `verifier` is the target's name
  or folder as the server knows it (speculators reads the target's norm and LM head from
  it)."""
  target_cfg = target.config
  kind, head, params, _ = load(path, target_cfg)
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
  safetensors.numpy.save_file(sd, os.path.join(out, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=1)


def load(path: str, target_cfg: ModelConfig, dtype=jnp.float32):
  """(kind, head, params, meta) of a head folder in any layout, checked against the
  target's config (hidden size, vocabulary) and the head's expected shapes."""
  kind = layout(path)
  if kind == "specjax":
    meta = read_meta(path)
    check_target(f"The head in {path!r}", meta["target"]["hidden_size"],
                 meta["target"]["vocab_size"], target_cfg)
    kind = meta["kind"]
    head = registry.HEADS.build(kind, target_cfg, **meta["head_kwargs"])
    try:
      flat = safetensors.numpy.load_file(os.path.join(path, PARAMS))
    except Exception as e:  # missing or truncated file
      raise ValueError(f"Could not read {os.path.join(path, PARAMS)}: {type(e).__name__}: "
                       f"{e}") from e
    params = assets.nested_params(flat)
    if os.path.exists(os.path.join(path, BUFFERS)):
      head = _with_buffers(head, safetensors.numpy.load_file(os.path.join(path, BUFFERS)), path)
  else:
    meta = {"format": kind, "decode": {}}
    kind, head, params = {"eagle-llm": _from_eagle_llm, "medusa-llm": _from_medusa_llm,
                          "speculators": _from_speculators, "specforge": _from_specforge}[kind](
                              path, target_cfg)
  params = jax.tree.map(lambda v: jnp.asarray(v, dtype), params)
  want = jax.eval_shape(lambda: head.init(jax.random.key(0), dtype))
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(want) != \
      jax.tree.leaves(got):
    raise ValueError(f"{path!r} holds params that do not fit a {kind} head for this "
                     "target (names or shapes differ).")
  return kind, head, params, meta


LORA_MARK = "+lora:"


def merged_target(path: str, target):
  """The target a Medusa-2 head decodes with: `target` with the head's LoRA folded in.
  Speculative decoding with that head is lossless relative to this model, NOT to
  `target`; its name says so."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  _, head, params, _ = load(path, target.config, target.dtype)
  if "lora" not in params:
    raise ValueError(f"The head in {path!r} has no LoRA adapters: decode with the target "
                     "itself.")
  return dataclasses.replace(target, params=head.merged(target.params, params),
                             name=f"{target.name}{LORA_MARK}{os.path.abspath(path)}")


def load_drafter(path: str, target, kind: str | None = None, **decode):
  """A drafter from a head folder for `target` (a `Model`); `decode` overrides the
  decoding knobs saved with the head (depth, top_k, tree)."""
  from specjax.models.model import shared_params  # pylint: disable=g-import-not-at-top

  got, head, params, meta = load(path, target.config, target.dtype)
  if kind is not None and got != kind:
    raise ValueError(f"{path!r} holds a {got} head, not {kind}.")
  if "lora" in params and not target.name.endswith(LORA_MARK + os.path.abspath(path)):
    raise ValueError(f"{path!r} is a Medusa-2 head trained with a LoRA-tuned target: decode "
                     "with `io.merged_target(path, target)` as the target (lossless relative "
                     "to that merged model, not to the original).")
  return head.drafter(params, shared_params(target.config, target.params),
                      **{**meta.get("decode", {}), **decode})


def _register(kind: str, takes_stop_policy: bool):
  def build(target, *, checkpoint: str, budget: str | None = None, **decode):
    if budget:  # the draft size from the device's measured costs, not a constant
      meta = read_meta(checkpoint)
      if not meta.get("sim_accept"):
        raise ValueError(f"{checkpoint!r} has no simulated acceptance (sim_accept in {META}): "
                         "it was not exported by specjax-train; give depth (and num_nodes) "
                         "instead of budget.")
      top_k = decode.get("top_k", meta["decode"].get("top_k", 1))
      sized, speedup = budget_lib.knobs(budget_lib.read_costs(budget), meta["sim_accept"],
                                        top_k)
      clash = sorted(set(sized) & set(decode))
      if clash:
        raise ValueError(f"budget={budget!r} sets {clash}; do not give them too.")
      print(f"{kind} head {os.path.basename(checkpoint)}: {sized} from {budget} (a chain "
            f"of that depth predicts {speedup:.2f}x AR)")
      decode = {**decode, **sized}
    return load_drafter(checkpoint, target, kind, **decode)
  build.__doc__ = (f"A trained {kind} head from a folder (decode knobs: depth, top_k, tree, "
                   "num_nodes; or budget=COSTS_JSON to size the draft from measured costs).")
  registry.DRAFTERS.register(kind, takes_stop_policy=takes_stop_policy)(build)


_register("eagle", True)
_register("eagle3", True)
_register("falcon", True)
_register("hydra", True)
_register("medusa", False)


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
  export_speculators(head, out, models.load(args.target), verifier=args.verifier)
  print(f"wrote {out}: config.json + model.safetensors (speculators EAGLE-3)")
