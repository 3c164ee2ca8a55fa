"""SmartSpec's goodput policy: each step drafts the length that maximises the batch's
goodput, from running acceptance estimates and the device's measured step costs.

After "Optimizing Speculative Decoding for Serving Large Language Models Using Goodput"
(SmartSpec). Goodput is the tokens a step is expected to produce (accepted drafts plus the
bonus token) per second of batch time. With a per-token acceptance estimate a_i for
request i, a chain of k drafts yields E_i(k) = 1 + a_i + ... + a_i^k tokens in
expectation, and a step that verifies k drafts for B rows costs c_B(k) ms (measured:
`make bench`'s cost file at this batch size, verification at the compiled width that
holds k drafts, plus max(k, 1) draft forwards: the inner drafter reads the committed
tokens every step). Each step picks

  k* = argmax_{k in 0..K} sum_{live i} E_i(k) / c_B(k)

(k = 0 is a plain AR step: no drafting, no verification width). As the batch grows,
verifying costs more per row and k* falls to 0 by itself; when verification is free, k*
is the drafter's depth K.

One length for the whole batch, where SmartSpec picks one per request: a step's cost
here is set by its widest row (every row is verified at the same compiled width), so at
a given width a row drafting less only gives up tokens it would get for free. The
per-request estimates still set the batch's length: they are what E sums.

The estimate is the geometric model's maximum-likelihood rate A / (A + R): A counts
accepted drafts and R rejections (a step that accepted all it drafted has none), both
exponential moving averages over the row's steps (weight `decay` on the newest), starting
from one step's worth at `prior` (A = prior, R = 1 - prior). accepted / drafted would
underestimate the rate (a = 0.8 over 4 drafts gives 0.59 on average) and shorten the
drafts it sizes. A row whose step drafted nothing learns nothing, so its A and R drift
back toward the prior (weight `relax` a step): a row that stopped drafting because its
context was hard probes again once the prior's goodput beats AR, and a batch where even
the prior does not pay (a large batch) never wastes a probe. The estimates live in the
drafter's state, so `specjax.serve` resets
a slot's estimate when a new request takes it. The inner drafter is any chain drafter
(`{"drafter": name, **knobs}`); a drafter that takes a stop policy stops drafting at k*
(fewer draft forwards), any other has its drafts past k* cut.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import registry
from specjax.drafters import budget as budget_lib


def step_costs(costs: Mapping, batch: int, depth: int) -> tuple[float, ...]:
  """ms of one step that verifies k drafts at `batch` rows, k = 0..depth: verification at
  the compiled width holding k drafts (`budget.step_ms`) plus max(k, 1) draft forwards (a
  drafter with its own cache, a feature head or a draft LM, reads each step's committed
  tokens even when it drafts nothing; drafters without a network have draft_ms 0), from
  a cost file's per-batch tables (`batches`: {B: {"verify_ms": {T: ms}, "draft_ms": ms}}),
  linear in the batch size between measured ones (the nearest beyond them)."""
  table = costs.get("batches") or {"1": {"verify_ms": costs["verify_ms"],
                                         "draft_ms": costs["draft_ms"]}}
  sizes = sorted(int(b) for b in table)

  def at(b: int) -> np.ndarray:
    t = table[str(b)] if str(b) in table else table[b]
    verify = budget_lib.step_ms(t["verify_ms"], depth)
    return np.asarray(verify) + float(t["draft_ms"]) * np.maximum(np.arange(depth + 1), 1)

  rows = np.stack([at(b) for b in sizes])  # [batches, depth + 1]
  return tuple(float(np.interp(batch, sizes, rows[:, k])) for k in range(depth + 1))


def expected_tokens(accept_B: jax.Array, depth: int) -> jax.Array:
  """[B, depth + 1]: tokens a step of k drafts yields per row, 1 + a + ... + a^k."""
  powers = accept_B[:, None] ** jnp.arange(depth + 1)[None, :]
  return jnp.cumsum(powers, axis=1)


def best_length(accept_B: jax.Array, live_B: jax.Array, costs_K: jax.Array) -> jax.Array:
  """int32: the k in 0..K with the most expected tokens of the live rows per ms (the
  shortest on ties)."""
  gain_K = jnp.sum(jnp.where(live_B[:, None], expected_tokens(accept_B, costs_K.shape[0] - 1),
                             0.0), 0)
  return jnp.argmax(gain_K / costs_K).astype(jnp.int32)


@flax.struct.dataclass
class _DepthCap:
  """A stop policy that also stops at depth `k` (traced): the inner policy, capped."""
  inner: Any
  k: jax.Array

  def check(self, drafter) -> None:
    self.inner.check(drafter)

  def init(self, batch):
    return self.inner.init(batch)

  def stop(self, state, depth, q_BxKxV, hidden_BxKxH):
    stop_BxK, state = self.inner.stop(state, depth, q_BxKxV, hidden_BxKxH)
    return stop_BxK | (depth >= self.k), state


@flax.struct.dataclass
class GoodputState:
  inner: Any
  accepted_B: jax.Array  # float32[B]: moving average of accepted drafts per step
  rejected_B: jax.Array  # float32[B]: ... of rejections per step (0 or 1)
  drafted_B: jax.Array  # int32[B]: drafts the last step verified for the row

  @property
  def accept_B(self) -> jax.Array:
    """float32[B]: the per-token acceptance estimate."""
    return self.accepted_B / jnp.maximum(self.accepted_B + self.rejected_B, 1e-6)


@flax.struct.dataclass
class Goodput:
  """SmartSpec's policy around a chain drafter (module docstring)."""

  inner: Any
  costs: Any = flax.struct.field(pytree_node=False)  # the cost file's dict, as a tuple tree
  prior: float = flax.struct.field(pytree_node=False, default=0.5)
  decay: float = flax.struct.field(pytree_node=False, default=0.5)
  relax: float = flax.struct.field(pytree_node=False, default=0.05)

  @property
  def num_nodes(self) -> int:
    return self.inner.num_nodes

  @property
  def features(self) -> tuple[int, ...]:
    return self.inner.features

  @property
  def takes_stop_policy(self) -> bool:
    return self.inner.takes_stop_policy

  drafts_vary = True  # k* < K verifies a narrower width

  def validate(self, target_config) -> None:
    self.inner.validate(target_config)
    if (not 0.0 <= self.prior <= 1.0 or not 0.0 < self.decay <= 1.0
        or not 0.0 <= self.relax <= 1.0):
      raise ValueError(f"goodput: prior must be in [0, 1], decay in (0, 1] and relax in "
                       f"[0, 1]; got {self.prior}, {self.decay}, {self.relax}.")
    step_costs(_as_dict(self.costs), 1, self.num_nodes)  # the table covers the width

  def costs_at(self, batch: int) -> jax.Array:
    return jnp.asarray(step_costs(_as_dict(self.costs), batch, self.num_nodes), jnp.float32)

  def init(self, ctx, max_len, features):
    b = ctx.history.shape[0]
    return GoodputState(self.inner.init(ctx, max_len, features),
                        jnp.full((b,), self.prior, jnp.float32),
                        jnp.full((b,), 1.0 - self.prior, jnp.float32), jnp.zeros((b,), jnp.int32))

  def propose(self, state: GoodputState, ctx, stop, sampling, key):
    b = ctx.history.shape[0]
    live = jnp.ones((b,), bool) if ctx.live is None else ctx.live
    k = best_length(state.accept_B, live, self.costs_at(b))
    inner_stop = _DepthCap(stop, k) if self.takes_stop_policy else stop
    tree, inner, calls = self.inner.propose(state.inner, ctx, inner_stop, sampling, key)
    valid = tree.valid & (tree.depth() <= k)
    drafted = jnp.sum(valid, 1, dtype=jnp.int32)
    return tree.replace(valid=valid), state.replace(inner=inner, drafted_B=drafted), calls

  def commit(self, state: GoodputState, ctx, verdict, features):
    inner = self.inner.commit(state.inner, ctx, verdict, features)
    d, a = state.drafted_B, verdict.accepted_drafts.astype(jnp.float32)

    def ema(old, new, prior):
      return jnp.where(d > 0, (1 - self.decay) * old + self.decay * new,
                       (1 - self.relax) * old + self.relax * prior)
    return GoodputState(inner, ema(state.accepted_B, a, self.prior),
                        ema(state.rejected_B, (a < d).astype(jnp.float32), 1 - self.prior), d)


