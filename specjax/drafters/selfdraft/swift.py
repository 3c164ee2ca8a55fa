"""SWIFT (Xia et al., 2024): on-the-fly self-speculation that skips some of the target's
own attention and MLP sub-layers.

The draft is the target with a skip set: each of the 2(L-2) sub-layers of layers 1..L-2
(the first and last layers always run) is skipped or not, about `ratio` of them skipped.
The skip set is searched while decoding, in the first steps of a stream of prompts: each
step tries one candidate set, scored by its *matchness* (the share of the last `window`
committed tokens that the skipping forward predicts, teacher-forced in one forward over
the target's own cache), and keeps the best. Candidates are random sets, and every
`bo_every`-th one comes from Bayesian optimisation: a Gaussian process over the sets tried
so far (a kernel on their Hamming distance) picks, from a pool of random sets, the one of
the highest upper confidence bound. The search stops at matchness > `target_match`, after
`patience` tries without improvement, or `max_iterations` tries in all, and what it found
is carried to the next call (`carry`: the search state travels in `generate`'s output).

Drafting reads the target's committed KV cache (`Context.cache`) and writes the draft
tokens' keys/values past it in a copy, one token a forward through `models.skip`; it
stops when the top-1 probability falls under `threshold`. The tree is the top-1 chain
plus the next `alternatives` ranked tokens beside each of its nodes. Skip sets are traced
values: a new one never recompiles. Drafts are deterministic picks (q one-hot), so greedy
and speculative verification are lossless.

Departures from the reference: one skip set serves the whole batch (matchness is the
batch's mean); the acquisition is an upper confidence bound, and the Gaussian process sees
the last `history` sets tried.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import registry
from specjax.models import skip as skip_lib
from specjax.models.config import ModelConfig
from specjax.models.model import Model, causal
from specjax.tree import DraftTree


@flax.struct.dataclass
class SwiftSearch:
  """The skip-set search: what `generate` returns and the next call starts from."""
  mask: jax.Array  # bool[L, 2]: the skip set drafts use (the best so far)
  score: jax.Array  # float32[]: its matchness when it was tried
  iteration: jax.Array  # int32[]: candidates tried
  stale: jax.Array  # int32[]: tries since the best last improved
  tried: jax.Array  # bool[H, L, 2]: the last H candidates
  tried_score: jax.Array  # float32[H]: their matchness (-1: empty slot)
  done: jax.Array  # bool[]: the search has stopped


def eligible(num_layers: int) -> np.ndarray:
  """bool[L, 2]: the sub-layers a skip set may skip (layers 1..L-2)."""
  out = np.zeros((num_layers, 2), bool)
  out[1:num_layers - 1] = True
  return out


def num_skipped(num_layers: int, ratio: float) -> int:
  return int(round(ratio * 2 * (num_layers - 2)))


def evenly_spaced(num_layers: int, ratio: float) -> np.ndarray:
  """bool[L, 2]: the starting skip set: `ratio` of the eligible sub-layers, evenly spaced."""
  e = np.flatnonzero(eligible(num_layers).reshape(-1))
  k = num_skipped(num_layers, ratio)
  out = np.zeros(2 * num_layers, bool)
  out[e[np.round(np.linspace(0, len(e) - 1, k)).astype(int)] if k else []] = True
  return out.reshape(num_layers, 2)


def random_sets(key, num_layers: int, k: int, n: int) -> jax.Array:
  """bool[n, L, 2]: n random skip sets of k eligible sub-layers each."""
  ok = jnp.asarray(eligible(num_layers).reshape(-1))
  u = jnp.where(ok, jax.random.uniform(key, (n, 2 * num_layers)), -1.0)
  rank = jnp.argsort(jnp.argsort(-u, -1), -1)
  return (rank < k).reshape(n, num_layers, 2) & ok.reshape(num_layers, 2)


def gp_pick(tried, tried_score, pool, lengthscale: float):
  """The pool's set with the highest upper confidence bound (mean + 2 std) under a
  Gaussian process on the tried sets' matchness (kernel exp(-hamming / lengthscale))."""
  f = lambda m: m.reshape(m.shape[0], -1).astype(jnp.float32)
  x, p = f(tried), f(pool)
  have = tried_score >= 0
  hamming = lambda a, b: jnp.sum(a, -1)[:, None] + jnp.sum(b, -1)[None] - 2 * a @ b.T
  kern = lambda a, b: jnp.exp(-hamming(a, b) / lengthscale)
  mean = jnp.sum(jnp.where(have, tried_score, 0)) / jnp.maximum(jnp.sum(have), 1)
  y = jnp.where(have, tried_score - mean, 0.0)
  k_xx = kern(x, x) * (have[:, None] & have[None]) + jnp.diag(jnp.where(have, 1e-3, 1.0))
  k_px = kern(p, x) * have[None]
  sol = jnp.linalg.solve(k_xx, jnp.concatenate([y[:, None], k_px.T], 1))
  mu = mean + k_px @ sol[:, 0]
  var = jnp.maximum(1.0 - jnp.sum(k_px * sol[:, 1:].T, -1), 1e-9)
  return pool[jnp.argmax(mu + 2 * jnp.sqrt(var))]


