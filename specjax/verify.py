"""Acceptance rules: which path of a draft tree the target keeps, and the next token.

One walk serves every rule. Nodes are visited in index order (parents first); a node is
tried when its parent is the current accepted node. The rule decides acceptance and, for
speculative sampling, how the target distribution at the current node changes after a
rejection; when no child of the current node survives, the next token is drawn from that
(residual) distribution.

- "greedy": a child is accepted iff it equals the target's argmax, and the next token is
  the argmax. Lossless (equals greedy AR). Works on argmaxes only: no softmax over V.
- "speculative": accept x with prob min(1, p(x)/q(x)); on rejection p <- norm(max(0, p-q)).
  For chains this is Leviathan/Chen speculative sampling; for trees it is SpecInfer's
  multi-round rule (q one-hot for deterministically chosen children, i.e. accept with
  p(x), then zero p(x) and renormalise). Lossless for the warped target distribution.
- "rsd" (Recursive SD): the drafter draws each node's children without replacement
  (`Sampling.without_replacement`, which `generate` sets for this rule), and a rejected
  child's token leaves the draft distribution its later siblings are judged against:
  accept x_j with prob min(1, p_j(x_j)/q_j(x_j)), q_j = q without x_1..x_{j-1},
  renormalised; on rejection p <- norm(max(0, p_j - q_j)). Lossless. Deterministic picks
  (q one-hot) and greedy decoding verify exactly as "speculative" does.
- "typical" (Medusa): accept x if p(x) > min(eps, delta * exp(-H(p))). LOSSY.
- "fuzzy" (FSD): accept while Div(p, q) <= threshold (KL, JS or TV between the target and
  draft next-token distributions); the correction token is drawn from p. LOSSY.
- "easd" (Entropy-Aware SD): the speculative rule, except that a token it would accept is
  rejected when both models are unsure (entropies of p and q above `entropy` nats) and
  agree on what they are unsure between (their top-`top_n` sets share at least `overlap`
  of their tokens); the target then draws again without that token. LOSSY.

- "judge" (Judge Decoding): a linear judge on the target's final hidden state at each draft
  token scores it; a token is accepted when the judge's probability clears `threshold` OR
  the lossless rule (greedy or speculative) accepts it. LOSSY, at any temperature.

- "arbitrage" (Arbitrage, step level): the draft's first-child path up to and including
  its first step boundary (a token holding a blank line) is one step; a router on the
  target's view of it (its mean final hidden state and the target's mean and lowest
  log-probability of its tokens) decides whether the target should write it instead. If
  not, the whole step is accepted; if so, the lossless rule verifies it token by token
  (the target's own tokens replace it from the first disagreement). LOSSY.

The LOSSY rules that read sampling distributions ("typical", "fuzzy", "easd") are refused
at temperature 0, where p is one-hot and they would silently be greedy matching
(`registry.check_combination`, from their `sampled_only` registry meta).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

import numpy as np

from specjax import registry
from specjax import sampling as sampling_lib
from specjax.models.model import FINAL
from specjax.tree import DraftTree


DIVERGENCES = ("kl", "js", "tv")
RULES = registry.ACCEPTANCE


@RULES.register("greedy")
@dataclasses.dataclass(frozen=True)
class Greedy:
  """Exact match with the target's argmax (lossless, temperature 0)."""
  name: ClassVar[str] = "greedy"
  lossless: ClassVar[bool] = True


@RULES.register("speculative")
@dataclasses.dataclass(frozen=True)
class Speculative:
  """Speculative sampling; SpecInfer's multi-round rule on trees (lossless)."""
  name: ClassVar[str] = "speculative"
  lossless: ClassVar[bool] = True


@RULES.register("rsd")
@dataclasses.dataclass(frozen=True)
class Rsd:
  """Recursive SD: recursive rejection sampling over siblings drawn without replacement
  (lossless)."""
  name: ClassVar[str] = "rsd"
  lossless: ClassVar[bool] = True


