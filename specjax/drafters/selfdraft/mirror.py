"""Mirror SD: draft branches rolled out from the target's early exit while it finishes.

After "Mirror Speculative Decoding: Breaking the Serial Barrier in LLM Inference"
(Bhendawade et al., 2025). Plain speculative decoding alternates: the draft drafts gamma
tokens, then the target verifies them. Mirror SD overlaps the next round's drafting with
the current verification. While the target verifies [root, d_0, ..., d_{gamma-1}], it
stops at an intermediate layer `exit_layer` and an early-exit head turns its states there
into the top-`kappa` guesses of the token the target will put at every position j (the
correction after accepting j drafts, or the bonus token at j = gamma). The draft, on other
devices, rolls out a branch for every guess m_{j,k} while the target runs its remaining
layers:

  branch (j, k) = gamma draft tokens following  committed + d_0..d_{j-1} + m_{j,k}

When verification ends with tau accepted drafts and next token y, the branch (tau, k) with
m_{tau,k} = y is exactly the draft a fresh round would make from the new root (the same
prefix), so it is the next round's chain and no drafting phase is needed; when no guess
matched, the draft drafts the chain from the root as plain speculative decoding does.

In this loop a step verifies the chain it gets from `propose`, and `commit` reads the
target's states at `exit_layer` (a declared feature: the target's own forward gives them,
as the early exit would) and keeps the guesses. The next `propose` first rolls out every
branch of the previous round (one batched draft computation over (gamma + 1) * kappa
branch rows, which a mesh spreads over its batch axis), takes the matching one, and drafts
from the root only for rows that have none (skipped when every row matched). On one
device the rollout runs after the target instead of beside it: the loop checks the
algorithm (outputs equal to AR, the share of rounds that reuse a branch); `predicted_ms`
gives a round's time where draft and target run at once.

Lossless at any temperature: a branch's tokens are drawn from the draft's distributions
given exactly the prefix they are verified after, and whether a branch is used depends
only on the early-exit guesses and the target's own next token, never on the branch.

The early-exit head is the target's final norm and LM head over the exit state plus a
low-rank residual adapter, h + (h W_down) W_up (`exit_logits`), W_up zero at init (then it
is the target's LM head at the exit layer); `train_exit` fits the adapter with optax to
the target's own next tokens (cross-entropy on its argmax).

Speculative streaming (the paper's draft emits several tokens a forward): with
`stream_params` [S - 1, H], S - 1 trained stream embeddings ride after the draft's last
real token at the next positions, and the draft's outputs there are its guesses of the
tokens 2..S ahead, so a forward drafts S tokens and a branch of gamma takes
ceil(gamma / S) forwards; the next forward feeds the S drafted tokens (writing their
keys/values) with a fresh group of stream tokens. `train_stream` fits the embeddings with
optax (cross-entropy against the training rows' next tokens, the draft frozen). A drawn
token's q is the distribution it was drawn from, so sampling stays lossless.

Departures: the paper's streaming draft is trained with multi-stream attention in its
own layers; here only the stream embeddings train (as parallel prompt decoding does),
on a draft made of the target's first layers. The paper splits devices between GPU and
NPU; here draft and target share the loop's mesh.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax import models, registry
from specjax import sampling as sampling_lib
from specjax.models import skip
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import Model, causal, forward, param_dtype, prefill
from specjax.tree import DraftTree


def exit_logits(cfg: ModelConfig, target_params: Any, exit_params: Any, h_xH) -> jax.Array:
  """float32[..., V]: the early-exit head over the target's states at the exit layer."""
  h = h_xH + (h_xH @ exit_params["down"]) @ exit_params["up"]
  return skip.exit_logits(cfg, target_params, h)


def init_exit(cfg: ModelConfig, rank: int, key: jax.Array) -> dict:
  """A fresh adapter: W_down random, W_up zero (the target's LM head at the exit)."""
  down = jax.random.normal(key, (cfg.hidden_size, rank)) / np.sqrt(cfg.hidden_size)
  return {"down": down, "up": jnp.zeros((rank, cfg.hidden_size))}


