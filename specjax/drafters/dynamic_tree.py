"""EAGLE-2's dynamic draft tree: expand the most likely nodes, keep the best ones overall.

From the root's distribution take the top_k tokens (level 1). For each further level, the
current frontier (top_k nodes) goes through the draft network in one forward; every node's
top_k children are scored by cumulative log-probability (parent's + their own), and the
global top_k of those top_k * top_k candidates is the next frontier. After `depth` levels,
the `num_nodes` best candidates overall form the tree. A child never outscores its
parent, so the best set contains every selected node's parent; sorting by candidate index
puts parents first. Each sequence of a batch grows its own tree (per-row parents).

The network's `step` is the one `static_tree.draft` takes. Tokens are chosen
deterministically (top-k), so lossless sampling verifies them with q one-hot. A stop
policy is asked about each frontier node before it is expanded; a stopped node gets no
children.

With `Sampling.without_replacement` (acceptance="rsd") the same search becomes Recursive
SD's stochastic beam search (Kool et al.'s Gumbel-top-k over sequences): every score is a
Gumbel-perturbed cumulative log-probability under the warped draft distribution,
conditioned so that a node's children peak at exactly its own score. A child then never
outscores its parent (the best set still holds every parent), each node's kept children
are its first draws without replacement, in order, and the tree keeps the distributions
they were drawn from for verification.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from specjax import sampling as sampling_lib
from specjax.tree import DraftTree


def num_candidates(top_k: int, depth: int) -> int:
  return top_k + (depth - 1) * top_k * top_k


def _log1mexp(a):
  """log(1 - exp(a)) for a <= 0, accurate at both ends."""
  return jnp.where(a > -0.6931, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def _conditioned_gumbel(phi_xV, top_x, key):
  """Gumbel(phi) perturbations of each row's children conditioned on their maximum being
  `top_x` (the parent's perturbed score), computed stably (Kool et al. 2019, App. B)."""
  g_xV = phi_xV + jax.random.gumbel(key, phi_xV.shape)
  z_x1 = jnp.max(g_xV, -1, keepdims=True)
  t_x1 = jnp.where(jnp.isfinite(top_x), top_x, 0.0)[..., None]
  v = t_x1 - g_xV + _log1mexp(jnp.minimum(g_xV - z_x1, 0.0))
  out = t_x1 - jax.nn.relu(v) - jnp.log1p(jnp.exp(-jnp.abs(v)))
  return jnp.where(jnp.isfinite(top_x)[..., None] & jnp.isfinite(g_xV), out, -jnp.inf)


def draft(step: Callable, logits_Bx1xV, hidden_Bx1xH, cache, pos_B, *, top_k: int,
          depth: int, num_nodes: int, stop, valid_B, sampling=None, key=None):
  """Returns (DraftTree of num_nodes nodes, cache (same lengths), draft calls [B]).

  The frontier of level d (1-based) is written at cache slots base + (d - 1) * top_k.
  `sampling` with `without_replacement` (and a PRNG `key`) runs the stochastic beam search.
  """
  k = top_k
  b, v = logits_Bx1xV.shape[0], logits_Bx1xV.shape[-1]
  base_B = cache.lengths
  slots = (depth - 1) * k  # forwarded frontier slots
  c = num_candidates(k, depth)
  rows = jnp.arange(b)[:, None]
  sbs = sampling is not None and sampling.without_replacement and not sampling.greedy
  if sbs:
    # probs[:, 0]: the root's draft distribution; [:, 1 + (d-1)k + j]: frontier slot j of
    # level d's. cand_dist: the row each candidate was drawn from.
    q_root = sampling_lib.probs(logits_Bx1xV[:, 0], sampling)
    probs = jnp.zeros((b, 1 + slots, v), jnp.float32).at[:, 0].set(q_root)
    cand_dist = jnp.zeros((b, c), jnp.int32)
    key, sub = jax.random.split(key)
    score, tok = jax.lax.top_k(_conditioned_gumbel(jnp.log(q_root), jnp.zeros((b,)), sub), k)
    phi = jnp.log(q_root)[rows, tok]  # the true cumulative log-probabilities
  else:
    score, tok = jax.lax.top_k(jax.nn.log_softmax(logits_Bx1xV[:, 0], -1), k)
  score = jnp.where(valid_B[:, None], score, -jnp.inf)
  cand_tok = jnp.zeros((b, c), jnp.int32).at[:, :k].set(tok)
  cand_score = jnp.full((b, c), -jnp.inf).at[:, :k].set(score)
  cand_parent = jnp.full((b, c), -1, jnp.int32)
  front_idx = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
  front_hidden = jnp.broadcast_to(hidden_Bx1xH, (b, k, hidden_Bx1xH.shape[-1]))
  anc_BxKxS = jnp.zeros((b, k, slots), bool)  # strict ancestors among forwarded slots
  pstate = stop.init(b)
  pstate = jax.tree.map(lambda x: jnp.repeat(x, k, axis=1), pstate)
  calls = valid_B.astype(jnp.int32)
  # Each forwarded candidate's hidden state (the tree's `hidden`).
  cand_hidden = jnp.zeros((b, c, hidden_Bx1xH.shape[-1]), hidden_Bx1xH.dtype)
  cand_forwarded = jnp.zeros((b, c), bool)
  for d in range(1, depth):
    prefix = cache.prefix_mask(k, anc_BxKxS)
    logits, hidden, cache = step(tok, front_hidden, jnp.broadcast_to(pos_B[:, None] + d, (b, k)),
                                 cache.replace(lengths=base_B + (d - 1) * k), prefix)
    cache = cache.replace(lengths=base_B)
    live = jnp.isfinite(score)
    calls = calls + live.any(-1)
    cand_hidden = cand_hidden.at[rows, front_idx].set(hidden.astype(cand_hidden.dtype))
    cand_forwarded = cand_forwarded.at[rows, front_idx].set(live)
    stop_BxK, pstate = stop.stop(pstate, d, jax.nn.softmax(logits, -1), hidden)
    off = k + (d - 1) * k * k
    if sbs:
      q_BxKxV = sampling_lib.probs(logits, sampling)
      probs = jax.lax.dynamic_update_slice_in_dim(probs, q_BxKxV, 1 + (d - 1) * k, axis=1)
      cand_dist = cand_dist.at[:, off:off + k * k].set(
          jnp.repeat(1 + (d - 1) * k + jnp.arange(k, dtype=jnp.int32), k)[None])
      key, sub = jax.random.split(key)
      phi_BxKxV = phi[..., None] + jnp.log(q_BxKxV)
      child, child_tok = jax.lax.top_k(_conditioned_gumbel(phi_BxKxV, score, sub), k)
      child_phi = jnp.take_along_axis(phi_BxKxV, child_tok, -1)
      cum = jnp.where((live & ~stop_BxK)[..., None], child, -jnp.inf)
    else:
      child_score, child_tok = jax.lax.top_k(jax.nn.log_softmax(logits, -1), k)  # [B, K, K]
      cum = jnp.where((live & ~stop_BxK)[..., None], score[..., None] + child_score, -jnp.inf)
    cand_tok = cand_tok.at[:, off:off + k * k].set(child_tok.reshape(b, -1))
    cand_score = cand_score.at[:, off:off + k * k].set(cum.reshape(b, -1))
    cand_parent = cand_parent.at[:, off:off + k * k].set(jnp.repeat(front_idx, k, axis=1))
    # The next frontier: the global top_k children.
    score, q = jax.lax.top_k(cum.reshape(b, -1), k)
    par = q // k  # the parent's frontier slot
    if sbs:
      phi = child_phi.reshape(b, -1)[rows, q]
    tok = child_tok.reshape(b, -1)[rows, q]
    front_idx = (off + q).astype(jnp.int32)
    front_hidden = hidden[rows, par]
    own = jax.nn.one_hot((d - 1) * k + par, slots, dtype=bool)
    anc_BxKxS = anc_BxKxS[rows, par] | own
    pstate = jax.tree.map(lambda x: x[rows, par], pstate)
  # The best num_nodes candidates, in candidate order (parents first).
  best_score, sel = jax.lax.top_k(cand_score, num_nodes)
  order = jnp.argsort(sel, axis=-1)
  sel, best_score = jnp.take_along_axis(sel, order, 1), jnp.take_along_axis(best_score, order, 1)
  parent_cand = cand_parent[rows, sel]
  hit = sel[:, None, :] == parent_cand[:, :, None]  # [B, N, N]: node j is node i's parent
  parents = jnp.where(parent_cand < 0, -1, jnp.argmax(hit, -1)).astype(jnp.int32)
  valid = jnp.isfinite(best_score) & ((parent_cand < 0) | hit.any(-1))
  extra = dict(probs=probs, dist=cand_dist[rows, sel], sampled=True, distinct=True
               ) if sbs else {}
  return DraftTree(cand_tok[rows, sel], parents, valid, hidden=cand_hidden[rows, sel],
                   forwarded=cand_forwarded[rows, sel], **extra), cache, calls