def _freeze(x):
  """A JSON-like dict as nested sorted tuples (hashable: a static field of a jitted arg)."""
  if isinstance(x, Mapping):
    return tuple(sorted((str(k), _freeze(v)) for k, v in x.items()))
  return float(x) if isinstance(x, (int, float, np.floating, np.integer)) else x


def _as_dict(x):
  if isinstance(x, tuple) and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str)
                                  for i in x):
    return {k: _as_dict(v) for k, v in x}
  return x


def create(inner, costs: Mapping, prior: float = 0.5, decay: float = 0.5,
           relax: float = 0.05) -> Goodput:
  """The goodput policy around a built chain drafter, with a cost file's dict."""
  return Goodput(inner, _freeze(costs), prior, decay, relax)


def _check(*, inner=None, costs=None, prior=0.5, decay=0.5, relax=0.05) -> None:
  del prior, decay, relax  # checked by validate, with the drafter built
  if not isinstance(inner, Mapping) or inner.get("drafter") in (None, "goodput"):
    raise ValueError("goodput wraps a drafter: inner={'drafter': name, **knobs}; got "
                     f"{inner!r}.")
  knobs = dict(inner)
  registry.DRAFTERS.check(knobs.pop("drafter"), None, **knobs)
  if costs is not None:
    budget_lib.read_costs(costs)


@registry.DRAFTERS.register("goodput", takes_stop_policy=True, check=_check)
def _build(target, *, inner: Mapping[str, Any], costs: str, prior: float = 0.5,
           decay: float = 0.5, relax: float = 0.05) -> Goodput:
  """SmartSpec's goodput policy around `inner` ({"drafter": name, **knobs}, a chain) with
  the cost file at `costs` (`make bench`'s costs.json, per batch size)."""
  knobs = dict(inner)
  return create(registry.DRAFTERS.build(knobs.pop("drafter"), target, **knobs),
                budget_lib.read_costs(costs), prior, decay, relax)
