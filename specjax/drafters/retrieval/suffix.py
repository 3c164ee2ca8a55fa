"""SuffixDecoding (Oliaro et al., 2024): drafts from the continuations of the longest
suffix matches, in the request so far and in a corpus of earlier outputs.

The reference (ArcticInference) keeps count tries of substrings up to 64 tokens: one over
the request (prompt + output) and one over earlier outputs of the workload. For every
match length m of the last tokens it walks from the matched node along the most frequent
child, for at most min(max_spec, alpha * m) tokens, while the node's probability (the
product of child / parent count ratios along the walk, i.e. count(pattern + draft) /
count(pattern)) stays >= min_prob; a draft's score is the sum of its nodes'
probabilities; the best draft over both tries and every m wins (ties: the longer match,
then the request's own trie).

Here the tries are implicit, so everything runs inside the jitted loop with static shapes:
a trie node is the set of positions where its substring ends, and a child's count is how
many of them are followed by its token. Per step and per source (the request's history
[B, L]; the corpus [C], shared by the batch) we compute every position's suffix-match
length against the last 64 tokens (64 x L compares), keep the `occurrences` positions
with the longest matches (ties: the most recent), read the `depth` tokens after each, and
walk all 64 match lengths at once: at each depth a position is still on the walk when
its match is at least m and its continuation so far equals the draft's; the most frequent
next token among them is the draft's next token. That is one [64, K] x [K, K] count per
depth. Departure from the reference: when more than `occurrences` positions match a short
pattern, its counts come from the K longest-matching ones (a biased sample of a frequent
pattern; drafts from such patterns are rarely kept, their probabilities being low).

The corpus grows between calls: `generate` returns the state and `drafter.carry(output)`
appends each row's output (FIFO: the oldest tokens fall out past `corpus_size`);
`with_corpus` / `save_corpus` load and store it as token-id files. Drafts are
deterministic (q one-hot at T > 0): lossless with greedy and speculative verification.
"""

from __future__ import annotations

import os
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import registry
from specjax.drafters import budget as budget_lib
from specjax.tree import DraftTree

_SEP = -1  # between documents of the corpus, and padding: never equals a token


def _match_lengths(x_P, end_P, suffix_M, suffix_len):
  """int32[P]: for each position j, the longest m <= M with x[j-m+1..j] equal to the
  pattern's last m tokens (`suffix_M[i]` = the pattern's i-th token from the end; the
  pattern has `suffix_len` tokens). Positions past `end_P` (False) match nothing."""
  m, p = suffix_M.shape[0], x_P.shape[0]
  idx_MxP = jnp.arange(p)[None] - jnp.arange(m)[:, None]
  shifted_MxP = jnp.where(idx_MxP >= 0, x_P[jnp.maximum(idx_MxP, 0)], _SEP)
  ok_MxP = ((shifted_MxP == suffix_M[:, None]) & (jnp.arange(m)[:, None] < suffix_len)
            & end_P[None] & (shifted_MxP != _SEP))
  return jnp.sum(jnp.cumprod(ok_MxP.astype(jnp.int32), 0), 0)


