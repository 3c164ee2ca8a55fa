"""Acceptance rules: which path of a draft tree the target keeps, and the next token.

One walk serves every rule. Nodes are visited in index order (parents first); a node is
tried when its parent is the current accepted node. The rule decides acceptance and how
the target distribution at the current node changes after a rejection; when no child of
the current node survives, the next token is drawn from that (residual) distribution.

- "greedy": the target distribution is one-hot on its argmax, so a child is accepted iff
  it equals the argmax and the next token is the argmax. Lossless (equals greedy AR).
- "speculative": accept x with prob min(1, p(x)/q(x)); on rejection p <- norm(max(0, p-q)).
  For chains this is Leviathan/Chen speculative sampling; for trees it is SpecInfer's
  multi-round rule (q one-hot for deterministically chosen children, i.e. accept with
  p(x), then zero p(x) and renormalise). Lossless for the warped target distribution.
- "typical" (Medusa): accept x if p(x) > min(eps, delta * exp(-H(p))). LOSSY.
- "fuzzy" (FSD): accept while Div(p, q) <= threshold (KL, JS or TV between the target and
  draft next-token distributions); the correction token is drawn from p. LOSSY.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from specjax import sampling as sampling_lib
from specjax.tree import DraftTree


@dataclasses.dataclass(frozen=True)
class Acceptance:
  """An acceptance rule and its knobs. Build with `get(name, **kw)`."""

  name: str = "greedy"
  eps: float = 0.09  # typical
  delta: float = 0.3  # typical
  divergence: str = "js"  # fuzzy: "kl", "js" or "tv"
  threshold: float = 0.4  # fuzzy

  @property
  def lossless(self) -> bool:
    return self.name in ("greedy", "speculative")


RULES = ("greedy", "speculative", "typical", "fuzzy")
DIVERGENCES = ("kl", "js", "tv")


def get(name: str | Acceptance, **kw) -> Acceptance:
  if isinstance(name, Acceptance):
    return name
  if name not in RULES:
    raise ValueError(f"Unknown acceptance rule {name!r}; choose from {RULES} "
                     "(typical and fuzzy are lossy).")
  rule = Acceptance(name, **kw)
  if rule.divergence not in DIVERGENCES:
    raise ValueError(f"Unknown divergence {rule.divergence!r}; choose from {DIVERGENCES}.")
  return rule


class Verdict(NamedTuple):
  path: jax.Array  # int32[B, N]: accepted node indices, in order; entries >= n are junk
  num_accepted: jax.Array  # int32[B]: accepted draft tokens (bonus not counted)
  next_token: jax.Array  # int32[B]: bonus (all accepted) or correction token


def _entropy(p_BxV):
  return -jnp.sum(jnp.where(p_BxV > 0, p_BxV * jnp.log(p_BxV), 0.0), -1)


def divergence(p_BxV, q_BxV, kind: str) -> jax.Array:
  """KL(p || q), Jensen-Shannon or total variation between two distributions."""
  def kl(a, b):
    return jnp.sum(jnp.where(a > 0, a * (jnp.log(a) - jnp.log(jnp.maximum(b, 1e-30))), 0.), -1)
  if kind == "kl":
    return kl(p_BxV, q_BxV)
  if kind == "js":
    m = 0.5 * (p_BxV + q_BxV)
    return 0.5 * kl(p_BxV, m) + 0.5 * kl(q_BxV, m)
  return 0.5 * jnp.sum(jnp.abs(p_BxV - q_BxV), -1)


def verify(rule: Acceptance, tree: DraftTree, target_logits_BxTxV: jax.Array,
           s: sampling_lib.Sampling, key: jax.Array) -> Verdict:
  """Walks the tree against the target logits of [root, node_0, ..., node_{N-1}]."""
  if rule.name == "greedy" and not s.greedy:
    raise ValueError("acceptance='greedy' needs temperature 0; use 'speculative' to sample.")
  b, n = tree.tokens.shape
  v = target_logits_BxTxV.shape[-1]
  p_BxTxV = sampling_lib.probs(target_logits_BxTxV, s)
  if rule.name == "typical":  # Medusa thresholds the (temperature) softmax, not its top-k cut
    p_raw_BxTxV = jax.nn.softmax(target_logits_BxTxV / max(s.temperature, 1e-6), -1)
    typical_ok_BxT = jnp.minimum(rule.eps, rule.delta * jnp.exp(-_entropy(p_raw_BxTxV)))
  u_key, next_key = jax.random.split(key)
  u_BxN = jax.random.uniform(u_key, (b, n))
  rows = jnp.arange(b)

  def body(i, carry):
    cur_B, p_BxV, path_BxN, n_B = carry
    x_B = tree.tokens[:, i]
    if tree.probs is None or not tree.sampled:
      q_BxV = jax.nn.one_hot(x_B, v, dtype=jnp.float32)
    else:
      q_BxV = tree.probs[:, i]
    tried_B = tree.valid[:, i] & (tree.parents[:, i] == cur_B)
    p_x, q_x = p_BxV[rows, x_B], q_BxV[rows, x_B]
    if rule.name in ("greedy", "speculative"):
      accept_B = u_BxN[:, i] * q_x < p_x
      residual = jnp.maximum(p_BxV - q_BxV, 0.0)
      mass = jnp.sum(residual, -1, keepdims=True)
      rejected_p = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_BxV)
    elif rule.name == "typical":
      cur_p_raw = p_raw_BxTxV[rows, cur_B + 1]
      accept_B = cur_p_raw[rows, x_B] > typical_ok_BxT[rows, cur_B + 1]
      rejected_p = p_BxV
    else:  # fuzzy: q is the draft's real distribution even for deterministic picks
      q_real = q_BxV if tree.probs is None else tree.probs[:, i]
      accept_B = divergence(p_BxTxV[rows, cur_B + 1], q_real, rule.divergence) <= rule.threshold
      rejected_p = p_BxV
    accept_B = tried_B & accept_B
    rejected_B = tried_B & ~accept_B
    new_p = jnp.where(accept_B[:, None], p_BxTxV[:, i + 1],
                      jnp.where(rejected_B[:, None], rejected_p, p_BxV))
    path_BxN = path_BxN.at[rows, jnp.minimum(n_B, n - 1)].set(
        jnp.where(accept_B, i, path_BxN[rows, jnp.minimum(n_B, n - 1)]))
    return (jnp.where(accept_B, i, cur_B), new_p, path_BxN, n_B + accept_B)

  init = (jnp.full((b,), -1, jnp.int32), p_BxTxV[:, 0], jnp.zeros((b, n), jnp.int32),
          jnp.zeros((b,), jnp.int32))
  _, p_final, path, num = jax.lax.fori_loop(0, n, body, init) if n else init
  return Verdict(path, num, sampling_lib.sample(next_key, p_final, s))
