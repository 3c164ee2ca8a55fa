"""Registries: drafters, stop policies and acceptance rules, built from config by name.

Each pluggable part registers a builder with an explicit signature in the module that
defines it:

  @registry.DRAFTERS.register("prompt_lookup", takes_stop_policy=False)
  def _build(target, *, depth=10, max_ngram=3, min_ngram=1): ...

`build(name, ...)` calls it; `check(name, ...)` binds the keyword arguments without
building anything, so a sweep finds a mistyped knob before any weights load. Names
resolve lazily: each registry knows which module defines each built-in name and imports
it on first use, so `import specjax` loads only what a program uses. Adding a part is one
new module, its registration, and its name in the table below. `check_combination` is the
one place that says which drafter / stop policy / acceptance rule / temperature
combinations work.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping

class Registry:
  """Named builders of one kind of part, each with static metadata; built-in names are
  imported from their modules on first use."""

  def __init__(self, kind: str, modules: Mapping[str, str]):
    self.kind = kind
    self._modules = dict(modules)  # built-in name -> the module that registers it
    self._builders: dict[str, Callable[..., Any]] = {}
    self._meta: dict[str, dict[str, Any]] = {}

  def register(self, name: str, **meta) -> Callable:
    def deco(builder):
      if name in self._builders:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._builders[name] = builder
      self._meta[name] = meta
      return builder
    return deco

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(set(self._modules) | set(self._builders)))

  def __contains__(self, name: str) -> bool:
    return name in self._modules or name in self._builders

  def _builder(self, name: str) -> Callable[..., Any]:
    if name not in self._builders and name in self._modules:
      importlib.import_module(self._modules[name])
    if name not in self._builders:
      raise ValueError(f"Unknown {self.kind} {name!r}; choose from {list(self.names())}.")
    return self._builders[name]

  def meta(self, name: str) -> Mapping[str, Any]:
    self._builder(name)
    return self._meta[name]

  def knobs(self, name: str) -> tuple[str, ...]:
    """The keyword arguments `name`'s builder takes."""
    return tuple(p.name for p in inspect.signature(self._builder(name)).parameters.values()
                 if p.kind == p.KEYWORD_ONLY or p.default is not p.empty)

  def check(self, name: str, *args, **kwargs) -> None:
    """Raises ValueError if `name` is unknown or does not take these keyword arguments
    (naming the knobs it does not take), or if its registered `check(**kwargs)` (a part
    whose knobs name other parts: hybrid trees) refuses them."""
    builder = self._builder(name)
    try:
      inspect.signature(builder).bind(*args, **kwargs)
    except TypeError as e:
      takes = self.knobs(name)
      unknown = sorted(set(kwargs) - set(takes))
      what = f"unknown knobs {unknown}" if unknown else str(e)
      raise ValueError(f"Bad arguments for {self.kind} {name!r}: {what}. It takes "
                       f"{list(takes)}.") from None
    if "check" in self._meta[name]:
      self._meta[name]["check"](**kwargs)

  def build(self, name: str, *args, **kwargs) -> Any:
    self.check(name, *args, **kwargs)
    return self._builders[name](*args, **kwargs)


_HEADS = {**{k: f"specjax.drafters.heads.{k}" for k in ("dflash", "eagle", "eagle3", "falcon",
                                                         "hydra", "longspec", "medusa", "ppd")},
          "dspark": "specjax.drafters.heads.dflash",
          "draft_lm": "specjax.drafters.selfdraft.draft_model"}
# builder(target: Model, **knobs) -> drafter
DRAFTERS = Registry("drafter", {
    **_HEADS, "prompt_lookup": "specjax.drafters.retrieval.prompt_lookup",
    "token_recycling": "specjax.drafters.retrieval.token_recycling",
    "suffix": "specjax.drafters.retrieval.suffix", "hybrid": "specjax.drafters.hybrid",
    "goodput": "specjax.drafters.goodput",
    "self_draft": "specjax.drafters.selfdraft.draft_model",
    "draft_model": "specjax.drafters.selfdraft.draft_model",
    "swift": "specjax.drafters.selfdraft.swift", "pearl": "specjax.drafters.selfdraft.pearl",
    "easyspec": "specjax.drafters.selfdraft.easyspec",
    "mirror": "specjax.drafters.selfdraft.mirror",
    "partial_kv": "specjax.drafters.selfdraft.partial_kv",
    "del": "specjax.drafters.selfdraft.dynamic_exit",
    "specee": "specjax.drafters.selfdraft.specee",
    "specpv": "specjax.drafters.selfdraft.specpv",
    "hierarchical": "specjax.drafters.selfdraft.hierarchical"})
# builder(**knobs) -> policy
STOP_POLICIES = Registry("stop policy", {
    **{k: "specjax.stopping.training_free" for k in ("fixed", "confidence", "svip")},
    **{k: "specjax.stopping.learned" for k in ("specdecpp", "pacer")}})
# builder(**knobs) -> a `verify` rule
ACCEPTANCE = Registry("acceptance rule", {k: "specjax.verify" for k in (
    "greedy", "speculative", "rsd", "typical", "fuzzy", "easd", "judge", "arbitrage")})
# builder(target_config, **knobs) -> drafters.TrainableHead
HEADS = Registry("draft head", _HEADS)

AR = "ar"  # the drafter name of plain autoregressive decoding (no drafter)


def check_combination(*, takes_stop_policy: bool | None, has_stop: bool, rule: str | None,
                      temperatures, greedy_only: bool = False) -> None:
  """Raises ValueError for combinations that cannot run.

  Args:
    takes_stop_policy: None for AR decoding (no drafter), else whether the drafter drafts
      from a distribution a stop policy can read.
    has_stop: whether a stop policy was given.
    rule: the acceptance rule's name, or None (greedy at temperature 0, else speculative).
    temperatures: every temperature the method will run at.
    greedy_only: the drafter is defined for greedy decoding only (SpecEE's early exit,
      LOSSY; hierarchical drafting's greedy inner loop).
  """
  temperatures = tuple(temperatures)
  if greedy_only and any(t > 0 for t in temperatures):
    raise ValueError("This drafter is defined for greedy decoding only (greedy-only): use "
                     "temperature 0.")
  if takes_stop_policy is None:
    if has_stop:
      raise ValueError("A stop policy needs a drafter (AR decoding drafts nothing).")
    if rule is not None:
      raise ValueError("AR decoding (no drafter) verifies nothing: it takes no acceptance "
                       "rule.")
    return
  if has_stop and not takes_stop_policy:
    raise ValueError("This drafter proposes without a distribution: stop policies do not "
                     "apply to it (they apply to model drafters).")
  if rule == "greedy" and any(t > 0 for t in temperatures):
    raise ValueError("acceptance='greedy' needs temperature=0; use 'speculative' (or None) "
                     "to sample.")
  if rule is not None and ACCEPTANCE.meta(rule).get("sampled_only") and any(
      t == 0 for t in temperatures):
    raise ValueError(f"acceptance={rule!r} is LOSSY and reads sampling distributions: at "
                     "temperature 0 the target's is one-hot and the rule would silently be "
                     "greedy matching. Use temperature > 0 (or 'greedy').")
