"""Drafting a `StaticTree` level by level with an autoregressive draft network.

The draft model (`draft_model.py`) and EAGLE (`eagle.py`) share this loop; they differ
only in their network's one-level `step`:

  step(tokens_BxW, parent_hidden_BxWxH, positions_BxW, cache, prefix_BxWxS)
      -> (logits_BxWxV, hidden_BxWxH, cache)

which forwards one level's W nodes (written past the committed cache at `cache.lengths`,
seeing the slots `prefix` marks and themselves) and returns their next-token logits and
hidden states. `parent_hidden` is the hidden state at each node's parent (EAGLE feeds it
back as the node's feature; a plain LM ignores it).

Level d's children are the top-ranked tokens of their parents' logits (greedy), i.i.d.
samples (sampling), or distinct samples in draw order (`Sampling.without_replacement`,
Recursive SD), expanded while the stop policy lets them; a chain is a tree of width 1.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from specjax import sampling as sampling_lib
from specjax import stopping
from specjax.tree import DraftTree, StaticTree, ancestor_mask


def draft(tree: StaticTree, step: Callable, logits_Bx1xV: jax.Array, hidden_Bx1xH: jax.Array,
          cache, pos_B: jax.Array, stop, sampling, key, valid_B: jax.Array | None = None):
  """Expands `tree` from the root's logits and hidden state.

  Args:
    tree: the topology.
    step: the network's one-level forward (see the module docstring).
    logits_Bx1xV, hidden_Bx1xH: the draft network's output at the root.
    cache: the drafter's cache; its committed `lengths` are kept, levels are written past.
    pos_B: the root's position (level d sits at pos + d + 1).
    stop, sampling, key: the stop policy, the target's sampling settings, a PRNG key.
    valid_B: sequences that may draft at all (default: all).

  Returns:
    (DraftTree, cache (same lengths), levels forwarded, draft calls [B]).
  """
  depth, w = tree.depth, tree.width
  if sampling.without_replacement:
    tree.check_rank_prefixes()
  b, v = logits_Bx1xV.shape[0], logits_Bx1xV.shape[-1]
  parent_DxW, rank_DxW, real_DxW = tree.padded()
  # Ancestor-or-self mask of the padded level layout (padding slots see only themselves).
  level_start = (np.arange(depth)[:, None] - 1) * w
  parents_N = np.where(level_start < 0, -1, level_start + parent_DxW).reshape(-1)
  anc_NxN = ancestor_mask(jnp.asarray(parents_N))
  parent_DxW, rank_DxW, real_DxW = (jnp.asarray(a) for a in (parent_DxW, rank_DxW, real_DxW))
  base_B = cache.lengths

  def children(d, logits_BxKxV, hidden_BxKxH, expand_BxK, pstate, key):
    """Level d's tokens and validity from the K parents' logits (K = 1 at the root)."""
    stop_BxK, pstate = stop.stop(pstate, d, jax.nn.softmax(logits_BxKxV, -1), hidden_BxKxH)
    expand_BxK = expand_BxK & ~stop_BxK
    par_W = parent_DxW[d]
    real_W = real_DxW[d]
    if sampling.greedy:  # top-ranked tokens of the raw logits; no distribution kept
      q_BxKxV = None
      top_BxKxR = jax.lax.top_k(logits_BxKxV, tree.max_rank + 1)[1]
      tok_BxW = top_BxKxR[:, par_W, rank_DxW[d]]
    elif sampling.without_replacement:  # distinct siblings in draw order (Recursive SD)
      q_BxKxV = sampling_lib.probs(logits_BxKxV, sampling)
      top_BxKxR, real_BxKxR = sampling_lib.sample_distinct(key, q_BxKxV, tree.max_rank + 1)
      tok_BxW = top_BxKxR[:, par_W, rank_DxW[d]]
      real_W = real_DxW[d] & real_BxKxR[:, par_W, rank_DxW[d]]  # (a top-k/p cut left few)
    else:  # i.i.d. samples from the warped distribution (SpecInfer's rule verifies them)
      q_BxKxV = sampling_lib.probs(logits_BxKxV, sampling)
      tok_BxW = jax.random.categorical(key, jnp.log(q_BxKxV[:, par_W]), axis=-1)
    valid_BxW = expand_BxK[:, par_W] & real_W
    pstate = stopping.gather(pstate, jnp.broadcast_to(par_W, (b, w)))
    return tok_BxW.astype(jnp.int32), valid_BxW, q_BxKxV, pstate

  key, sub = jax.random.split(key)
  root_ok = jnp.ones((b, 1), bool) if valid_B is None else valid_B[:, None]
  tok, valid, q_root, pstate = children(0, logits_Bx1xV, hidden_Bx1xH, root_ok,
                                        stop.init(b), sub)
  tokens_BxDxW = jnp.zeros((b, depth, w), jnp.int32).at[:, 0].set(tok)
  valid_BxDxW = jnp.zeros((b, depth, w), bool).at[:, 0].set(valid)
  # probs[:, 0] = the root's distribution, probs[:, 1 + slot] = that of padded node slot.
  probs = None if sampling.greedy else (
      jnp.zeros((b, 1 + (depth - 1) * w, v), jnp.float32).at[:, 0].set(q_root[:, 0]))
  calls = root_ok[:, 0].astype(jnp.int32)
  # Hidden states by level: [:, 0] the root's (broadcast), [:, 1 + d] level d's slots once
  # forwarded (a node's parent hidden is level d - 1's; the tree keeps them as `hidden`).
  hidden_BxDxWxH = jnp.zeros((b, depth + 1, w, hidden_Bx1xH.shape[-1]), hidden_Bx1xH.dtype)
  hidden_BxDxWxH = hidden_BxDxWxH.at[:, 0].set(hidden_Bx1xH)
  forwarded_BxDxW = jnp.zeros((b, depth, w), bool)

  def cond(loop):
    d, valid_BxDxW = loop[0], loop[3]
    return (d < depth) & valid_BxDxW[:, d - 1].any()

  def body(loop):
    (d, cache, tokens_BxDxW, valid_BxDxW, probs, calls, pstate, key, hidden_BxDxWxH,
     forwarded_BxDxW) = loop
    key, sub = jax.random.split(key)
    # Forward level d - 1 at slots base + (d-1)*w: it sees the context, its ancestors in
    # the levels above (written, not committed) and itself.
    slots = (d - 1) * w + jnp.arange(w)
    above_WxN = anc_NxN[slots] & (jnp.arange(depth * w) < (d - 1) * w)
    prefix = cache.prefix_mask(w, jnp.broadcast_to(above_WxN, (b, w, depth * w)))
    positions_BxW = jnp.broadcast_to(pos_B[:, None] + d, (b, w))
    parent_hidden = jnp.take(hidden_BxDxWxH[:, d - 1], parent_DxW[d - 1], axis=1)
    logits, hidden, cache = step(tokens_BxDxW[:, d - 1], parent_hidden, positions_BxW,
                                 cache.replace(lengths=base_B + (d - 1) * w), prefix)
    cache = cache.replace(lengths=base_B)
    live_BxW = valid_BxDxW[:, d - 1]
    calls = calls + live_BxW.any(-1)
    tok, valid, q, pstate = children(d, logits, hidden, live_BxW, pstate, sub)
    if probs is not None:
      probs = jax.lax.dynamic_update_slice_in_dim(probs, q, 1 + (d - 1) * w, axis=1)
    return (d + 1, cache, tokens_BxDxW.at[:, d].set(tok), valid_BxDxW.at[:, d].set(valid),
            probs, calls, pstate, key,
            hidden_BxDxWxH.at[:, d].set(hidden.astype(hidden_BxDxWxH.dtype)),
            forwarded_BxDxW.at[:, d - 1].set(live_BxW))

  loop = (1, cache, tokens_BxDxW, valid_BxDxW, probs, calls, pstate, key, hidden_BxDxWxH,
          forwarded_BxDxW)
  (d, cache, tokens_BxDxW, valid_BxDxW, probs, calls, _, _, hidden_BxDxWxH,
   forwarded_BxDxW) = jax.lax.while_loop(cond, body, loop)
  # The verifier's view: real nodes only, parents first.
  idx = jnp.asarray(tree.padded_index)
  parents = jnp.asarray(tree.parents, jnp.int32)
  dist = jnp.where(parents < 0, 0, 1 + idx[jnp.maximum(parents, 0)])
  per_row = lambda x: jnp.broadcast_to(x, (b, tree.num_nodes))
  nodes = lambda x: x.reshape((b, depth * w) + x.shape[3:])[:, idx]
  out = DraftTree(nodes(tokens_BxDxW), per_row(parents), nodes(valid_BxDxW), probs,
                  per_row(dist), sampled=not sampling.greedy,
                  distinct=sampling.without_replacement and not sampling.greedy,
                  hidden=nodes(hidden_BxDxWxH[:, 1:]), forwarded=nodes(forwarded_BxDxW))
  return out, cache, jnp.asarray(d - 1, jnp.int32), calls


def from_levels(tree: StaticTree, logits_BxDxV: jax.Array, sampling, key) -> DraftTree:
  """`tree` filled from one distribution per level, whatever a node's parent (drafters
  that draft every level in one forward: DFlash's block slots). A node of depth d and
  rank r takes the rank-r token of level d's logits (greedy), an i.i.d. sample of level
  d's distribution (sampling; SpecInfer's rule verifies siblings against it), or its
  parent's r-th distinct draw (`Sampling.without_replacement`, Recursive SD)."""
  b = logits_BxDxV.shape[0]
  depth_N = np.asarray(tree.node_depth) - 1
  ranks_N, parents_N = np.asarray(tree.ranks), np.asarray(tree.parents)
  per_row = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b, tree.num_nodes))
  valid = jnp.ones((b, tree.num_nodes), bool)
  if sampling.greedy:
    top_BxDxR = jax.lax.top_k(logits_BxDxV, tree.max_rank + 1)[1]
    return DraftTree(top_BxDxR[:, depth_N, ranks_N].astype(jnp.int32), per_row(parents_N),
                     valid)
  q_BxDxV = sampling_lib.probs(logits_BxDxV, sampling)
  if sampling.without_replacement:
    tree.check_rank_prefixes()
    # One draw sequence per parent (the root is parent slot 0, node i slot i + 1), from
    # the distribution of the level its children sit on.
    child_level = np.minimum(np.concatenate([[0], depth_N + 1]), q_BxDxV.shape[1] - 1)
    draws, real = sampling_lib.sample_distinct(key, q_BxDxV[:, child_level], tree.max_rank + 1)
    tokens = draws[:, parents_N + 1, ranks_N]
    valid = real[:, parents_N + 1, ranks_N]
  else:
    tokens = jax.random.categorical(key, jnp.log(q_BxDxV[:, depth_N]), axis=-1)
  return DraftTree(tokens.astype(jnp.int32), per_row(parents_N), valid, q_BxDxV,
                   per_row(depth_N), sampled=True, distinct=sampling.without_replacement)
