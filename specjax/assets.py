"""Files: those shipped inside installed pip packages (model weights, prompt sets), found
without importing the package, with an error that says how to install it; and the params
folders specjax writes (heads, stop predictors), every file replaced atomically so a kill
leaves the old file or the new one, never half of one."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import flax.traverse_util
import jax
import numpy as np
import safetensors.numpy


def package_file(package: str, relpath: str, install: str, what: str) -> str:
  """Path of `relpath` inside installed `package`; FileNotFoundError names `install`."""
  spec = importlib.util.find_spec(package)
  locations = spec.submodule_search_locations if spec else None
  path = os.path.join(locations[0], relpath) if locations else None
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(f"{what} needs {relpath!r} from the package {package!r}, which is "
                            f"not installed. Install it with: {install}  (or run `make install`).")
  return path


def save_arrays(path: str, arrays: dict[str, Any], metadata: dict[str, str] | None = None
                ) -> None:
  """A safetensors file of named arrays, written atomically, with the mode any new file
  gets (0644 under the usual umask): safetensors alone writes 0600."""
  safetensors.numpy.save_file({k: np.asarray(v) for k, v in arrays.items()}, path + ".tmp",
                              metadata=metadata)
  os.chmod(path + ".tmp", 0o666 & ~_umask())
  os.replace(path + ".tmp", path)


def _umask() -> int:
  """The process's umask, read without changing it where Linux shows it."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)  # elsewhere: set and restore
  os.umask(mask)
  return mask


def save_json(path: str, obj: Any) -> None:
  """A JSON file, written atomically."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def flat_params(params: Any) -> dict[str, np.ndarray]:
  """A params pytree as {"/"-joined path: array} (how params.safetensors files key it)."""
  return {"/".join(k): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(jax.device_get(params)).items()}


def nested_params(flat: dict[str, Any]) -> Any:
  """The inverse of `flat_params`."""
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