def train_exit(target: Model, exit_layer: int, tokens_NxT, *, rank: int = 32,
               steps: int = 200, positions: int = 256, lr: float = 3e-3, seed: int = 0,
               log_every: int = 0) -> dict:
  """The early-exit adapter fitted to the target's next tokens on `tokens_NxT` (training
  rows, never evaluation prompts): Adam on the cross-entropy of the exit's logits against
  the target's argmax, `positions` random positions a step. The target's states are
  computed once."""
  tokens = jnp.asarray(tokens_NxT, jnp.int32)
  if tokens.ndim != 2 or tokens.shape[0] < 1:
    raise ValueError(f"train_exit needs token rows [N, T]; got shape {tokens.shape}.")
  h_MxH, labels_M = _exit_data(target, exit_layer, tokens)
  tx = optax.adam(lr)
  params = init_exit(target.config, rank, jax.random.key(seed))

  @jax.jit
  def step(params, opt, key):
    rows = jax.random.randint(key, (positions,), 0, h_MxH.shape[0])

    def loss(p):
      logits = exit_logits(target.config, target.params, p, h_MxH[rows])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels_M[rows]).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  opt, key = tx.init(params), jax.random.key(seed + 1)
  for i in range(steps):
    key, sub = jax.random.split(key)
    params, opt, value = step(params, opt, sub)
    if log_every and (i + 1) % log_every == 0:
      print(f"exit head step {i + 1}/{steps}: loss {float(value):.3f}", flush=True)
  return params


def _exit_data(target: Model, exit_layer: int, tokens_NxT, chunk: int = 8):
  """(the target's states at the exit [N * T, H], its next tokens [N * T]), computed a few
  rows at a time (the full logits of many rows would not fit)."""
  hs, labels = [], []
  for i in range(0, tokens_NxT.shape[0], chunk):
    out = models.causal_forward(target.config, target.params, tokens_NxT[i:i + chunk],
                                features=(exit_layer,))
    hs.append(out.features[0].reshape(-1, target.config.hidden_size).astype(jnp.float32))
    labels.append(jnp.argmax(out.logits, -1).reshape(-1))
  return jnp.concatenate(hs), jnp.concatenate(labels)


def train_stream(draft: Model, tokens_NxT, streams: int, *, steps: int = 200,
                 batch: int = 16, window: int = 64, lr: float | None = None, seed: int = 0,
                 log_every: int = 0) -> jax.Array:
  """Stream embeddings [streams, H] for speculative streaming with `draft`: after a window
  of a training row ending at a random anchor t, stream token i predicts token t + 1 + i
  (cross-entropy; only the embeddings train, starting from the mean token embedding).
  Adam's step is about `lr` per coordinate: the default, 2% of the embedding table's
  standard deviation, keeps the embeddings on the table's scale."""
  tokens = np.asarray(tokens_NxT, np.int32)
  n, t = tokens.shape
  if t < window + streams + 2 or streams < 1:
    raise ValueError(f"train_stream needs rows longer than window + streams + 1 = "
                     f"{window + streams + 1} tokens and streams >= 1; got rows of {t}, "
                     f"streams={streams}.")
  cfg, v = draft.config, draft.config.vocab_size
  table = draft.params["embed_tokens"]["embedding"]
  stream = jnp.broadcast_to(jnp.mean(table, 0), (streams, cfg.hidden_size)).astype(jnp.float32)
  ids_tail = v + jnp.arange(streams)
  positions = jnp.arange(window + streams)[None]
  tx = optax.adam(0.02 * float(jnp.std(table)) if lr is None else lr)

  @jax.jit
  def step(emb, opt, rows_BxT):
    ctx, labels = rows_BxT[:, :window], rows_BxT[:, window + 1:]

    def loss(e):
      ids = jnp.concatenate([ctx, jnp.broadcast_to(ids_tail, (ctx.shape[0], streams))], 1)
      out = forward(cfg, draft.params, ids, jnp.broadcast_to(positions, ids.shape),
                    causal(ids.shape[1]), extra_embeddings_NxH=e)
      return optax.softmax_cross_entropy_with_integer_labels(
          out.logits[:, window:].astype(jnp.float32), labels).mean()
    value, grads = jax.value_and_grad(loss)(emb)
    updates, opt = tx.update(grads, opt, emb)
    return optax.apply_updates(emb, updates), opt, value

  rng, opt = np.random.default_rng(seed), tx.init(stream)
  if steps == 0:
    return stream
  for i in range(steps):
    r = rng.integers(0, n, batch)
    a = rng.integers(window - 1, t - streams - 1, batch)  # the anchor (last context token)
    rows = np.stack([tokens[ri, ai - window + 1:ai + streams + 2] for ri, ai in zip(r, a)])
    stream, opt, value = step(stream, opt, jnp.asarray(rows))
    if log_every and (i + 1) % log_every == 0:
      print(f"stream embeddings step {i + 1}/{steps}: loss {float(value):.3f}", flush=True)
  return stream