@RULES.register("typical", sampled_only=True)
@dataclasses.dataclass(frozen=True)
class Typical:
  """Medusa's typical acceptance: p(x) > min(eps, delta * exp(-H(p))). LOSSY."""
  eps: float = 0.09
  delta: float = 0.3
  name: ClassVar[str] = "typical"
  lossless: ClassVar[bool] = False


@RULES.register("fuzzy", sampled_only=True)
@dataclasses.dataclass(frozen=True)
class Fuzzy:
  """Fuzzy SD: accept while Div(p, q) <= threshold (KL, JS or TV). LOSSY."""
  divergence: str = "js"
  threshold: float = 0.4
  name: ClassVar[str] = "fuzzy"
  lossless: ClassVar[bool] = False

  def __post_init__(self):
    if self.divergence not in DIVERGENCES:
      raise ValueError(f"Unknown divergence {self.divergence!r}; choose from {DIVERGENCES}.")


@RULES.register("easd", sampled_only=True)
@dataclasses.dataclass(frozen=True)
class Easd:
  """Entropy-Aware SD: speculative sampling plus a rejection where both models are unsure
  between the same tokens. LOSSY."""
  entropy: float = 2.0  # nats; both H(p) and H(q) must exceed it
  top_n: int = 5
  overlap: float = 0.6  # |top_n(p) & top_n(q)| / top_n at or above which the token goes
  name: ClassVar[str] = "easd"
  lossless: ClassVar[bool] = False

  def __post_init__(self):
    if not self.entropy >= 0:
      raise ValueError(f"easd: entropy must be >= 0 nats; got {self.entropy}.")
    if isinstance(self.top_n, bool) or not isinstance(self.top_n, int) or self.top_n < 1:
      raise ValueError(f"easd: top_n must be an integer >= 1; got {self.top_n!r}.")
    if not 0 <= self.overlap <= 1:
      raise ValueError(f"easd: overlap must be in [0, 1]; got {self.overlap}.")


@dataclasses.dataclass(frozen=True)
class Judge:
  """Judge Decoding: accept a draft token the lossless rule rejects when a linear judge on
  the target's final hidden state there says it is fine. LOSSY. The weights are part of
  the rule (a static argument: a few hundred numbers compiled in); build it with
  `get("judge", checkpoint=...)` from a folder `specjax-train --config configs/judge.py`
  wrote."""
  weights: tuple[float, ...]  # [H]: the judge's logit is weights . h + bias
  bias: float
  threshold: float = 0.5  # on sigmoid(logit)
  name: ClassVar[str] = "judge"
  lossless: ClassVar[bool] = False
  features: ClassVar[tuple[int, ...]] = (FINAL,)  # what the target forward must return

  def __post_init__(self):
    if not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"judge: threshold is a probability in [0, 1]; got {self.threshold}.")

  def validate(self, target_config) -> None:
    if len(self.weights) != target_config.hidden_size:
      raise ValueError(f"judge: its weights read hidden states of size {len(self.weights)}; "
                       f"this target's are {target_config.hidden_size}.")

  def probs(self, hidden_xH: jax.Array) -> jax.Array:
    w = jnp.asarray(self.weights, jnp.float32)
    return jax.nn.sigmoid(hidden_xH.astype(jnp.float32) @ w + self.bias)


JUDGE_FILE = "judge.npz"


@RULES.register("judge")
def _judge(*, checkpoint: str, threshold: float = 0.5) -> Judge:
  """The judge saved in folder `checkpoint` (`train/judge.py`)."""
  a = _trained(checkpoint, JUDGE_FILE, "judge", "judge.py")
  return Judge(tuple(float(x) for x in a["weights"]), float(a["bias"]), float(threshold))


