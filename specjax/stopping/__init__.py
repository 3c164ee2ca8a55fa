"""Draft-length (stop) policies, registered by name. See `base.py` for the interface."""

from __future__ import annotations

from specjax import registry
from specjax.stopping.base import StopPolicy, gather
from specjax.stopping.learned import Pacer, SpecDecPP, check
from specjax.stopping.training_free import SVIP, Confidence, Fixed


def get(name, **kw) -> StopPolicy:
  """A policy by registered name (with its knobs) or an instance; None = fixed."""
  if name is None:
    return Fixed()
  if not isinstance(name, str):
    return name
  return registry.STOP_POLICIES.build(name, **kw)


__all__ = ["SVIP", "Confidence", "Fixed", "Pacer", "SpecDecPP", "StopPolicy", "check", "gather",
           "get"]
