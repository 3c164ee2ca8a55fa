"""Hybrid trees: one draft tree whose branches come from several drafters at once.

Each part drafts its own tree (a trained head's top-k chain, Token Recycling's template,
SuffixDecoding's chain, ...); the trees hang from the same root and are merged into one:
a node whose parent path and token an earlier node already has is the same candidate, so
it is dropped and its children hang from the earlier node; the surviving nodes move to the
front (parents first), so the step verifies the narrowest width that holds them. The node
budget is the sum of the parts' budgets; what dedupe saves is not verified.

Parts draft deterministically (greedy picks, q one-hot), so verification is lossless at
any temperature. Every part sees the merged tree's verdict in `commit`: a part's commit
must read only the verdict's path and the features of the verified nodes, not its own
tree's layout (`merges = True`: EAGLE-1/3, Token Recycling, SuffixDecoding, prompt
lookup). A part that keeps features of accepted tokens is told how deep the merged tree
is (`accept_depth`), since a step may now accept a path longer than its own tree.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from specjax import registry, stopping
from specjax.sampling import Sampling
from specjax.tree import DraftTree


def merge(trees: Sequence[DraftTree]) -> DraftTree:
  """One tree of all `trees`' valid nodes (each rooted at the same root), duplicates of
  an earlier node (same parent, same token) dropped, survivors first in parents-first
  order. Deterministic picks: no distributions."""
  tokens = jnp.concatenate([t.tokens for t in trees], 1)
  valid = jnp.concatenate([t.valid for t in trees], 1)
  offsets = [0]
  for t in trees:
    offsets.append(offsets[-1] + t.num_nodes)
  parents = jnp.concatenate([jnp.where(t.parents < 0, -1, t.parents + o)
                             for t, o in zip(trees, offsets)], 1)
  b, n = tokens.shape
  rows = jnp.arange(b)
  canon = jnp.broadcast_to(jnp.arange(n), (b, n))  # node -> the node it is a copy of
  for i in range(n):  # static N: the parts' budgets
    p = parents[:, i]
    cp = jnp.where(p < 0, -1, canon[rows, jnp.maximum(p, 0)])
    parents = parents.at[:, i].set(cp)
    if i:
      same = valid[:, :i] & (parents[:, :i] == cp[:, None]) & (tokens[:, :i] == tokens[:, i:i + 1])
      dup = same.any(-1) & valid[:, i]
      canon = canon.at[:, i].set(jnp.where(dup, jnp.argmax(same, -1), i))
      valid = valid.at[:, i].set(valid[:, i] & ~dup)
  # Survivors to the front, in order; a valid node's parent is valid and earlier.
  order = jnp.argsort(~valid, axis=1, stable=True)
  new_index = jnp.argsort(order, axis=1)
  take = lambda x: jnp.take_along_axis(x, order, 1)
  new_parents = take(parents)
  new_parents = jnp.where(new_parents < 0, -1,
                          jnp.take_along_axis(new_index, jnp.maximum(new_parents, 0), 1))
  new_valid = take(valid)
  return DraftTree(take(tokens), jnp.where(new_valid, new_parents, -1), new_valid)


@flax.struct.dataclass
class Hybrid:
  parts: tuple  # drafters, each with `merges = True`
  takes_stop_policy = False
  drafts_vary = True  # dedupe and parts that draft less narrow the verified width

  @classmethod
  def create(cls, parts: Sequence[Any]) -> "Hybrid":
    """The hybrid of built drafters; parts that keep accepted tokens' features are told
    the deepest path a step may accept (a merged path is no deeper than its part's tree,
    whose depth is at most its node count)."""
    depth = max(p.num_nodes for p in parts)
    return cls(tuple(p.replace(accept_depth=depth) if hasattr(p, "accept_depth") else p
                     for p in parts))

  @property
  def num_nodes(self) -> int:
    return sum(p.num_nodes for p in self.parts)

  @property
  def features(self) -> tuple[int, ...]:
    return tuple(dict.fromkeys(f for p in self.parts for f in p.features))

  @property
  def target_top_k(self) -> int:
    return max(getattr(p, "target_top_k", 0) for p in self.parts)

  def _features_of(self, part, features: tuple) -> tuple:
    return tuple(features[self.features.index(f)] for f in part.features)

  def validate(self, target_config) -> None:
    if len(self.parts) < 2:
      raise ValueError(f"A hybrid tree merges at least 2 drafters; got {len(self.parts)}.")
    for p in self.parts:
      if not getattr(p, "merges", False):
        raise ValueError(f"{type(p).__name__} cannot be part of a hybrid tree: its commit "
                         "reads its own tree's layout, not any verified tree's "
                         "(parts: eagle, eagle3, token_recycling, suffix, prompt_lookup).")
      p.validate(target_config)

  def init(self, ctx, max_len, features):
    return tuple(p.init(ctx, max_len, self._features_of(p, features)) for p in self.parts)

  def propose(self, state, ctx, stop, sampling, key):
    del stop, sampling  # parts pick greedily: q one-hot keeps verification lossless
    greedy, fixed = Sampling.create(0.0), stopping.Fixed()
    trees, states, calls = [], [], 0
    for i, (p, s) in enumerate(zip(self.parts, state)):
      tree, s, c = p.propose(s, ctx, fixed, greedy, jax.random.fold_in(key, i))
      trees.append(tree)
      states.append(s)
      calls = calls + c
    return merge(trees), tuple(states), calls

  def commit(self, state, ctx, verdict, features):
    return tuple(p.commit(s, ctx, verdict, self._features_of(p, features))
                 for p, s in zip(self.parts, state))

  def carry(self, output) -> "Hybrid":
    """Each part that learns across calls, carried (`Drafter.carry`)."""
    parts = tuple(p.carry(output.replace(drafter_state=s)) if callable(getattr(p, "carry", None))
                  else p for p, s in zip(self.parts, output.drafter_state))
    return self.replace(parts=parts)


def _parts(parts: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict]]:
  """(name, knobs) of each part, checked against the registry (nothing is built)."""
  out = []
  for spec in parts:
    spec = dict(spec)
    if spec.get("drafter") in (None, "hybrid"):
      raise ValueError(f"Each hybrid part is {{'drafter': name, **knobs}} naming another "
                       f"drafter; got {spec}.")
    name = spec.pop("drafter")
    registry.DRAFTERS.check(name, None, **spec)
    out.append((name, spec))
  return out


def _check(*, parts=()) -> None:
  if len(parts) < 2:
    raise ValueError(f"A hybrid tree merges at least 2 drafters; got {len(parts)}.")
  _parts(parts)


@registry.DRAFTERS.register("hybrid", takes_stop_policy=False, check=_check)
def _build(target, *, parts: Sequence[Mapping[str, Any]]) -> Hybrid:
  """One tree from several drafters: `parts` is a list of {"drafter": name, **knobs}."""
  return Hybrid.create([registry.DRAFTERS.build(name, target, **knobs)
                        for name, knobs in _parts(parts)])