def stream_fit(draft: Model, stream_params, tokens_NxT, window: int = 64,
               every: int = 8) -> tuple[float, float]:
  """(cross-entropy, top-1 accuracy) of the stream positions against the rows' tokens, at
  every `every`-th anchor of every row (a window of context before each, as
  `train_stream` trains)."""
  tokens = np.asarray(tokens_NxT, np.int32)
  streams, t = stream_params.shape[0], tokens.shape[1]
  anchors = range(window - 1, t - streams - 1, every)
  rows = np.concatenate([tokens[:, a - window + 1:a + streams + 2] for a in anchors])
  ids = np.concatenate([rows[:, :window], np.broadcast_to(
      draft.config.vocab_size + np.arange(streams), (len(rows), streams))], 1)
  ids = np.concatenate([ids, np.repeat(ids[-1:], -len(ids) % 8, 0)])  # whole chunks
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), (8, ids.shape[1]))
  run = jax.jit(lambda x: forward(draft.config, draft.params, x, positions,
                                  causal(ids.shape[1]), extra_embeddings_NxH=stream_params
                                  ).logits[:, window:])
  logits = jnp.concatenate([run(jnp.asarray(ids[i:i + 8])) for i in range(0, len(ids), 8)]
                           )[:len(rows)].astype(jnp.float32)  # 8 rows at a time
  labels = jnp.asarray(rows[:, window + 1:])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return float(ce), float(jnp.mean(jnp.argmax(logits, -1) == labels))


def exit_agreement(target: Model, exit_layer: int, exit_params: dict, tokens_NxT,
                   kappa: int = 1) -> float:
  """Share of positions whose target next token is in the exit's top-`kappa`."""
  h_MxH, labels_M = _exit_data(target, exit_layer, jnp.asarray(tokens_NxT, jnp.int32))
  top = jax.lax.top_k(exit_logits(target.config, target.params, exit_params, h_MxH), kappa)[1]
  return float(jnp.mean(jnp.any(top == labels_M[:, None], -1)))


@flax.struct.dataclass
class MirrorState:
  cache: KVCache  # the draft's: the committed tokens but the root, after a propose
  root: jax.Array  # int32[B]: this step's root
  drafts: jax.Array  # int32[B, gamma]: the chain this step verifies
  guesses: jax.Array  # int32[B, gamma + 1, kappa]: the early exit's, at [root, d_0, ...]
  accepted: jax.Array  # int32[B]: drafts the last verification accepted
  next_token: jax.Array  # int32[B]: and its next token
  ready: jax.Array  # bool[B]: guesses come from a verification (not at the first step)
  reused: jax.Array  # bool[B]: this step's chain is a branch (no drafting phase)