def _trained(checkpoint: str, file: str, rule: str, config: str) -> dict[str, np.ndarray]:
  """The arrays a trained rule saved in folder `checkpoint`."""
  path = os.path.join(checkpoint, file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{rule}: {path!r} does not exist; train one with "
                            f"`specjax-train --config configs/{config}`.")
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@dataclasses.dataclass(frozen=True)
class Arbitrage:
  """Arbitrage's router over draft steps: accept a whole step unless the router predicts
  the target would write a better one (then verify it losslessly). LOSSY. Build it with
  `get("arbitrage", checkpoint=...)` from a folder `specjax-train --config
  configs/arbitrage.py` wrote; the router and the step-boundary token ids are part of the
  rule (a static argument)."""
  weights: tuple[float, ...]  # [H + 3]: mean hidden, mean log-prob, min log-prob, length
  bias: float
  boundary: tuple[int, ...]  # token ids that end a step (they contain a blank line)
  threshold: float = 0.5  # escalate to the target above it
  name: ClassVar[str] = "arbitrage"
  lossless: ClassVar[bool] = False
  features: ClassVar[tuple[int, ...]] = (FINAL,)

  def __post_init__(self):
    if not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"arbitrage: threshold is a probability in [0, 1]; got "
                       f"{self.threshold}.")

  def validate(self, target_config) -> None:
    if len(self.weights) != target_config.hidden_size + 3:
      raise ValueError(f"arbitrage: its router reads hidden states of size "
                       f"{len(self.weights) - 3}; this target's are "
                       f"{target_config.hidden_size}.")

  def escalate(self, step_x: jax.Array) -> jax.Array:
    """P(the target's step would be better) from `step_features` rows."""
    w = jnp.asarray(self.weights, jnp.float32)
    return jax.nn.sigmoid(step_x.astype(jnp.float32) @ w + self.bias)


def step_features(hidden_BxNxH, logprob_BxN, on_step_BxN, num_nodes: int) -> jax.Array:
  """float32[B, H + 3]: a step's router input: the target's mean final hidden state over
  its tokens, the mean and lowest target log-probability of its tokens, and its length
  over the draft's size."""
  m = on_step_BxN.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(m, -1, keepdims=True), 1.0)
  mean_h = jnp.sum(hidden_BxNxH.astype(jnp.float32) * m[..., None], 1) / count
  mean_lp = jnp.sum(logprob_BxN * m, -1, keepdims=True) / count
  min_lp = jnp.min(jnp.where(on_step_BxN, logprob_BxN, 0.0), -1, keepdims=True)
  return jnp.concatenate([mean_h, mean_lp, min_lp, count / num_nodes], -1)


ROUTER_FILE = "router.npz"


@RULES.register("arbitrage")
def _arbitrage(*, checkpoint: str, threshold: float = 0.5) -> Arbitrage:
  """The router saved in folder `checkpoint` (`train/arbitrage.py`)."""
  a = _trained(checkpoint, ROUTER_FILE, "arbitrage", "arbitrage.py")
  return Arbitrage(tuple(float(x) for x in a["weights"]), float(a["bias"]),
                   tuple(int(x) for x in a["boundary"]), float(threshold))


Acceptance = Greedy | Speculative | Rsd | Typical | Fuzzy | Easd | Judge | Arbitrage
RULE_TYPES = (Greedy, Speculative, Rsd, Typical, Fuzzy, Easd, Judge, Arbitrage)


def get(name: str | Acceptance, **kw) -> Acceptance:
  """A rule by registered name (with its knobs), or a rule instance as is."""
  if isinstance(name, RULE_TYPES):
    if kw:
      raise ValueError(f"Knobs {sorted(kw)} were given with a built {name.name} rule.")
    return name
  return RULES.build(name, **kw)


class Verdict(NamedTuple):
  path: jax.Array  # int32[B, N]: accepted node indices, in order; entries past the count are junk
  accepted_drafts: jax.Array  # int32[B]: accepted draft tokens (the next token not counted)
  next_token: jax.Array  # int32[B]: bonus (all accepted) or correction token
  # Set by the decode loop for drafters that read the target's predictions at every
  # verified token (`target_top_k` > 0: Token Recycling); None otherwise.
  scored_tokens: jax.Array | None = None  # int32[B, 1 + N]: [root, node_0, ...]; -1: none
  target_top_k: jax.Array | None = None  # int32[B, 1 + N, k]: the target's top-k there


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