def _walk(x_P, n_P, suffix_M, suffix_len, *, depth, occurrences, alpha, min_prob):
  """The best draft from one source `x_P` (valid before `n_P`): (tokens[depth],
  probs[depth], score, match length); probs[d] is node d's probability, 0 past the draft."""
  p = x_P.shape[0]
  m_max = suffix_M.shape[0]
  valid_P = jnp.arange(p) < n_P
  ml_P = _match_lengths(x_P, valid_P, suffix_M, suffix_len)
  k = min(occurrences, p)
  # The K positions with the longest matches, the most recent first among equals.
  _, pos_K = jax.lax.top_k(ml_P * p + jnp.arange(p), k)
  ml_K = ml_P[pos_K]
  cont_KxD = pos_K[:, None] + 1 + jnp.arange(depth)
  win_KxD = jnp.where(cont_KxD < n_P, x_P[jnp.minimum(cont_KxD, p - 1)], _SEP)
  lens_M = jnp.arange(1, m_max + 1)
  on_MxK = ml_K[None] >= lens_M[:, None]  # positions matching each pattern length m
  n0_M = jnp.sum(on_MxK, -1)
  budget_M = jnp.minimum(jnp.floor(alpha * lens_M).astype(jnp.int32), depth)
  budget_M = jnp.minimum(budget_M, m_max - lens_M)  # the tries hold substrings <= M

  def step(carry, d):
    on_MxK, alive_M, score_M = carry
    tok_K = win_KxD[:, d]
    same_KxK = (tok_K[:, None] == tok_K[None]) & (tok_K[:, None] != _SEP)
    count_MxK = jnp.where(on_MxK & (tok_K != _SEP)[None],
                          jnp.einsum("mk,jk->mj", on_MxK.astype(jnp.float32),
                                     same_KxK.astype(jnp.float32)), 0.0)
    best_M = jnp.argmax(count_MxK, -1)
    tok_M = tok_K[best_M]
    prob_M = jnp.max(count_MxK, -1) / jnp.maximum(n0_M, 1)
    alive_M = alive_M & (prob_M >= min_prob) & (prob_M > 0) & (d < budget_M)
    prob_M = jnp.where(alive_M, prob_M, 0.0)
    score_M = score_M + prob_M
    on_MxK = on_MxK & (tok_K[None] == tok_M[:, None])
    return (on_MxK, alive_M, score_M), (tok_M, prob_M)

  init = (on_MxK, n0_M > 0, jnp.zeros(m_max, jnp.float32))
  (_, _, score_M), (tok_DxM, prob_DxM) = jax.lax.scan(step, init, jnp.arange(depth))
  # Best score; among equals the longest match (the last index of the maximum).
  best = m_max - 1 - jnp.argmax(score_M[::-1])
  return tok_DxM[:, best], prob_DxM[:, best], score_M[best], best + 1


@flax.struct.dataclass
class SuffixDecoding:
  corpus: jax.Array  # int32[C]: earlier outputs, separated (and left-padded) by -1
  depth: int = flax.struct.field(pytree_node=False, default=16)  # max_spec
  max_match: int = flax.struct.field(pytree_node=False, default=64)  # the tries' depth
  alpha: float = flax.struct.field(pytree_node=False, default=1.0)
  min_prob: float = flax.struct.field(pytree_node=False, default=0.1)
  occurrences: int = flax.struct.field(pytree_node=False, default=64)
  # ms of a step verifying d = 0..depth drafts (`budget.step_ms`): when given, a draft is
  # cut to the length with the most expected tokens per ms (1 + the sum of its nodes'
  # probabilities, over the step's cost), 0 when AR's step is better. Ours, not the paper's.
  step_ms: tuple[float, ...] | None = flax.struct.field(pytree_node=False, default=None)
  takes_stop_policy = False
  merges = True  # commit needs no tree of its own (`drafters.hybrid`)
  drafts_vary = True  # no match, no draft: the step verifies the root alone
  features = ()

  @property
  def num_nodes(self) -> int:
    return self.depth

  def validate(self, target_config) -> None:
    if self.depth < 1 or self.max_match < 2 or self.occurrences < 1:
      raise ValueError(f"SuffixDecoding needs depth >= 1, max_match >= 2 and occurrences "
                       f">= 1; got {self.depth}, {self.max_match}, {self.occurrences}.")
    if self.step_ms is not None and len(self.step_ms) != self.depth + 1:
      raise ValueError(f"step_ms needs the cost of verifying 0..{self.depth} drafts "
                       f"({self.depth + 1} values); got {len(self.step_ms)}.")
    if not 0 <= self.min_prob <= 1 or self.alpha <= 0:
      raise ValueError(f"SuffixDecoding needs 0 <= min_prob <= 1 and alpha > 0; got "
                       f"{self.min_prob}, {self.alpha}.")
    if self.corpus.ndim != 1 or self.corpus.shape[0] < 1:
      raise ValueError(f"The corpus must be a non-empty 1-D token array; got shape "
                       f"{self.corpus.shape}.")
    if int(jnp.max(self.corpus)) >= target_config.vocab_size:
      raise ValueError(f"The corpus holds token ids >= the target's vocabulary size "
                       f"{target_config.vocab_size}: it was built with another tokenizer.")

  def init(self, ctx, max_len, features):
    return ()

  def propose(self, state, ctx, stop, sampling, key):
    hist_BxL, len_B = ctx.history, ctx.length
    b = hist_BxL.shape[0]
    back_M = len_B[:, None] - 1 - jnp.arange(self.max_match)
    suffix_BxM = jnp.where(back_M >= 0, jnp.take_along_axis(hist_BxL, jnp.maximum(back_M, 0), 1),
                           _SEP)
    walk = lambda x, n, s, sl: _walk(x, n, s, sl, depth=self.depth,
                                     occurrences=self.occurrences, alpha=self.alpha,
                                     min_prob=self.min_prob)
    own = jax.vmap(walk)(hist_BxL, len_B, suffix_BxM, len_B)
    glob = jax.vmap(walk, in_axes=(None, None, 0, 0))(
        self.corpus, self.corpus.shape[0], suffix_BxM, len_B)
    # The better score wins; ties go to the longer match, then to the request.
    use_glob_B = (glob[2] > own[2]) | ((glob[2] == own[2]) & (glob[3] > own[3]))
    pick = lambda o, g: jnp.where(use_glob_B.reshape((b,) + (1,) * (o.ndim - 1)), g, o)
    tokens_BxD, probs_BxD = pick(own[0], glob[0]), pick(own[1], glob[1])
    count_B = jnp.sum(probs_BxD > 0, -1)
    if self.step_ms is not None:  # expected tokens per ms of drafting d = 0..depth
      gain_BxD1 = 1 + jnp.pad(jnp.cumsum(probs_BxD, -1), ((0, 0), (1, 0)))
      rate_BxD1 = gain_BxD1 / jnp.asarray(self.step_ms)
      rate_BxD1 = jnp.where(jnp.arange(self.depth + 1) <= count_B[:, None], rate_BxD1, -1.0)
      count_B = jnp.argmax(rate_BxD1, -1)
    valid_BxD = jnp.arange(self.depth) < count_B[:, None]
    return (DraftTree.chain(jnp.where(valid_BxD, tokens_BxD, 0), valid_BxD), state,
            jnp.zeros(b, jnp.int32))

  def commit(self, state, ctx, verdict, features):
    return state

  def carry(self, output) -> "SuffixDecoding":
    """This drafter with `output`'s rows appended to its corpus (the oldest tokens fall
    out past the corpus size)."""
    return self.with_corpus(output.token_lists(), append=True)

  def with_corpus(self, docs: Sequence[Sequence[int]], append: bool = False
                  ) -> "SuffixDecoding":
    """This drafter with the corpus `docs` (token-id lists), after the current one when
    `append`; the newest `corpus_size` tokens are kept."""
    size = self.corpus.shape[0]
    parts = [np.asarray(self.corpus)] if append else []
    for doc in docs:
      parts += [np.full(1, _SEP, np.int32), np.asarray(doc, np.int32)]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    flat = np.concatenate([np.full(size, _SEP, np.int32), flat])[-size:]
    return self.replace(corpus=jnp.asarray(flat))

  def save_corpus(self, path: str) -> None:
    """Writes the corpus as a .npy file of token ids (-1 between documents)."""
    np.save(path, np.asarray(self.corpus))


