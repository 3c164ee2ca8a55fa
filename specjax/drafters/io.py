"""Trained heads on disk: `save` writes specjax's layout, `load` reads it back.

specjax's layout is a folder with

  head.json            {"format": "specjax-head", "kind", "head_kwargs", "decode",
                        "target": {arch, hidden_size, vocab_size, num_layers, name}, ...}
  params.safetensors   the head's params, keys = "/"-joined pytree paths

The target's shared weights (embedding, LM head) are never stored: the head reads them
from the target it is loaded for, after checking that target has the same hidden size and
vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from specjax import registry
from specjax.models.config import ModelConfig

FORMAT = "specjax-head"
META, PARAMS = "head.json", "params.safetensors"


def save(path: str, kind: str, head_kwargs: dict, params: Any, target_cfg: ModelConfig,
         decode: dict | None = None, **extra) -> None:
  """Writes a head folder (atomically per file)."""
  os.makedirs(path, exist_ok=True)
  flat = {"/".join(k): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(jax.device_get(params)).items()}
  meta = {"format": FORMAT, "kind": kind, "head_kwargs": head_kwargs, "decode": decode or {},
          "target": {"arch": target_cfg.arch, "hidden_size": target_cfg.hidden_size,
                     "vocab_size": target_cfg.vocab_size, "num_layers": target_cfg.num_layers},
          **extra}
  safetensors.numpy.save_file(flat, os.path.join(path, PARAMS + ".tmp"))
  os.replace(os.path.join(path, PARAMS + ".tmp"), os.path.join(path, PARAMS))
  with open(os.path.join(path, META + ".tmp"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  os.replace(os.path.join(path, META + ".tmp"), os.path.join(path, META))


def read_meta(path: str) -> dict[str, Any]:
  """The head folder's metadata; clear errors for a missing or foreign folder."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No head folder at {path!r}.")
  meta_path = os.path.join(path, META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{path!r} is not a head folder: it has no {META}.")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{meta_path} is corrupt: {e}") from e
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path} is not a {FORMAT} file.")
  return meta


def load(path: str, target_cfg: ModelConfig, dtype=jnp.float32):
  """(kind, head, params, meta) of a head folder, checked against the target's config."""
  meta = read_meta(path)
  for field in ("hidden_size", "vocab_size"):
    if meta["target"][field] != getattr(target_cfg, field):
      raise ValueError(f"The head in {path!r} was trained for a target with {field}="
                       f"{meta['target'][field]}; this target has "
                       f"{getattr(target_cfg, field)}.")
  head = registry.HEADS.build(meta["kind"], target_cfg, **meta["head_kwargs"])
  try:
    flat = safetensors.numpy.load_file(os.path.join(path, PARAMS))
  except Exception as e:  # missing or truncated file
    raise ValueError(f"Could not read {os.path.join(path, PARAMS)}: {type(e).__name__}: "
                     f"{e}") from e
  params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v, dtype)
                                              for k, v in flat.items()})
  want = jax.eval_shape(lambda: head.init(jax.random.key(0), dtype))
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(want) != \
      jax.tree.leaves(got):
    raise ValueError(f"{path!r} holds params that do not fit a {meta['kind']} head for this "
                     "target (names or shapes differ).")
  return meta["kind"], head, params, meta


def load_drafter(path: str, target, kind: str | None = None, **decode):
  """A drafter from a head folder for `target` (a `Model`); `decode` overrides the
  decoding knobs saved with the head (depth, top_k, tree)."""
  from specjax.models.model import shared_params  # pylint: disable=g-import-not-at-top

  got, head, params, meta = load(path, target.config, target.dtype)
  if kind is not None and got != kind:
    raise ValueError(f"{path!r} holds a {got} head, not {kind}.")
  return head.drafter(params, shared_params(target.config, target.params),
                      **{**meta.get("decode", {}), **decode})


def _register(kind: str, takes_stop_policy: bool):
  def build(target, *, checkpoint: str, **decode):
    return load_drafter(checkpoint, target, kind, **decode)
  build.__doc__ = f"A trained {kind} head from a folder (decode knobs: depth, top_k, tree)."
  registry.DRAFTERS.register(kind, takes_stop_policy=takes_stop_policy)(build)


_register("eagle", True)
_register("medusa", False)