def _unsure_together(rule: Easd, p_BxV, q_BxV) -> jax.Array:
  """bool[B]: EASD's penalty: both entropies above the threshold and top-n sets that
  overlap enough."""
  top_p = jax.lax.top_k(p_BxV, rule.top_n)[1]
  top_q = jax.lax.top_k(q_BxV, rule.top_n)[1]
  shared = jnp.sum(jnp.any(top_p[:, :, None] == top_q[:, None, :], -1), -1)
  return ((sampling_lib.entropy(p_BxV) > rule.entropy)
          & (sampling_lib.entropy(q_BxV) > rule.entropy)
          & (shared >= rule.overlap * rule.top_n))


def _walk(tree: DraftTree, accept, carry):
  """Walks the nodes in order. `accept(i, cur_B, tried_B, carry) -> (bool[B], carry)`
  decides node i where `tried_B` (its parent is the current node; the result only counts
  there); returns (cur_B, path, count, carry)."""
  b, n = tree.tokens.shape
  rows = jnp.arange(b)

  def body(i, state):
    cur_B, path_BxN, n_B, carry = state
    tried_B = tree.valid[:, i] & (tree.parents[:, i] == cur_B)
    ok_B, carry = accept(i, cur_B, tried_B, carry)
    ok_B = tried_B & ok_B
    slot = jnp.minimum(n_B, n - 1)
    path_BxN = path_BxN.at[rows, slot].set(jnp.where(ok_B, i, path_BxN[rows, slot]))
    return jnp.where(ok_B, i, cur_B), path_BxN, n_B + ok_B, carry

  init = (jnp.full((b,), -1, jnp.int32), jnp.zeros((b, n), jnp.int32),
          jnp.zeros((b,), jnp.int32), carry)
  return jax.lax.fori_loop(0, n, body, init) if n else init


