"""The stop-policy interface that chain drafters call once per draft step.

A policy is a `flax.struct.dataclass`: its knobs are static fields and learned policies
keep their weights in a `params` pytree field, so the whole policy passes through `jax.jit`
as an argument. Every policy implements

  init(batch) -> state
  stop(state, step, q_BxV, hidden_BxH) -> (bool[B], state)

`stop` is asked *before* the token drawn at draft position `step` (0-based) is proposed;
`q_BxV` is the draft's raw (temperature-1) next-token distribution there and `hidden_BxH`
the drafter's last hidden state. True ends that sequence's draft: the token and every
later one are not proposed. The drafter's `num_draft` is the hard cap.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax


class StopPolicy(Protocol):

  def init(self, batch: int) -> Any:
    ...

  def stop(self, state: Any, step: jax.Array, q_BxV: jax.Array,
           hidden_BxH: jax.Array) -> tuple[jax.Array, Any]:
    ...
