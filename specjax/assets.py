"""Files shipped inside installed pip packages (model weights, prompt sets): found without
importing the package, with an error that says how to install it."""

from __future__ import annotations

import importlib.util
import os


def package_file(package: str, relpath: str, install: str, what: str) -> str:
  """Path of `relpath` inside installed `package`; FileNotFoundError names `install`."""
  spec = importlib.util.find_spec(package)
  locations = spec.submodule_search_locations if spec else None
  path = os.path.join(locations[0], relpath) if locations else None
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(f"{what} needs {relpath!r} from the package {package!r}, which is "
                            f"not installed. Install it with: {install}  (or run `make install`).")
  return path
