"""Falcon: semi-autoregressive drafting, k tokens per forward, glancing distillation.

Pair i of a sequence is (f_i, x_{i+1}) as in EAGLE (`runtime.py`): the target's final normed
state at i and the token after it. The head

  u_i = fc(concat(f_i, embed(x_{i+1})))             2H -> H with bias
  l_i = u_i + LSTM1(u)_i;  l_i += LSTM2(l)_i        two residual LSTM layers over the pairs
  g   = block(l)                                    one Llama decoder layer whose "relaxed
                                                    causal" mask lets pair i see every pair
                                                    up to the end of its block of k
  p(x_{i+k+1}) = softmax(lm_head(g_i))              the target's frozen LM head

predicts f_{i+k} (g_i). In a block of k pairs every output sees the whole block, so output
j predicts the feature j + 1 steps past the block's last pair: one forward drafts k tokens
(semi-autoregressive), the next forward takes that block's k predicted features and tokens
as its pairs. Training blocks are aligned at multiples of k; decoding's block is always
the last k pairs of the context, whose outputs see the same structure.

Training: Coupled Sequential Glancing Distillation (CSGD). Pass 1 reads the real pairs.
Pass 2 reads, at pair i >= k, pass 1's prediction for it (feature g_{i-k} and its argmax
token, coupled): the inputs the next forward sees while drafting. Of these, N = lambda x
(mismatched tokens in the row) pairs, at random, glance at the truth (both feature and
token), lambda = glance * (1 - training progress) (0.4 (E - e) / E). Both passes count:
SmoothL1(g, f_{i+k}) + ce_weight * (0.9 KL(target || draft) + 0.1 CE(x_{i+k+1})).

Decoding keeps the layer's KV cache over committed pairs (real features), the LSTM carry
after them and their last k LSTM outputs. A step: the LSTM and the layer catch up on the
pending pairs, the last k pairs re-query the cache (relaxed: they see each other) for the
first k drafts, then each further forward feeds a block of drafted tokens and predicted
features. The drafting tree (`tree_paths`) branches freely inside a block (its tokens do
not condition each other) and continues into the next block from the backbone (the
top-ranked path), which is the only path a forward runs on: Falcon's decoding tree.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
import numpy as np

from specjax import registry
from specjax.drafters import io, static_tree
from specjax.drafters.base import TargetBatch, TrainableHead, check_target
from specjax.drafters.heads import runtime
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import FINAL, causal, embed, lm_head, param_dtype
from specjax.tree import StaticTree


class FalconLSTM(nn.Module):
  """fc(concat(f, embed)) 2H -> H, then two residual LSTM layers over the pairs (x + LSTM(x),
  as GNMT stacks them: the feature passes through from the start, as EAGLE's fc lets it);
  the carry ((c, h) per layer) continues a sequence."""

  hidden: int
  layers: int = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTx2H, carry=None, lengths_B=None):
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.dtype, name="fc")(x_BxTx2H)
    out = []
    for n in range(self.layers):
      rnn = nn.RNN(nn.OptimizedLSTMCell(self.hidden, dtype=self.dtype, param_dtype=self.dtype),
                   return_carry=True, name=f"lstm_{n}")
      c, y = rnn(x, initial_carry=None if carry is None else carry[n], seq_lengths=lengths_B)
      x = x + y
      out.append(c)
    return x, tuple(out)


def relaxed(t: int, k: int, shift: int = 0) -> jax.Array:
  """bool[1, T, T]: pair i sees pair j when j's block is not after i's (blocks of k
  aligned so that pair -shift starts one)."""
  block = (np.arange(t) + shift) // k
  return jnp.asarray(block[None, :] <= block[:, None])[None]


@flax.struct.dataclass
class FalconHead(TrainableHead):
  """Falcon as a trainable head (see `base.TrainableHead`)."""

  config: ModelConfig = flax.struct.field(pytree_node=False)  # the target's
  block: int = flax.struct.field(pytree_node=False, default=2)  # k: tokens per forward
  glance: float = flax.struct.field(pytree_node=False, default=0.4)
  noise: float = flax.struct.field(pytree_node=False, default=0.2)
  ce_weight: float = flax.struct.field(pytree_node=False, default=0.1)
  features = (FINAL,)

  def _dtype(self, params):
    return param_dtype(params["layer"])

  def init(self, key, dtype=jnp.float32):
    h = self.config.hidden_size
    k_lstm, k_layer = jax.random.split(key)
    z = jnp.zeros((1, 1, h), dtype)
    return {"lstm": FalconLSTM(h, dtype=dtype).init(k_lstm, jnp.zeros((1, 1, 2 * h), dtype))[
                "params"],
            "layer": runtime.FeatureBlock(self.config, dtype).init(
                k_layer, z, jnp.zeros((1, 1), jnp.int32), causal(1))["params"]}

  def validate(self, target_config: ModelConfig) -> None:
    check_target("This Falcon head", self.config.hidden_size, self.config.vocab_size,
                 target_config)

  def pairs(self, params, shared, feat_BxTxH, next_BxT):
    """[B, T, 2H]: the LSTM's input, concat(feature, embedding of the next token)."""
    dt = self._dtype(params)
    return jnp.concatenate([feat_BxTxH.astype(dt), embed(self.config, shared, next_BxT).astype(dt)],
                           -1)

  def lstm(self, params, x_BxTx2H, carry=None, lengths_B=None):
    """(l [B, T, H], carry after the last of each row's `lengths` pairs)."""
    return FalconLSTM(self.config.hidden_size, dtype=self._dtype(params)).apply(
        {"params": params["lstm"]}, x_BxTx2H, carry, lengths_B)

  def layer(self, params, l_BxTxH, positions_BxT, visible_BxTxT, cache=None, prefix_BxTxS=None):
    """The decoder layer on LSTM outputs (`runtime.run_layer`): (g [B, T, H], cache)."""
    return runtime.run_layer(runtime.FeatureBlock(self.config, self._dtype(params)),
                             params["layer"], (l_BxTxH,), positions_BxT, visible_BxTxT, cache,
                             prefix_BxTxS)

  def _targets(self, batch: TargetBatch):
    """Per pair i: the index of its target feature (i + k) and its weight (x_{i+k+1} is a
    response token)."""
    t = batch.tokens.shape[1]
    i = jnp.arange(t - 1)
    src = jnp.minimum(i + self.block, t - 1)
    w = jnp.where(i + self.block + 1 < t,
                  jnp.take(batch.mask, jnp.minimum(i + self.block + 1, t - 1), 1), 0.0)
    return src, w

  def _pass_loss(self, g, batch: TargetBatch, src, w):
    logits = lm_head(self.config, batch.shared, g)
    f = batch.features[0]
    denom = jnp.maximum(w.sum(), 1.0)
    reg = optax.losses.huber_loss(g, f[:, src].astype(g.dtype)).mean(-1)
    logq = jax.nn.log_softmax(logits, -1)
    logp = jax.nn.log_softmax(batch.logits[:, src], -1)
    kl = (jnp.sum(jnp.exp(logp) * (logp - logq), -1) if batch.loss == "soft_ce"  # the paper's
          else batch.distill(batch.logits[:, src], logits))
    hard = jnp.minimum(jnp.arange(g.shape[1]) + self.block + 1, batch.tokens.shape[1] - 1)
    ce = -jnp.take_along_axis(logq, batch.tokens[:, hard, None], -1)[..., 0]
    total = jnp.sum(w * (reg + self.ce_weight * (0.9 * kl + 0.1 * ce))) / denom
    return total, logits, {"reg": jnp.sum(w * reg) / denom, "kl": jnp.sum(w * kl) / denom}

  def loss(self, params, batch: TargetBatch, key):
    k = self.block
    f = batch.features[0]
    b, t = batch.tokens.shape
    n = t - 1
    k_noise, k_glance = jax.random.split(key)
    f_in = f[:, :-1]
    if self.noise:
      f_in = f_in + self.noise * jax.random.uniform(k_noise, f_in.shape, f_in.dtype, -0.5, 0.5)
    nxt = batch.tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    mask = relaxed(n, k)
    src, w = self._targets(batch)
    l1, _ = self.lstm(params, self.pairs(params, batch.shared, f_in, nxt))
    g1, _ = self.layer(params, l1, positions, mask)
    loss1, logits1, m1 = self._pass_loss(g1, batch, src, w)
    top_x = logits1.argmax(-1)
    # Pass 2's inputs: pair i >= k reads pass 1's guess of it (coupled feature + token) ...
    guess_f = jax.lax.stop_gradient(jnp.pad(g1, ((0, 0), (k, 0), (0, 0)))[:, :n])
    guess_x = jnp.pad(top_x, ((0, 0), (k, 0)))[:, :n].astype(nxt.dtype)
    guessed = jnp.broadcast_to(jnp.arange(n) >= k, (b, n))
    wrong = jnp.sum(guessed & (guess_x != nxt) & (batch.mask[:, 1:] > 0), -1)
    # ... but N = lambda * Hamming of them, at random, glance at the truth.
    lam = self.glance * (1.0 - jnp.clip(batch.progress, 0.0, 1.0))
    n_glance = jnp.ceil(lam * wrong)
    score = jnp.where(guessed, jax.random.uniform(k_glance, (b, n)), 2.0)
    rank = jnp.argsort(jnp.argsort(score, -1), -1)
    truth = ~guessed | (rank < n_glance[:, None])
    f2 = jnp.where(truth[..., None], f_in, guess_f.astype(f_in.dtype))
    x2 = jnp.where(truth, nxt, guess_x)
    l2, _ = self.lstm(params, self.pairs(params, batch.shared, f2, x2))
    g2, _ = self.layer(params, l2, positions, mask)
    loss2, _, _ = self._pass_loss(g2, batch, src, w)
    target_top = batch.logits[:, src].argmax(-1)
    metrics = {"reg": m1["reg"], "kl": m1["kl"], "loss/glanced": loss2,
               "glance_share": jnp.sum(guessed & truth) / jnp.maximum(guessed.sum(), 1)}
    block_pos = jnp.arange(n) % k
    for j in range(k):  # draft j + 1 of a forward: outputs at block position j
      wj = w * (block_pos == j)
      metrics[f"top1/{j + 1}"] = jnp.sum(wj * (top_x == target_top)) / jnp.maximum(wj.sum(), 1.0)
    return loss1 + loss2, metrics

  def accept(self, params, batch: TargetBatch, depth: int):
    """Greedy acceptance of the first forward's drafts (depth <= k; a chain's later
    forwards are not simulated) from every pair t: the block that ends at t drafts
    x_{t+2} .. x_{t+k+1}, one relaxed-mask pass per block alignment."""
    k = self.block
    depth = min(depth, k)
    b, t = batch.tokens.shape
    n = t - 1
    f = batch.features[0][:, :-1]
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    l, _ = self.lstm(params, self.pairs(params, batch.shared, f, batch.tokens[:, 1:]))
    tops = []
    for shift in range(k):
      g, _ = self.layer(params, l, positions, relaxed(n, k, shift))
      tops.append(lm_head(self.config, batch.shared, g).argmax(-1))
    tops = jnp.stack(tops)  # [k, B, n]
    rows = jnp.arange(n)
    shift = (k - 1 - rows) % k  # the alignment whose block ends at pair t
    target_top = batch.logits.argmax(-1)
    matches = []
    for j in range(depth):
      p = rows - k + 1 + j
      tok = tops[shift, :, jnp.maximum(p, 0)].T  # [B, n]
      ok = (p >= 0) & (tok == target_top[:, jnp.minimum(rows + j + 1, t - 1)])
      ok &= (rows + j + 2 < t) & (jnp.take(batch.mask, jnp.minimum(rows + j + 2, t - 1), 1) > 0)
      matches.append(ok)
    acc = jnp.pad(jnp.stack(matches, -1), ((0, 0), (0, 1), (0, 0)))
    return acc, jnp.pad(batch.mask[:, 2:], ((0, 0), (0, 2)))

  def drafter(self, params, shared, *, depth: int | None = None, top_k: int = 1,
              tree: Sequence[Sequence[int]] | None = None) -> "Falcon":
    """Falcon's tree (`tree_paths`) `depth` levels deep (default 2 forwards) with `top_k`
    candidates per position, or the tree of choice paths `tree`."""
    paths = tree if tree is not None else tree_paths(depth or 2 * self.block, self.block, top_k)
    return Falcon(self, params, shared, StaticTree.from_choices(paths))


def tree_paths(depth: int, k: int, top_k: int) -> list[tuple[int, ...]]:
  """Falcon's decoding tree as choice paths: inside a block every node gets the `top_k`
  candidates of its position; a new block hangs only under the backbone (all-0 path)."""
  paths, level = [], [()]
  for d in range(depth):
    if d % k == 0:
      level = [(0,) * d]
    level = [p + (r,) for p in level for r in range(top_k)]
    paths += level
  return paths


def _carry_pack(carry) -> jax.Array:
  return jnp.concatenate([x for c in carry for x in c], -1)


def _carry_unpack(z_BxC, layers: int = 2):
  parts = jnp.split(z_BxC, 2 * layers, -1)
  return tuple((parts[2 * n], parts[2 * n + 1]) for n in range(layers))


@flax.struct.dataclass
class FalconState:
  cache: KVCache  # the layer's cache over committed pairs (real features only)
  carry: Any  # the LSTM carry after them
  recent_BxKxH: jax.Array  # LSTM outputs of the last k of them
  pending_BxCxH: jax.Array  # features of the pairs [cache.lengths, ctx.length - 1)


@flax.struct.dataclass
class Falcon:
  """The Falcon drafter (see the module docstring)."""

  head: FalconHead
  params: Any
  shared: Any
  tree: StaticTree = flax.struct.field(pytree_node=False, default=StaticTree.chain(4))
  takes_stop_policy = True
  drafts_vary = False
  features = (FINAL,)

  @property
  def num_nodes(self) -> int:
    return self.tree.num_nodes

  def validate(self, target_config: ModelConfig) -> None:
    self.head.validate(target_config)
    k = self.head.block
    on_backbone = []  # rank 0 all the way from the root
    for node, (parent, rank) in enumerate(zip(self.tree.parents, self.tree.ranks)):
      on_backbone.append(rank == 0 and (parent < 0 or on_backbone[parent]))
      level = self.tree.node_depth[node] - 1
      if parent >= 0 and level % k == 0 and not on_backbone[parent]:
        raise ValueError(f"Falcon's forwards run on the backbone only: tree node {node} "
                         f"starts a block of {k} under a node off the backbone (the "
                         "top-ranked path); see falcon.tree_paths.")

  def _pending(self) -> int:
    return self.tree.depth + 1  # the root + every draft accepted

  def init(self, ctx, max_len: int, features) -> FalconState:
    (f,) = features
    head, k = self.head, self.head.block
    b = f.shape[0]
    cfg = head.config
    cache = KVCache.create(1, b, max_len + self._pending() + self.tree.depth + k,
                           cfg.num_kv_heads, cfg.head_dim, param_dtype(self.params["layer"]))
    n_B = runtime.committed_pairs(ctx)
    nxt = jnp.pad(ctx.history[:, 1:], ((0, 0), (0, 1)))
    l, carry = head.lstm(self.params, head.pairs(self.params, self.shared, f, nxt), lengths_B=n_B)
    run = lambda l_, _nxt, positions, visible, cache: head.layer(self.params, l_, positions,
                                                                  visible, cache)
    cache = runtime.prefill_layer(run, cache, l, nxt, n_B, max_len)
    recent = jnp.take_along_axis(l, jnp.maximum(n_B[:, None] - k + jnp.arange(k), 0)[..., None], 1)
    return FalconState(cache, carry, recent, runtime.pending_init(f, ctx, self._pending()))

  def _catch_up(self, state: FalconState, ctx):
    """The LSTM and the layer over the pending pairs; returns (cache, carry, recent, lag)."""
    head, k = self.head, self.head.block
    c = state.pending_BxCxH.shape[1]
    m_B = state.cache.lengths
    lag_B = ctx.length - 1 - m_B
    idx = jnp.minimum(m_B[:, None] + 1 + jnp.arange(c), ctx.history.shape[1] - 1)
    x = head.pairs(self.params, self.shared, state.pending_BxCxH,
                   jnp.take_along_axis(ctx.history, idx, 1))
    l, carry = head.lstm(self.params, x, state.carry, jnp.maximum(lag_B, 0))
    _, cache = head.layer(self.params, l, m_B[:, None] + jnp.arange(c), causal(c), state.cache)
    recent = jnp.take_along_axis(jnp.concatenate([state.recent_BxKxH, l.astype(
        state.recent_BxKxH.dtype)], 1), (jnp.maximum(lag_B, 0)[:, None] + jnp.arange(k))[..., None],
                                 1)
    return cache.advance(jnp.maximum(lag_B, 0)), carry, recent, lag_B

  def propose(self, state: FalconState, ctx, stop, sampling, key):
    head, k = self.head, self.head.block
    cfg, hs = head.config, head.config.hidden_size
    b = ctx.history.shape[0]
    pos_B = ctx.length - 1
    cache, carry, recent, lag_B = self._catch_up(state, ctx)
    base_B = cache.lengths  # = pos_B: every real pair is in the cache
    # The first forward: the last k pairs see the cache (and so each other), nothing new.
    g, _ = head.layer(self.params, recent, jnp.maximum(base_B[:, None] - k + jnp.arange(k), 0),
                      jnp.zeros((1, k, k), bool), cache)
    logits_root = lm_head(cfg, self.shared, g[:, :1])
    # A node's hidden: [its block's k predicted features | the embeddings of its path's
    # tokens in that block | the LSTM carry before the block].
    z_root = jnp.concatenate([g.reshape(b, 1, k * hs), jnp.zeros((b, 1, k * hs), g.dtype),
                              _carry_pack(carry)[:, None].astype(g.dtype)], -1)
    backbone = jnp.asarray(_backbone_slots(self.tree))

    def step(tokens_BxW, parent_z, positions_BxW, level_cache, prefix):
      del prefix
      d = positions_BxW[0, 0] - pos_B[0]  # the level whose logits this returns (>= 1)
      e = embed(cfg, self.shared, tokens_BxW).astype(parent_z.dtype)
      z = jax.lax.dynamic_update_slice_in_dim(parent_z, e, (k + (d - 1) % k) * hs, 2)
      w = tokens_BxW.shape[1]

      def same_block(z, level_cache):
        g_BxWxH = jax.lax.dynamic_slice_in_dim(z, (d % k) * hs, hs, 2)
        return lm_head(cfg, self.shared, g_BxWxH), z, level_cache

      def next_block(z, level_cache):
        zb = jnp.take(z, backbone[d - 1], axis=1)  # [B, Z]: the backbone node's
        feats = zb[:, :k * hs].reshape(b, k, hs)
        embs = zb[:, k * hs:2 * k * hs].reshape(b, k, hs)
        l, new_carry = head.lstm(self.params, jnp.concatenate([feats, embs], -1),
                                 _carry_unpack(zb[:, 2 * k * hs:]))
        start = base_B + d - k
        g, level_cache = head.layer(self.params, l, start[:, None] + jnp.arange(k),
                                    jnp.ones((1, k, k), bool),
                                    level_cache.replace(lengths=start))
        zn = jnp.concatenate([g.reshape(b, k * hs), jnp.zeros((b, k * hs), g.dtype),
                              _carry_pack(new_carry).astype(g.dtype)], -1).astype(z.dtype)
        logits = lm_head(cfg, self.shared, g[:, :1])
        return (jnp.broadcast_to(logits, (b, w, logits.shape[-1])),
                jnp.broadcast_to(zn[:, None], z.shape), level_cache)

      return jax.lax.cond(d % k == 0, next_block, same_block, z, level_cache)

    tree, cache, _, levels_B = static_tree.draft(self.tree, step, logits_root, z_root, cache,
                                                 pos_B, stop, sampling, key, valid_B=lag_B > 0)
    # Drafted levels -> forwards: the first k levels came from one, each k more from one.
    calls = (levels_B + k - 1) // k
    # Caught up on the pending pairs; the draft blocks' entries past cache.lengths are
    # dropped (overwritten) next step.
    return tree, FalconState(cache, carry, recent, state.pending_BxCxH), calls

  def commit(self, state: FalconState, ctx, verdict, features) -> FalconState:
    """The new pending pairs: the root's and the accepted nodes' real target features."""
    (f,) = features
    return state.replace(pending_BxCxH=runtime.accepted_features(f, verdict, self._pending()))


def _backbone_slots(tree: StaticTree) -> np.ndarray:
  """int[depth]: the padded slot (within its level) of the backbone node of each level."""
  parent_DxW, rank_DxW, real_DxW = tree.padded()
  slots, above = [], 0
  for d in range(tree.depth):
    hits = np.flatnonzero(real_DxW[d] & (rank_DxW[d] == 0) & (
        (parent_DxW[d] == above) if d else True))
    slots.append(int(hits[0]) if len(hits) else 0)
    above = slots[-1]
  return np.asarray(slots, np.int32)


@registry.HEADS.register("falcon")
def _head(target_cfg: ModelConfig, *, block: int = 2, glance: float = 0.4, noise: float = 0.2,
          ce_weight: float = 0.1) -> FalconHead:
  """Falcon: an LSTM + relaxed-mask decoder layer drafting `block` tokens a forward,
  trained with glancing distillation (share `glance` at the start, decaying to 0)."""
  if block < 1:
    raise ValueError(f"Falcon needs block >= 1 tokens per forward (got {block}).")
  if not 0.0 <= glance <= 1.0:
    raise ValueError(f"glance={glance} must be in [0, 1].")
  return FalconHead(target_cfg, block, glance, noise, ce_weight)


@registry.DRAFTERS.register("falcon", takes_stop_policy=True)
def _drafter(target, *, checkpoint: str, budget: str | None = None, depth: int | None = None,
             top_k: int | None = None, tree: Sequence[Sequence[int]] | None = None) -> Falcon:
  """A trained Falcon head folder as Falcon's decoding tree (`tree_paths`) or choice paths;
  unset knobs come from the head's folder, or `budget=COSTS_JSON` sizes the draft from
  measured costs."""
  return io.trained_drafter("falcon", target, checkpoint, budget, depth=depth, top_k=top_k,
                            tree=tree)