def load_corpus(path: str) -> np.ndarray:
  """A corpus written by `save_corpus` (a .npy file of token ids, -1 between documents)."""
  if not os.path.exists(path):
    raise ValueError(f"No SuffixDecoding corpus at {path!r}.")
  corpus = np.load(path)
  if corpus.ndim != 1 or not np.issubdtype(corpus.dtype, np.integer) or corpus.min() < _SEP:
    raise ValueError(f"{path!r} is not a SuffixDecoding corpus: expected a 1-D array of "
                     "token ids with -1 between documents.")
  return corpus.astype(np.int32)


@registry.DRAFTERS.register("suffix", takes_stop_policy=False)
def _build(target, *, depth: int = 16, max_match: int = 64, alpha: float = 1.0,
           min_prob: float = 0.1, occurrences: int = 64, corpus_size: int = 16384,
           corpus: str | None = None, budget: str | None = None) -> SuffixDecoding:
  """SuffixDecoding: suffix-match drafts from the request and a corpus of earlier outputs
  (`corpus`: a file written by `save_corpus`; it grows as calls are carried). `budget`: a
  cost file (`make bench`'s costs.json) to cut drafts to what pays on that device."""
  del target
  step_ms = None
  if budget:
    step_ms = budget_lib.step_ms(budget_lib.read_costs(budget)["verify_ms"], depth)
  d = SuffixDecoding(jnp.full((corpus_size,), _SEP, jnp.int32), depth, max_match, alpha,
                     min_prob, occurrences, step_ms)
  if corpus is not None:
    flat = load_corpus(corpus)
    d = d.replace(corpus=jnp.asarray(np.concatenate(
        [np.full(corpus_size, _SEP, np.int32), flat])[-corpus_size:]))
  return d
