"""Fitting small predictors (stop policies, SpecEE's exits) on stored examples: Adam on
random minibatches, drawn with replacement by a seeded generator."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def adam(loss_fn: Callable[..., jax.Array], params: Any, arrays: Sequence[np.ndarray], *,
         steps: int, batch_size: int, lr: float, seed: int = 0) -> tuple[Any, float]:
  """`steps` Adam steps on `loss_fn(params, *batch)`, each batch `batch_size` rows of
  every array in `arrays` (the same rows). Returns (params, the last step's loss; NaN
  after no step)."""
  tx = optax.adam(lr)

  @jax.jit
  def step(p, opt, *batch):
    loss, g = jax.value_and_grad(loss_fn)(p, *batch)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  opt = tx.init(params)
  rng = np.random.default_rng(seed)
  n = len(arrays[0])
  loss = np.nan
  for _ in range(steps):
    idx = rng.integers(0, n, min(batch_size, n))
    params, opt, loss = step(params, opt, *(jnp.asarray(a[idx]) for a in arrays))
  return params, float(loss)