def verify(rule: Acceptance, tree: DraftTree, target_logits_BxTxV: jax.Array,
           s: sampling_lib.Sampling, key: jax.Array,
           hidden_BxTxH: jax.Array | None = None) -> Verdict:
  """Walks the tree against the target logits of [root, node_0, ..., node_{N-1}]
  (`hidden_BxTxH`: the target's final hidden states there, for rules with `features`)."""
  if rule.name == "arbitrage":
    return _arbitrage_verify(rule, tree, target_logits_BxTxV, s, key, hidden_BxTxH)
  if rule.name == "greedy" and not s.greedy:
    raise ValueError("acceptance='greedy' needs temperature 0; use 'speculative' to sample.")
  b = tree.tokens.shape[0]
  rows = jnp.arange(b)
  at = lambda x_BxT, cur_B: x_BxT[rows, cur_B + 1]  # the target's row for the current node
  # Judge Decoding: node i is also accepted where the judge clears its threshold.
  judged_BxN = (rule.probs(hidden_BxTxH[:, 1:]) > rule.threshold if rule.name == "judge"
                else jnp.zeros(tree.tokens.shape, bool))

  if rule.name == "greedy" or (rule.name in ("speculative", "rsd", "judge") and s.greedy):
    best_BxT = jnp.argmax(target_logits_BxTxV, -1).astype(jnp.int32)
    accept = lambda i, cur_B, tried_B, c: (
        (tree.tokens[:, i] == at(best_BxT, cur_B)) | judged_BxN[:, i], c)
    cur_B, path, num, _ = _walk(tree, accept, ())
    return Verdict(path, num, at(best_BxT, cur_B))

  u_key, next_key = jax.random.split(key)
  p_BxTxV = sampling_lib.probs(target_logits_BxTxV, s)
  if rule.name in ("speculative", "rsd", "easd", "judge"):
    # Recursive SD's draft distribution for a node excludes its earlier siblings' tokens
    # (`seen`: the rejected siblings so far); SpecInfer's rule keeps q whole.
    recursive = rule.name == "rsd" and tree.sampled
    if recursive and not tree.distinct:
      raise ValueError("acceptance='rsd' verifies children drawn without replacement, but "
                       "this tree's were drawn i.i.d.: draft with "
                       "Sampling(without_replacement=True) (generate does so for 'rsd').")

    def accept(i, cur_B, tried_B, carry):
      p_BxV, seen_BxV = carry
      x_B = tree.tokens[:, i]
      if tree.sampled:
        q_BxV = tree.draft_probs(i)
        if recursive:
          q_BxV = jnp.where(seen_BxV, 0.0, q_BxV)
          q_BxV = q_BxV / jnp.maximum(jnp.sum(q_BxV, -1, keepdims=True), 1e-30)
      else:  # a deterministic pick: q is one-hot on the token
        q_BxV = jax.nn.one_hot(x_B, p_BxV.shape[-1], dtype=jnp.float32)
      # One uniform per node index, whatever the tree's width (a step verifies a prefix
      # of the nodes when the rest were not drafted).
      u_B = jax.random.uniform(jax.random.fold_in(u_key, i), (b,))
      ok_B = u_B * q_BxV[rows, x_B] < p_BxV[rows, x_B]
      residual = jnp.maximum(p_BxV - q_BxV, 0.0)
      mass = jnp.sum(residual, -1, keepdims=True)
      rejected = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_BxV)
      if rule.name == "easd":  # unsure together: reject, and the target draws without x
        unsure_B = _unsure_together(rule, p_BxV, q_BxV)
        without = p_BxV * (1.0 - jax.nn.one_hot(x_B, p_BxV.shape[-1], dtype=jnp.float32))
        mass = jnp.sum(without, -1, keepdims=True)
        without = jnp.where(mass > 0, without / jnp.where(mass > 0, mass, 1.0), p_BxV)
        rejected = jnp.where((ok_B & unsure_B)[:, None], without, rejected)
        ok_B = ok_B & ~unsure_B
      ok_B = ok_B | judged_BxN[:, i]
      took, missed = (tried_B & ok_B)[:, None], (tried_B & ~ok_B)[:, None]
      new_p = jnp.where(took, p_BxTxV[:, i + 1], jnp.where(missed, rejected, p_BxV))
      if recursive:
        x_BxV = jax.nn.one_hot(x_B, p_BxV.shape[-1], dtype=bool)
        seen_BxV = jnp.where(took, False, jnp.where(missed, seen_BxV | x_BxV, seen_BxV))
      return ok_B, (new_p, seen_BxV)

    seen = jnp.zeros(p_BxTxV[:, 0].shape, bool) if recursive else ()
    _, path, num, (p_final, _) = _walk(tree, accept, (p_BxTxV[:, 0], seen))
    return Verdict(path, num, sampling_lib.sample(next_key, p_final, s))

  if rule.name == "typical":  # Medusa thresholds the (temperature) softmax, not its top-k cut
    p_raw_BxTxV = jax.nn.softmax(target_logits_BxTxV / jnp.maximum(s.temperature, 1e-6), -1)
    ok_BxT = jnp.minimum(rule.eps, rule.delta * jnp.exp(-sampling_lib.entropy(p_raw_BxTxV)))

    def accept(i, cur_B, tried_B, c):
      return at(p_raw_BxTxV, cur_B)[rows, tree.tokens[:, i]] > at(ok_BxT, cur_B), c
  else:  # fuzzy: q is the draft's real distribution even for deterministic picks (one-hot
    # on the token for drafters without a distribution, e.g. prompt lookup)
    def accept(i, cur_B, tried_B, c):
      q_BxV = (jax.nn.one_hot(tree.tokens[:, i], p_BxTxV.shape[-1], dtype=jnp.float32)
               if tree.probs is None else tree.draft_probs(i))
      return divergence(at(p_BxTxV, cur_B), q_BxV, rule.divergence) <= rule.threshold, c

  cur_B, path, num, _ = _walk(tree, accept, ())
  return Verdict(path, num, sampling_lib.sample(next_key, at(p_BxTxV, cur_B), s))


