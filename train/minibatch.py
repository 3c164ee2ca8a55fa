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


def logistic(x_MxF: np.ndarray, y_M: np.ndarray, *, steps: int, batch_size: int, lr: float,
             seed: int = 0, l2: float = 1e-4) -> tuple[np.ndarray, float, float]:
  """(weights [F], bias, last loss) of a logistic classifier on standardised inputs, the
  two classes weighted to count equally, the standardisation folded into the weights (so
  `sigmoid(x @ weights + bias)` reads raw inputs)."""
  mean, std = x_MxF.mean(0), x_MxF.std(0) + 1e-6
  x = ((x_MxF - mean) / std).astype(np.float32)
  y = y_M.astype(np.float32)
  pos = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
  w_pos, w_neg = 0.5 / pos, 0.5 / (1 - pos)

  def loss_fn(p, xb, yb):
    z = xb @ p["w"] + p["b"]
    weight = jnp.where(yb > 0, w_pos, w_neg)
    return (jnp.mean(weight * optax.sigmoid_binary_cross_entropy(z, yb))
            + l2 * jnp.sum(p["w"] ** 2))

  params = {"w": jnp.zeros((x.shape[1],)), "b": jnp.zeros(())}
  params, loss = adam(loss_fn, params, (x, y), steps=steps, batch_size=batch_size, lr=lr,
                      seed=seed)
  w = np.asarray(params["w"]) / std
  return w.astype(np.float32), float(params["b"]) - float(np.sum(w * mean)), loss


def roc_auc(p_M: np.ndarray, y_M: np.ndarray) -> float:
  """The chance that a random positive scores above a random negative (ties count half):
  a threshold-free measure of how well `p` separates the classes (0.5 = chance)."""
  pos, neg = p_M[y_M], p_M[~y_M]
  if not len(pos) or not len(neg):
    return float("nan")
  return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def classifier_metrics(p_M: np.ndarray, y_M: np.ndarray, threshold: float) -> dict:
  """Precision and recall of `p > threshold` against boolean labels, and its positive
  rate."""
  pred = p_M > threshold
  tp = float((pred & y_M).sum())
  return {"precision": tp / max(int(pred.sum()), 1), "recall": tp / max(int(y_M.sum()), 1),
          "positive_rate": float(pred.mean()) if len(pred) else 0.0}
