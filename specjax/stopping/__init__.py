"""Draft-length (stop) policies, registered by name in `registry.STOP_POLICIES` (the
learned ones load on first use). See `base.py` for the interface."""

from __future__ import annotations

from specjax import registry
from specjax.stopping.base import StopPolicy, gather
from specjax.stopping.training_free import SVIP, Confidence, Fixed


def get(name, **kw) -> StopPolicy:
  """A policy by registered name (with its knobs) or an instance; None = fixed."""
  if name is None:
    if kw:
      raise ValueError(f"Stop-policy knobs {sorted(kw)} were given without a policy.")
    return Fixed()
  if not isinstance(name, str):
    if kw:
      raise ValueError(f"Knobs {sorted(kw)} were given with a built stop policy.")
    return name
  return registry.STOP_POLICIES.build(name, **kw)


def __getattr__(name: str):
  if name in ("Pacer", "SpecDecPP"):  # the learned policies, imported on first use
    from specjax.stopping import learned  # pylint: disable=g-import-not-at-top
    return getattr(learned, name)
  raise AttributeError(f"module 'specjax.stopping' has no attribute {name!r}")


__all__ = ["SVIP", "Confidence", "Fixed", "Pacer", "SpecDecPP", "StopPolicy", "gather", "get"]