def draft_step(tree: DraftTree, boundary: tuple[int, ...]):
  """(cur_B, path, count) of a draft's step: its first-child path, up to and including the
  first token in `boundary` (the whole path when none is)."""
  ends = jnp.asarray(boundary if boundary else (-1,), jnp.int32)

  def accept(i, cur_B, tried_B, ended_B):
    ok_B = ~ended_B
    return ok_B, ended_B | (tried_B & ok_B & jnp.isin(tree.tokens[:, i], ends))

  cur_B, path, num, _ = _walk(tree, accept, jnp.zeros(tree.tokens.shape[:1], bool))
  return cur_B, path, num


def _arbitrage_verify(rule: Arbitrage, tree, logits_BxTxV, s, key, hidden_BxTxH) -> Verdict:
  """The step accepted whole where the router does not escalate; elsewhere the lossless
  rule's verdict."""
  b, n = tree.tokens.shape
  rows = jnp.arange(b)
  base = verify(get("greedy" if s.greedy else "speculative"), tree, logits_BxTxV, s, key)
  if n == 0:
    return base
  cur_B, path, num = draft_step(tree, rule.boundary)
  on_step = jnp.arange(n) < num[:, None]
  idx = jnp.where(on_step, path, 0)
  # The target's log-prob of each step token, at its parent's row (raw, temperature 1).
  lp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), -1)
  parent_row = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), idx[:, :-1] + 1], 1)
  lp_BxN = lp_BxTxV[rows[:, None], parent_row, jnp.take_along_axis(tree.tokens, idx, 1)]
  x = step_features(jnp.take_along_axis(hidden_BxTxH[:, 1:], idx[..., None], 1), lp_BxN,
                    on_step, n)
  keep_B = (num > 0) & (rule.escalate(x) <= rule.threshold)
  p_next = sampling_lib.probs(logits_BxTxV[rows, cur_B + 1], s)
  nxt = sampling_lib.sample(jax.random.fold_in(key, n + 1), p_next, s)
  return Verdict(jnp.where(keep_B[:, None], path, base.path),
                 jnp.where(keep_B, num, base.accepted_drafts),
                 jnp.where(keep_B, nxt, base.next_token))


def acceptance_probs(tree: DraftTree, target_logits_BxTxV: jax.Array,
                     s: sampling_lib.Sampling) -> jax.Array:
  """float32[B, N]: the probability that node i is accepted once its parent is (the labels
  learned stop policies train on). Greedy: 1 if it is the target's argmax, else 0.
  Sampling: min(1, p(x)/q(x)) under the warped target distribution p at the parent, q the
  distribution x was drawn from (one-hot for deterministic picks, so p(x)). For a node
  tried after a rejected sibling the walk uses a residual p; this is the first try's."""
  rows_Bx1 = jnp.arange(tree.tokens.shape[0])[:, None]
  parent_row_BxN = tree.parents + 1  # the target's row for each node's parent (root: 0)
  if s.greedy:
    best_BxT = jnp.argmax(target_logits_BxTxV, -1)
    return (best_BxT[rows_Bx1, parent_row_BxN] == tree.tokens).astype(jnp.float32)
  p_BxN = sampling_lib.probs(target_logits_BxTxV, s)[rows_Bx1, parent_row_BxN, tree.tokens]
  if not tree.sampled:
    return p_BxN
  q_BxN = tree.probs[rows_Bx1, tree.dist, tree.tokens]
  return jnp.minimum(1.0, p_BxN / jnp.maximum(q_BxN, 1e-30))
