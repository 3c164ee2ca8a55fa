"""Offline target features: run the frozen target over the data once, store what the head
reads, and train many epochs (or many heads) without the target's forward.

The store is a folder of `.npy` memmaps, one per feature, [rows, seq_len, H] (training
rows, then held-out rows, in `Data`'s order), plus `progress.json` with the rows written:
building resumes where a killed run stopped. The target's logits are not stored (V floats
a token); steps recompute them from the final features with the target's LM head, a
small fraction of a full forward. Storing in float16 halves the disk for large targets.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from specjax import models
from specjax.models.model import FINAL, causal_forward

PROGRESS = "progress.json"


def stored_features(head_features) -> tuple[int, ...]:
  """FINAL first (the logits come from it), then the head's other features."""
  return (FINAL,) + tuple(f for f in head_features if f != FINAL)


class Store:
  """Memmapped features of every row of a `Data`, train rows first."""

  def __init__(self, folder: str, features, num_rows: int, seq_len: int, hidden: int,
               dtype: str, mode: str):
    self.features = tuple(features)
    self.origin = None  # row -> stored row, for a fraction of the stored data (`build`)
    self.arrays = [np.lib.format.open_memmap(
        os.path.join(folder, f"feature_{'final' if f == FINAL else f}.npy"), mode=mode,
        dtype=np.dtype(dtype), shape=(num_rows, seq_len, hidden)) for f in self.features]

  def get(self, rows, width: int) -> tuple[np.ndarray, ...]:
    rows = rows if self.origin is None else self.origin[rows]
    return tuple(np.asarray(a[rows, :width], np.float32) for a in self.arrays)


def build(target: models.Model, data, head_features, folder: str, *, batch_size: int = 8,
          dtype: str = "float32", progress: bool = True) -> Store:
  """Writes (or finishes writing) the store for `data`; returns it. For a fraction of a
  data set (`data.whole`) the store is the whole set's, read through `data.origin`: every
  point of a tau-vs-data curve shares one store."""
  if data.whole is not None:
    store = build(target, data.whole, head_features, folder, batch_size=batch_size,
                  dtype=dtype, progress=progress)
    store.origin = data.origin
    return store
  os.makedirs(folder, exist_ok=True)
  feats = stored_features(head_features)
  tokens = np.concatenate([data.tokens, data.eval_tokens])
  n, seq_len = tokens.shape
  info = {"features": list(feats), "rows": n, "seq_len": seq_len, "dtype": dtype,
          "target": target.name, "order": "length"}
  path = os.path.join(folder, PROGRESS)
  done = 0
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    if {k: saved.get(k) for k in info} != info:
      raise ValueError(f"{folder} holds features for other data or settings ({saved}); "
                       "delete it or use another folder.")
    done = saved["done"]
  store = Store(folder, feats, n, seq_len, target.config.hidden_size, dtype,
                "r+" if done else "w+")
  bar = tqdm.tqdm(total=n, initial=done, unit="row", desc="target features",
                  disable=not progress)
  # Rows in length order, each batch cut to its longest row (a few compiled widths):
  # distilled rows fill about half of seq_len, so this halves the build.
  lengths = np.concatenate([data.lengths, data.eval_lengths])
  order = np.argsort(lengths, kind="stable")
  for start in range(done, n, batch_size):
    rows = order[start:start + batch_size]
    width = data.width(lengths[rows])
    out = causal_forward(target.config, target.params, jnp.asarray(tokens[rows, :width]),
                         features=feats)
    for array, f in zip(store.arrays, out.features):
      array[rows, :width] = np.asarray(jax.device_get(f), array.dtype)
      array.flush()
    done = min(n, start + batch_size)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump({**info, "done": done}, f)
    os.replace(path + ".tmp", path)
    bar.update(done - bar.n)
  bar.close()
  return Store(folder, feats, n, seq_len, target.config.hidden_size, dtype, "r")