@flax.struct.dataclass
class Mirror:
  params: Any  # the draft LM's
  config: ModelConfig = flax.struct.field(pytree_node=False)
  target_params: Any = None  # the target's final norm and LM head (the early exit)
  target_config: ModelConfig = flax.struct.field(pytree_node=False, default=None)
  exit_params: Any = None  # the early-exit adapter (`train_exit`)
  exit_layer: int = flax.struct.field(pytree_node=False, default=1)
  gamma: int = flax.struct.field(pytree_node=False, default=4)
  kappa: int = flax.struct.field(pytree_node=False, default=2)
  stream_params: Any = None  # [S - 1, H] stream embeddings (None: one token a forward)
  takes_stop_policy = False
  drafts_vary = False
  features = property(lambda self: (self.exit_layer,))

  @property
  def num_nodes(self) -> int:
    return self.gamma

  @property
  def branches(self) -> int:
    return (self.gamma + 1) * self.kappa

  @property
  def stream(self) -> int:
    """Draft tokens a forward (speculative streaming; 1 without stream embeddings)."""
    return 1 if self.stream_params is None else 1 + self.stream_params.shape[0]

  @property
  def draft_forwards(self) -> int:
    """Draft forwards a branch (or a drafting phase) of gamma tokens takes."""
    return -(-self.gamma // self.stream)

  def validate(self, target_config: ModelConfig) -> None:
    skip.check(target_config, "Mirror SD's early exit")
    if self.config.vocab_size != target_config.vocab_size:
      raise ValueError(f"Mirror SD's draft has vocab size {self.config.vocab_size}, the "
                       f"target {target_config.vocab_size}: they must share a tokenizer.")
    if self.target_config != target_config:
      raise ValueError("This Mirror SD drafter's early exit was made for another target.")
    if not 1 <= self.exit_layer < target_config.num_layers:
      raise ValueError(f"Mirror SD's exit_layer must be in [1, {target_config.num_layers}) "
                       f"(layers run before the exit); got {self.exit_layer}.")
    if self.gamma < 1 or not 1 <= self.kappa <= target_config.vocab_size:
      raise ValueError(f"Mirror SD needs gamma >= 1 and 1 <= kappa <= vocab; got gamma="
                       f"{self.gamma}, kappa={self.kappa}.")
    want = (target_config.hidden_size, target_config.hidden_size)
    got = (self.exit_params["down"].shape[0], self.exit_params["up"].shape[1])
    if got != want:
      raise ValueError(f"Mirror SD's exit adapter is shaped for hidden size {got}, the "
                       f"target's is {want[0]}.")
    if self.stream_params is not None and (
        self.config.arch != "llama" or self.stream_params.ndim != 2
        or self.stream_params.shape[1] != self.config.hidden_size):
      raise ValueError(f"Mirror SD's stream embeddings must be [S - 1, "
                       f"{self.config.hidden_size}] for a Llama-family draft; got "
                       f"{getattr(self.stream_params, 'shape', None)} for a "
                       f"{self.config.arch!r} draft.")

  def init(self, ctx, max_len: int, features) -> MirrorState:
    del features
    b, g, v = ctx.history.shape[0], self.gamma, self.config.vocab_size
    # Room past the committed tokens for the root, a chain and a branch.
    cache = KVCache.for_config(self.config, b, max_len + 2 * g + 2 + self.stream,
                               param_dtype(self.params))
    cache, _ = prefill(self.config, self.params, cache, ctx.history, ctx.length - 1)
    zeros = lambda *s: jnp.zeros((b,) + s, jnp.int32)
    no = jnp.zeros((b,), bool)
    return MirrorState(cache, zeros(), zeros(g),
                       zeros(g + 1, self.kappa), zeros(), zeros(), no, no)

  def _roll(self, cache, first_BxT, positions_BxT, key, sampling):
    """gamma draft tokens after each row's `first` tokens (fed at `positions`, the cache
    holding what comes before), `stream` a forward: (tokens [B, gamma], q [B, gamma, V]
    or None if greedy)."""
    b, s, v = first_BxT.shape[0], self.stream, self.config.vocab_size
    streams = jnp.broadcast_to(v + jnp.arange(s - 1), (b, s - 1))
    keys = jax.random.split(key, self.gamma)
    toks, qs, feed, pos = [], [], first_BxT, positions_BxT
    while len(toks) < self.gamma:
      real = feed.shape[1]
      ids = jnp.concatenate([feed, streams], 1)
      at = jnp.concatenate([pos, pos[:, -1:] + 1 + jnp.arange(s - 1)], 1)
      out = forward(self.config, self.params, ids, at, causal(ids.shape[1]), cache,
                    extra_embeddings_NxH=self.stream_params)
      cache = out.cache.advance(jnp.full((b,), real, jnp.int32))  # stream entries dropped
      new = []
      for i in range(min(s, self.gamma - len(toks))):
        tok, q = sampling_lib.draw(keys[len(toks)], out.logits[:, real - 1 + i], sampling)
        toks.append(tok)
        qs.append(q)
        new.append(tok)
      feed = jnp.stack(new, 1)
      pos = pos[:, -1:] + 1 + jnp.arange(len(new))
    return jnp.stack(toks, 1), None if sampling.greedy else jnp.stack(qs, 1)

  def _rollouts(self, state: MirrorState, key, sampling):
    """Every branch of the last round and each row's matching one: (found bool[B],
    tokens [B, gamma], q [B, gamma, V], the cache with the last round's root and chain)."""
    g, kap, n = self.gamma, self.kappa, self.branches
    cache = state.cache  # lengths: the last round's committed tokens but its root
    b = cache.lengths.shape[0]
    root_pos = cache.lengths
    # The last round's root and chain, then copies truncated after each d_{j-1}.
    chain_BxT = jnp.concatenate([state.root[:, None], state.drafts], 1)
    out = forward(self.config, self.params, chain_BxT,
                  root_pos[:, None] + jnp.arange(g + 1)[None], causal(g + 1), cache)
    j_N = jnp.repeat(jnp.arange(g + 1), kap)  # branch n = (j, k): j = n // kappa
    copies = jax.tree.map(lambda x: jnp.repeat(x, n, 0), out.cache)
    copies = copies.replace(lengths=(root_pos[:, None] + 1 + j_N[None]).reshape(-1))
    guess_BN = state.guesses.reshape(b * n, 1)
    toks, qs = self._roll(copies, guess_BN, copies.lengths[:, None], key, sampling)
    toks = toks.reshape(b, n, g)
    # The branch whose prefix is the accepted drafts and whose guess is the next token.
    at_tau = jnp.take_along_axis(state.guesses, state.accepted[:, None, None], 1)[:, 0]
    hit_BxK = at_tau == state.next_token[:, None]
    pick = state.accepted * kap + jnp.argmax(hit_BxK, -1)
    found = state.ready & hit_BxK.any(-1)
    if qs is not None:
      qs = jnp.take_along_axis(qs.reshape(b, n, g, -1), pick[:, None, None, None], 1)[:, 0]
    return found, jnp.take_along_axis(toks, pick[:, None, None], 1)[:, 0], qs, out.cache

  def propose(self, state: MirrorState, ctx, stop, sampling, key):
    del stop
    b, g, v = ctx.history.shape[0], self.gamma, self.config.vocab_size
    k_branch, k_fresh = jax.random.split(key)
    # Rows that matched a guess take their branch.
    no_q = None if sampling.greedy else jnp.zeros((b, g, v), jnp.float32)
    found, toks, qs, cache = jax.lax.cond(
        state.ready.any(), lambda: self._rollouts(state, k_branch, sampling),
        lambda: (jnp.zeros((b,), bool), jnp.zeros((b, g), jnp.int32), no_q, state.cache))
    # The others draft from the root. The cache holds every committed token but the root
    # (the last root and accepted drafts were written above; a new row's by its prefill).
    root_pos = ctx.length - 1
    cache = cache.replace(lengths=root_pos)
    root = ctx.history[jnp.arange(b), root_pos]

    ftoks, fqs = jax.lax.cond(
        (~found).any(),
        lambda: self._roll(cache, root[:, None], root_pos[:, None], k_fresh, sampling),
        lambda: (toks, qs))
    drafts = jnp.where(found[:, None], toks, ftoks)
    probs = None if sampling.greedy else jnp.where(found[:, None, None], qs, fqs)
    tree = DraftTree.chain(drafts, jnp.ones((b, g), bool), probs, sampled=not sampling.greedy)
    state = state.replace(cache=cache, drafts=drafts, reused=found,
                          root=root)
    return tree, state, jnp.where(found, 0, self.draft_forwards).astype(jnp.int32)

  def commit(self, state: MirrorState, ctx, verdict, features) -> MirrorState:
    """The early exit's top-kappa guesses at [root, d_0, ..., d_{gamma-1}]."""
    del ctx
    logits = exit_logits(self.target_config, self.target_params, self.exit_params,
                         features[0].astype(jnp.float32))
    guesses = jax.lax.top_k(logits, self.kappa)[1].astype(jnp.int32)
    return state.replace(guesses=guesses, accepted=verdict.accepted_drafts,
                         next_token=verdict.next_token, ready=jnp.ones_like(state.ready))

  def predicted_ms(self, reuse: float, verify_ms: float, exit_ms: float, draft_ms: float,
                   rollout_ms: float) -> float:
    """A round's expected time where draft and target run at once: the target's verify
    (`exit_ms` of it before the exit), the rollouts (`rollout_ms`, all branches in
    parallel) hidden behind the rest unless longer, and a drafting phase of gamma draft
    forwards (ceil(gamma / stream)) in the rounds (1 - `reuse`) that match no guess."""
    return (max(verify_ms, exit_ms + rollout_ms) + (1 - reuse) * self.draft_forwards *
            draft_ms)


@registry.DRAFTERS.register("mirror", takes_stop_policy=False)
def _build(target: Model, *, gamma: int = 4, kappa: int = 2, exit_layer: int | None = None,
           exit_params: dict | None = None, stream_params: Any = None,
           layers: int | None = None, checkpoint: str | None = None) -> Mirror:
  """Mirror SD with the target's first `layers` layers or the model at `checkpoint` as
  the draft, the early exit after `exit_layer` target layers (default: half of them)
  through `exit_params` (`train_exit`; default: the target's LM head alone), and
  speculative streaming with `stream_params` (`train_stream`; default: none)."""
  skip.check(target.config, "Mirror SD's early exit")
  draft = models.draft_lm(target, "mirror", layers, checkpoint)
  exit_layer = target.config.num_layers // 2 if exit_layer is None else int(exit_layer)
  if exit_params is None:
    exit_params = init_exit(target.config, 1, jax.random.key(0))
  head = {k: target.params[k] for k in ("norm", "embed_tokens", "lm_head")
          if k in target.params}
  return Mirror(draft.params, draft.config, head, target.config, exit_params, exit_layer,
                gamma, kappa, stream_params)
