"""Process-wide JAX settings the CLIs, the demo and the tests share."""

from __future__ import annotations

import difflib
import logging
import os
import sys
from typing import Any

import jax

# Inside the checkout, so `make clean` removes it; SPECJAX_COMPILE_CACHE overrides it
# ("off" turns the cache off).
DEFAULT_COMPILE_CACHE = ".jax_cache"
OFF = "off"


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache: a second run of the same programs (a
  rerun of the demo, a resumed sweep) loads them instead of compiling. Returns the folder,
  or None when SPECJAX_COMPILE_CACHE=off (the test suite sets it: a clean clone's suite
  gains little from the cache, and a write is where a process that ran out of memory
  maps aborted; see `check_map_count`)."""
  path = path or os.environ.get("SPECJAX_COMPILE_CACHE", DEFAULT_COMPILE_CACHE)
  if path == OFF:
    return None
  path = os.path.abspath(path)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


MAP_COUNT = "/proc/sys/vm/max_map_count"


def check_map_count(minimum: int = 262_144) -> str | None:
  """A warning (also logged) when Linux's per-process memory-map limit is low for XLA:CPU,
  which maps thousands of regions per compiled program of a real model: a sweep that
  compiles a few dozen programs at the default 65,530 dies in LLVM ("Cannot allocate
  memory"). None when the limit is fine or not readable (not Linux)."""
  try:
    with open(MAP_COUNT, encoding="utf-8") as f:
      limit = int(f.read())
  except (OSError, ValueError):
    return None
  if limit >= minimum or jax.default_backend() != "cpu":
    return None
  msg = (f"vm.max_map_count is {limit}: XLA:CPU maps thousands of memory regions per "
         "compiled program, and a process holding a few dozen programs of a real model "
         "aborts in LLVM ('Cannot allocate memory'). Raise it: sudo sysctl -w "
         f"vm.max_map_count={minimum * 4}.")
  logging.warning(msg)
  return msg


def parse_config_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for the CLIs, where a `--config.KEY=VALUE` naming no key of the
  config is one plain sentence (the key and its close matches) and exit status 2, not
  ml_collections' traceback ending in an escaped repr."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    if not any(a.startswith("--config.") for a in argv[1:]):
      raise
    config = _config_of(argv, flags.FLAGS)
    if config is None:
      print(f"error: a --config.KEY flag names no key of the config: {_innermost(e)}",
            file=sys.stderr)
      sys.exit(2)
    for a in argv[1:]:
      if a.startswith("--config."):
        _check_config_key(config, a.partition("=")[0])
    raise


def _check_config_key(config: Any, flag: str) -> None:
  """Exits (status 2) with a sentence if `flag` (--config.a.b) names no key of `config`."""
  where, node = [], config
  for key in flag[len("--config."):].split("."):
    if hasattr(node, "keys") and key in node:
      where.append(key)
      node = node[key]
      continue
    keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
    close = [".".join(where + [m]) for m in difflib.get_close_matches(key, keys, 3, 0.6)]
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    print(f"error: {flag}: the config has no key {'.'.join(where + [key])!r}.{hint}",
          file=sys.stderr)
    sys.exit(2)


def _innermost(e: BaseException) -> str:
  """The message under ml_collections' nested KeyError/AttributeError wrapping."""
  while isinstance(e, BaseException) and e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0]) if isinstance(e, BaseException) and e.args else str(e)


def _config_of(argv: list[str], flag_values) -> Any:
  """The config `--config=FILE[:ARG]` in `argv` names, loaded again (None if it fails)."""
  for i, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      value = a[len("--config="):]
    elif a == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    try:
      return flag_values["config"].parser.parse(value)
    except Exception:  # pylint: disable=broad-except
      return None
  return None
