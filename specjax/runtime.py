"""Process-wide JAX settings the CLIs, the demo and the tests share."""

from __future__ import annotations

import logging
import os

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