@flax.struct.dataclass
class Swift:
  params: Any
  config: ModelConfig = flax.struct.field(pytree_node=False)
  search: SwiftSearch
  depth: int = flax.struct.field(pytree_node=False, default=8)
  alternatives: int = flax.struct.field(pytree_node=False, default=1)
  threshold: float = flax.struct.field(pytree_node=False, default=0.8)
  ratio: float = flax.struct.field(pytree_node=False, default=0.45)
  window: int = flax.struct.field(pytree_node=False, default=32)
  bo_every: int = flax.struct.field(pytree_node=False, default=25)
  target_match: float = flax.struct.field(pytree_node=False, default=0.95)
  patience: int = flax.struct.field(pytree_node=False, default=300)
  max_iterations: int = flax.struct.field(pytree_node=False, default=1000)
  takes_stop_policy = False  # its own confidence stop; drafts are deterministic picks
  drafts_vary = True
  merges = True  # commit keeps nothing of its tree
  features = ()

  @classmethod
  def create(cls, target: Model, history: int = 64, **knobs) -> "Swift":
    """A SWIFT drafter for `target`, its search starting from an evenly spaced skip set."""
    skip_lib.check(target.config, "SWIFT")
    l = target.config.num_layers
    d = cls(target.params, target.config, None, **knobs)  # knobs first: ratio
    start = jnp.asarray(evenly_spaced(l, d.ratio))
    search = SwiftSearch(start, jnp.float32(-1), jnp.int32(0), jnp.int32(0),
                         jnp.zeros((history, l, 2), bool), jnp.full((history,), -1.0),
                         jnp.asarray(False))
    return d.replace(search=search)

  @property
  def num_nodes(self) -> int:
    return self.depth * (1 + self.alternatives)

  def validate(self, target_config: ModelConfig) -> None:
    skip_lib.check(target_config, "SWIFT")
    if target_config.num_layers != self.config.num_layers or (
        target_config.vocab_size != self.config.vocab_size):
      raise ValueError("This SWIFT drafter was made for another target.")
    if target_config.num_layers < 3:
      raise ValueError("SWIFT needs a target of at least 3 layers (the first and last "
                       "always run).")
    if self.depth < 1 or self.alternatives < 0 or self.window < 1:
      raise ValueError(f"SWIFT needs depth >= 1, alternatives >= 0 and window >= 1; got "
                       f"{self.depth}, {self.alternatives}, {self.window}.")
    if not 0 < self.ratio < 1 or not 0 <= self.threshold <= 1:
      raise ValueError(f"SWIFT needs 0 < ratio < 1 and 0 <= threshold <= 1; got "
                       f"{self.ratio}, {self.threshold}.")

  def init(self, ctx, max_len, features) -> SwiftSearch:
    return self.search

  def matchness(self, mask, ctx) -> jax.Array:
    """float32[]: the share of the last `window` committed tokens the skipping forward
    predicts from the ones before them (teacher-forced, over the target's cache)."""
    w = self.window
    start_B = jnp.maximum(ctx.length - 1 - w, 0)
    idx_BxW = start_B[:, None] + jnp.arange(w)
    clip = lambda i: jnp.minimum(i, ctx.history.shape[1] - 1)
    tokens = jnp.take_along_axis(ctx.history, clip(idx_BxW), 1)
    nxt = jnp.take_along_axis(ctx.history, clip(idx_BxW + 1), 1)
    real = idx_BxW + 1 < ctx.length[:, None]
    out = skip_lib.forward_skipping(self.config, self.params, tokens, idx_BxW, causal(w),
                                    ctx.cache.replace(lengths=start_B), mask)
    hit = (jnp.argmax(out.logits, -1) == nxt) & real
    return jnp.sum(hit) / jnp.maximum(jnp.sum(real), 1)

  def _search_step(self, s: SwiftSearch, ctx, key) -> SwiftSearch:
    l = self.config.num_layers
    k = num_skipped(l, self.ratio)
    rand_key, pool_key = jax.random.split(key)
    bayes = (s.iteration % self.bo_every == self.bo_every - 1) & (jnp.sum(s.tried_score >= 0) > 1)
    cand = jax.lax.cond(
        bayes, lambda: gp_pick(s.tried, s.tried_score, random_sets(pool_key, l, k, 64),
                               max(1.0, k / 4)),
        lambda: random_sets(rand_key, l, k, 1)[0])
    score = self.matchness(cand, ctx)
    better = score > s.score
    slot = s.iteration % s.tried.shape[0]
    iteration = s.iteration + 1
    stale = jnp.where(better, 0, s.stale + 1)
    best = jnp.where(better, score, s.score)
    return SwiftSearch(jnp.where(better, cand, s.mask), best, iteration, stale,
                       s.tried.at[slot].set(cand), s.tried_score.at[slot].set(score),
                       (best > self.target_match) | (stale >= self.patience)
                       | (iteration >= self.max_iterations))

  def propose(self, state: SwiftSearch, ctx, stop, sampling, key):
    searched = (~state.done).astype(jnp.int32)  # a step of the search: one forward
    state = jax.lax.cond(state.done, lambda s: s, lambda s: self._search_step(s, ctx, key),
                         state)
    b = ctx.history.shape[0]
    a, n = self.alternatives, self.num_nodes
    root_B = ctx.history[jnp.arange(b), ctx.length - 1]

    def cond(c):
      d, alive_B = c[0], c[4]
      return (d < self.depth) & alive_B.any()

    def body(c):
      d, cache, token_B, tokens_BxN, alive_B, valid_BxN, calls_B = c
      out = skip_lib.forward_skipping(
          self.config, self.params, token_B[:, None], (ctx.length - 1 + d)[:, None],
          causal(1), cache.replace(lengths=ctx.cache.lengths + d), state.mask)
      logits_BxV = out.logits[:, 0]
      top_p, top_ids = jax.lax.top_k(jax.nn.softmax(logits_BxV, -1), 1 + a)
      calls_B = calls_B + alive_B
      alive_B = alive_B & (top_p[:, 0] >= self.threshold)
      cols = d * (1 + a) + jnp.arange(1 + a)
      tokens_BxN = tokens_BxN.at[:, cols].set(top_ids.astype(jnp.int32))
      valid_BxN = valid_BxN.at[:, cols].set(alive_B[:, None])
      return (d + 1, out.cache, top_ids[:, 0].astype(jnp.int32), tokens_BxN, alive_B,
              valid_BxN, calls_B)

    init = (jnp.int32(0), ctx.cache, root_B, jnp.zeros((b, n), jnp.int32),
            jnp.ones((b,), bool), jnp.zeros((b, n), bool), jnp.zeros((b,), jnp.int32))
    _, _, _, tokens_BxN, _, valid_BxN, calls_B = jax.lax.while_loop(cond, body, init)
    # Node d * (1 + a) + j: rank j at depth d + 1, under the top-1 node of depth d.
    depth_N = np.arange(n) // (1 + a)
    parents = np.where(depth_N == 0, -1, (depth_N - 1) * (1 + a))
    tree = DraftTree(tokens_BxN, jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (b, n)),
                     valid_BxN)
    return tree, state, calls_B + searched

  def commit(self, state: SwiftSearch, ctx, verdict, features) -> SwiftSearch:
    return state

  def carry(self, output) -> "Swift":
    """This drafter continuing the search (or using the skip set) `output`'s call ended
    with."""
    return self.replace(search=output.drafter_state)


@registry.DRAFTERS.register("swift", takes_stop_policy=False)
def _build(target: Model, *, depth: int = 8, alternatives: int = 1, threshold: float = 0.8,
           ratio: float = 0.45, window: int = 32, bo_every: int = 25,
           target_match: float = 0.95, patience: int = 300, max_iterations: int = 1000,
           history: int = 64) -> Swift:
  """SWIFT: the target skipping sub-layers, the skip set searched while decoding."""
  return Swift.create(target, history, depth=depth, alternatives=alternatives,
                      threshold=threshold, ratio=ratio, window=window, bo_every=bo_every,
                      target_match=target_match, patience=patience,
                      max_iterations=max_iterations)
