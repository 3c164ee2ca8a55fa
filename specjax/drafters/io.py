"""Trained heads on disk: `save` writes specjax's layout; `load` reads any head folder and
detects its layout, the way `specjax.models.load` does for targets:

  specjax      head.json + params.safetensors [+ buffers.safetensors] (below)
  speculators  config.json with speculators_model_type "eagle3" + model.safetensors
               (vLLM's EAGLE-3 serving format; `drafters.export` writes it)
  specforge    config.json with draft_vocab_size + model.safetensors or pytorch_model.bin
               with midlayer.* (SafeAILab EAGLE-3 / SGLang SpecForge EAGLE-3 heads)
  eagle-llm    config.json (the draft layer's Llama config) + pytorch_model.bin or
               model.safetensors with fc.* and layers.0.* (SafeAILab's EAGLE-1/2 heads)
  medusa-llm   config.json with medusa_num_heads + medusa_lm_head.pt or .safetensors
               ("{k}.0.linear.*" residual blocks, "{k}.1.weight" per-head LM heads)
  z-lab        config.json with dflash_config + model.safetensors (z-lab's DFlash heads)

Each foreign layout's converter lives beside its head (`CONVERTERS`). specjax's layout is
a folder with

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

import importlib
import json
import logging
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
  """Which layout (a name in the module docstring) the folder at `path` holds."""
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
    if "dflash_config" in hf:
      return "z-lab"
    if "draft_vocab_size" in hf and any(os.path.exists(os.path.join(path, n))
                                        for n in EAGLE_FILES):
      return "specforge"
    if any(os.path.exists(os.path.join(path, n)) for n in EAGLE_FILES):
      return "eagle-llm"
  raise FileNotFoundError(f"{path!r} is not a head folder: no {META} (specjax), no "
                          f"config.json + {' or '.join(EAGLE_FILES)} (eagle-llm, or "
                          "specforge with draft_vocab_size), no config.json with "
                          "medusa_num_heads (medusa-llm), speculators_model_type (speculators) "
                          "or dflash_config (z-lab DFlash).")


EAGLE_FILES = ("pytorch_model.bin", "model.safetensors")
MEDUSA_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")


def read_json(path: str) -> dict[str, Any]:
  """A JSON file; clear errors for a missing or corrupt one."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"No file at {path!r}.") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is corrupt: {e}") from e


def state_dict(path: str, names) -> dict[str, np.ndarray]:
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


# A foreign layout -> "module:function" returning (kind, head, params) for a target config.
CONVERTERS = {
    "eagle-llm": "specjax.drafters.heads.eagle:from_eagle_llm",
    "medusa-llm": "specjax.drafters.heads.medusa:from_medusa_llm",
    "speculators": "specjax.drafters.heads.eagle3:from_speculators",
    "specforge": "specjax.drafters.heads.eagle3:from_specforge",
    "z-lab": "specjax.drafters.heads.dflash:from_zlab",
}


def _convert(kind: str, path: str, target_cfg: ModelConfig):
  module, fn = CONVERTERS[kind].split(":")
  return getattr(importlib.import_module(module), fn)(path, target_cfg)


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
    buffers = os.path.join(path, BUFFERS)
    head = head.with_buffers(
        safetensors.numpy.load_file(buffers) if os.path.exists(buffers) else {}, path)
  else:
    meta = {"format": kind, "decode": {}}
    kind, head, params = _convert(kind, path, target_cfg)
  params = jax.tree.map(lambda v: jnp.asarray(v, dtype), params)
  want = jax.eval_shape(lambda: head.init(jax.random.key(0), dtype))
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(want) != \
      jax.tree.leaves(got):
    raise ValueError(f"{path!r} holds params that do not fit a {kind} head for this "
                     "target (names or shapes differ).")
  return kind, head, params, meta


def load_drafter(path: str, target, kind: str | None = None, **decode):
  """A drafter from a head folder for `target` (a `Model`); `decode` overrides the
  draft-size knobs saved with the head (depth, top_k, tree, num_nodes)."""
  from specjax.models.model import shared_params  # pylint: disable=g-import-not-at-top

  got, head, params, meta = load(path, target.config, target.dtype)
  if kind is not None and got != kind:
    raise ValueError(f"{path!r} holds a {got} head, not {kind}.")
  if "lora" in params and target.merged_head != os.path.abspath(path):
    raise ValueError(f"{path!r} is a Medusa-2 head trained with a LoRA-tuned target: decode "
                     "with `medusa.merged_target(path, target)` as the target (lossless "
                     "relative to that merged model, not to the original).")
  # A drafter that runs the target itself (PPD's first guesses) gets its params too.
  extra = {"target_params": target.params} if getattr(head, "uses_target_params", False) else {}
  return head.drafter(params, shared_params(target.config, target.params),
                      **{**meta.get("decode", {}), **decode}, **extra)


def trained_drafter(kind: str, target, checkpoint: str, budget: str | None, **knobs):
  """What every trained head's `registry.DRAFTERS` builder does: the `kind` head at
  `checkpoint` as a drafter for `target`, with the draft-size knobs given (None = the
  head folder's), or sized by `budget` (a costs JSON) from the head's held-out
  acceptance."""
  knobs = {k: v for k, v in knobs.items() if v is not None}
  if budget:  # the draft size from the device's measured costs, not a constant
    meta = read_meta(checkpoint)
    if not meta.get("sim_accept"):
      raise ValueError(f"{checkpoint!r} has no simulated acceptance (sim_accept in {META}): "
                       "it was not exported by specjax-train; give depth (and num_nodes) "
                       "instead of budget.")
    top_k = knobs.get("top_k", meta["decode"].get("top_k", 1))
    sized, speedup = budget_lib.knobs(budget_lib.read_costs(budget), meta["sim_accept"],
                                      top_k)
    clash = sorted(set(sized) & set(knobs))
    if clash:
      raise ValueError(f"budget={budget!r} sets {clash}; do not give them too.")
    logging.info("%s head %s: %s from %s (a chain of that depth predicts %.2fx AR)", kind,
                 os.path.basename(checkpoint), sized, budget, speedup)
    knobs = {**knobs, **sized}
  return load_drafter(checkpoint, target, kind, **knobs)
