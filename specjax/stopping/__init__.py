"""Draft-length (stop) policies. See `base.py` for the interface."""

from __future__ import annotations

from specjax.stopping.base import StopPolicy
from specjax.stopping.training_free import SVIP, Confidence, Fixed

POLICIES = {"fixed": Fixed, "confidence": Confidence, "svip": SVIP}


def get(name, **kw) -> StopPolicy:
  """A policy by name ("fixed", "confidence", "svip") or an instance; None = fixed."""
  if name is None:
    return Fixed()
  if not isinstance(name, str):
    return name
  if name not in POLICIES:
    raise ValueError(f"Unknown stop policy {name!r}; choose from {sorted(POLICIES)}.")
  return POLICIES[name](**kw)


__all__ = ["POLICIES", "SVIP", "Confidence", "Fixed", "StopPolicy", "get"]
