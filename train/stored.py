"""Folders of stored examples (stop-policy labels, SpecEE's exit examples): one file per
batch, so a killed collection resumes, and the spec that made them beside them, so a
folder made with other settings is refused instead of silently mixed."""

from __future__ import annotations

import json
import os
from typing import Any


def claim(folder: str, spec: dict[str, Any], what: str, name: str) -> None:
  """Makes `folder` for `what` made by `spec` (stored as `name`), or checks that those
  there were (naming the settings that differ)."""
  os.makedirs(folder, exist_ok=True)
  spec = json.loads(json.dumps(spec))  # tuples as stored
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    with open(path, "w", encoding="utf-8") as f:
      json.dump(spec, f, indent=1)
    return
  with open(path, encoding="utf-8") as f:
    stored = json.load(f)
  if stored != spec:
    diff = sorted(k for k in set(stored) | set(spec) if stored.get(k) != spec.get(k))
    raise ValueError(f"{folder} holds {what} made with other settings ({diff} differ); use "
                     "another folder or remove it.")
