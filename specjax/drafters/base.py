"""The drafter interface the decode loop calls; every drafter is a pytree.

A drafter is a `flax.struct.dataclass`: static settings are `pytree_node=False` fields and
weights live in pytree fields, so a drafter passes through `jax.jit` as an argument. It
implements

  num_nodes: int                                  static tree size N
  features: tuple[int, ...]                       target features it reads (may be empty):
                                                  layer inputs i >= 0, or models.FINAL
  takes_stop_policy: bool                         whether it drafts from a distribution
  drafts_vary: bool                               whether its drafts can fill less than its
                                                  tree without a stop policy (then each step
                                                  verifies the narrowest width holding them)
  validate(target_config) -> None                 clear errors before anything compiles
  init(ctx, max_len, features) -> state
  propose(state, ctx, stop, sampling, key) -> (DraftTree, state, draft_calls[B])
  commit(state, ctx, verdict, features) -> state

and may implement

  target_forward(state, cfg, params, tokens, positions, visible, cache, features)
      -> (models.Forward, state)                  the step's target forward in place of
                                                  `models.forward` (SpecEE exits it early;
                                                  such a drafter sets `greedy_only` and
                                                  `lossy`)

`ctx` is the committed token history ([B, max_len]: the cache size, a static shape).
`init` runs after the target's prefill and gets the target's `features` for the prompt
(each [B, max_len, H], valid at positions < ctx.length - 1: every prompt token but the
last, which is the first root). `commit` sees the context *before* the step's tokens
were appended, the verdict (accepted path + next token) and the target's features for
[root, node_0, ..., node_{N-1}] (each [B, 1 + N, H]): the root's and accepted nodes' are
the features of committed tokens, which feature-level drafters (EAGLE, Medusa) consume.
Each drafter registers a builder in `registry.DRAFTERS`.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax.tree import DraftTree


@flax.struct.dataclass
class Context:
  history: jax.Array  # int32[B, L]: prompt + generated tokens, left-aligned
  length: jax.Array  # int32[B]: tokens in history; the last one is the tree's root
  # The target's KV cache of the committed tokens (all but the root): what drafters that
  # run the target's own layers read (`models.skip`: SWIFT, DEL).
  cache: Any = None
  # bool[B]: rows still decoding (finished rows and a stream's empty slots are not):
  # what policies that weigh the whole batch read (`drafters.goodput`).
  live: Any = None


def soft_ce(target_logits, logits):
  """Cross-entropy of `logits` against the distribution of `target_logits` (last axis)."""
  return -jnp.sum(jax.nn.softmax(target_logits, -1) * jax.nn.log_softmax(logits, -1), -1)


# How a head's draft distribution q is pulled toward the target's p (`TargetBatch.loss`).
DISTILL_LOSSES = ("soft_ce", "tvd", "tvdpp")


def distill_loss(kind: str, target_logits, logits):
  """Per-position loss of draft `logits` against `target_logits` (last axis):

    soft_ce   -sum p log q: the forward KL up to a constant (every head's default)
    tvd       TV(p, q) = 1/2 sum |p - q|: 1 - the acceptance probability of speculative
              sampling, the quantity drafting wants small
    tvdpp     TVD++ (Goel et al. 2024): TV's gradient as a policy gradient,
              -E_{x~q}[r(x) grad log q(x)] with the reward r = 1{p(x) > q(x)}, its variance
              reduced by a baseline and a scale: r~ = (r - E_q r) / std_q r. Computed
              exactly over the vocabulary as the surrogate -sum_x sg(q r~) log q(x), whose
              value is not TV but whose gradient is TVD++'s.
  """
  logq = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  if kind == "soft_ce":
    return -jnp.sum(jax.nn.softmax(target_logits, -1) * logq, -1)
  p, q = jax.nn.softmax(target_logits.astype(jnp.float32), -1), jnp.exp(logq)
  if kind == "tvd":
    return 0.5 * jnp.sum(jnp.abs(p - q), -1)
  if kind == "tvdpp":
    r = (p > q).astype(jnp.float32)
    mean = jnp.sum(q * r, -1, keepdims=True)
    std = jnp.sqrt(jnp.sum(q * (r - mean) ** 2, -1, keepdims=True)) + 1e-6
    return -jnp.sum(jax.lax.stop_gradient(q * (r - mean) / std) * logq, -1)
  raise ValueError(f"Unknown distillation loss {kind!r}; expected one of {DISTILL_LOSSES}.")


def check_target(what: str, hidden_size: int, vocab_size: int, target_config) -> None:
  """Raises unless a head made for (hidden_size, vocab_size) fits the target's config."""
  for field, mine in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
    theirs = getattr(target_config, field)
    if mine != theirs:
      raise ValueError(f"{what} was made for a target with {field}={mine}; this target has "
                       f"{theirs}.")


class Drafter(Protocol):
  num_nodes: int
  features: tuple[int, ...]
  takes_stop_policy: bool
  drafts_vary: bool

  def validate(self, target_config) -> None:
    ...

  def init(self, ctx: Context, max_len: int, features: tuple) -> Any:
    ...

  def propose(self, state, ctx: Context, stop, sampling, key) -> tuple[DraftTree, Any, jax.Array]:
    ...

  def commit(self, state, ctx: Context, verdict, features: tuple) -> Any:
    ...


@flax.struct.dataclass
class TargetBatch:
  """What a trainable head learns from: a batch of sequences and the frozen target's
  outputs on it (under stop_gradient; the very `forward` decoding uses)."""

  tokens: jax.Array  # int32[B, T]
  mask: jax.Array  # float32[B, T]: 1 where a token is a training target (the response)
  features: tuple  # the head's declared target features, each [B, T, H]
  logits: jax.Array  # float32[B, T, V]: the target's next-token logits
  shared: Any  # the target params heads share (`models.shared_params`: embedding, LM head)
  # All the target's params (frozen): for heads that fine-tune the target (Medusa-2's LoRA).
  target_params: Any = None
  # The share of training done (0 -> 1; 1 outside training): schedules inside a loss
  # (Falcon's glancing share).
  progress: Any = 1.0
  # The distillation loss the head's distribution terms use (`DISTILL_LOSSES`).
  loss: str = flax.struct.field(pytree_node=False, default="soft_ce")

  def distill(self, target_logits, logits):
    """The per-position distillation loss of this batch's kind (`distill_loss`)."""
    return distill_loss(self.loss, target_logits, logits)


class TrainableHead:
  """Base of the draft heads `specjax-train` trains against a frozen target
  (`registry.HEADS`); heads are `flax.struct` dataclasses that subclass it. Each one
  implements

    features                        target features its loss and drafter read
    init(key, dtype) -> params      a fresh params pytree
    loss(params, batch, key) -> (loss, metrics)   metrics: dict of scalars ("top1/k", ...)
    accept(params, batch, depth) -> (bool[B, T, depth], float32[B, T])   greedy chain
        acceptance, teacher-forced on the data: [b, t, k] when draft k of a chain drafted
        from position t matches the target's argmax (and is a response token), and which
        rows count; the offline "simulated tau" is 1 + the mean accepted prefix
    drafter(params, shared, *, <draft-size knobs>) -> Drafter

  and may override the data hooks, whose defaults do nothing: `fit` (a head shaped by its
  training data), `buffers` / `with_buffers` (arrays saved beside the params).
  """

  features: tuple[int, ...]

  def init(self, key, dtype=jnp.float32) -> Any:
    raise NotImplementedError

  def loss(self, params, batch: TargetBatch, key) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError

  def accept(self, params, batch: TargetBatch, depth: int) -> tuple[jax.Array, jax.Array]:
    raise NotImplementedError

  def drafter(self, params, shared, **knobs) -> Drafter:
    raise NotImplementedError

  def fit(self, params, tokens, mask, shared) -> tuple["TrainableHead", Any]:
    """(head, params) ready to train on this data (token ids [N, T] and their loss mask);
    EAGLE-3 picks its draft vocabulary here. Default: unchanged."""
    del tokens, mask, shared
    return self, params

  def buffers(self) -> dict[str, np.ndarray]:
    """Arrays the head derived from its data and saves beside its params. Default: none."""
    return {}

  def with_buffers(self, buffers: dict[str, np.ndarray], path: str) -> "TrainableHead":
    """This head with its saved `buffers` (from the folder at `path`, {} when it has none),
    checked against its shapes. Default: it takes none."""
    if buffers:
      raise ValueError(f"{path!r} holds buffers {sorted(buffers)}; a "
                       f"{type(self).__name__} takes none.")
    return self
