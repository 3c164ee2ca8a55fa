"""Hydra and Hydra++: sequentially dependent draft heads on the target's last hidden state.

Medusa's heads guess each future token from f_t alone; Hydra's head k also reads the
tokens before the one it guesses. With the root x_{t+1} (the last committed token, chosen
by the target from f_t) and the drafted tokens after it:

  z_k = concat(h_t, E(x_{t+1}), ..., E(x_{t+k}))                  (k + 1) H wide
  y_k = R_k z_k + SiLU(W_k z_k + b_k)                             R_k starts as [I 0 ...]
  y_k = y_k + SiLU(U y_k + c)   (mlp_layers - 1 more blocks)     W, U start at zero
  p_k(x_{t+k+1}) = softmax(lm_head(y_k))                          the target's LM head

so a fresh head starts as the target's own guess from h_t, and each head sees the path it
extends (E = the target's token embedding, frozen). Plain Hydra reads h_t = f_t and trains
with cross-entropy against the data's next tokens, teacher-forced. Hydra++ adds a decoder
layer over the target's hidden states (causal over the context, with its own KV cache in
decoding) whose output is h_t, uses 4-block heads, and trains against the target's
distribution (teacher distillation; docs/training.md, "Training recipes").

Decoding drafts level by level with `static_tree.draft` (a chain or a static tree): a
node's state is its z (the root's with the root's embedding, zeros beyond), a level's
step writes its tokens' embeddings into their children's z and runs the next head. The
heads attend nothing, so no draft-time cache is written.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from specjax import registry
from specjax.drafters import io, static_tree
from specjax.drafters.base import TargetBatch, TrainableHead, check_target
from specjax.drafters.heads import runtime
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import FINAL, causal, embed, lm_head, param_dtype
from specjax.tree import StaticTree


def head_out(params, k: int, z):
  """y_k (see the module docstring) of head k (1-based) on z [..., (k + 1) H]."""
  p = params[f"head_{k}"]
  y = z @ p["res"] + jax.nn.silu(z @ p["w"] + p["b"])
  for i in range(p["u"].shape[0] if "u" in p else 0):
    y = y + jax.nn.silu(y @ p["u"][i] + p["c"][i])
  return y


@flax.struct.dataclass
class HydraHead(TrainableHead):
  """Hydra / Hydra++ as a trainable head (see `base.TrainableHead`)."""

  config: ModelConfig = flax.struct.field(pytree_node=False)  # the target's
  num_heads: int = flax.struct.field(pytree_node=False, default=4)
  mlp_layers: int = flax.struct.field(pytree_node=False, default=1)
  prefix_layer: bool = flax.struct.field(pytree_node=False, default=False)
  teacher: bool = flax.struct.field(pytree_node=False, default=False)  # distillation loss
  decay: float = flax.struct.field(pytree_node=False, default=0.8)
  features = (FINAL,)

  def init(self, key, dtype=jnp.float32):
    h = self.config.hidden_size
    params = {}
    for k in range(1, self.num_heads + 1):
      params[f"head_{k}"] = {
          "res": jnp.zeros(((k + 1) * h, h), dtype).at[:h].set(jnp.eye(h, dtype=dtype)),
          "w": jnp.zeros(((k + 1) * h, h), dtype), "b": jnp.zeros((h,), dtype)}
      if self.mlp_layers > 1:
        params[f"head_{k}"].update(u=jnp.zeros((self.mlp_layers - 1, h, h), dtype),
                                   c=jnp.zeros((self.mlp_layers - 1, h), dtype))
    if self.prefix_layer:
      z = jnp.zeros((1, 1, h), dtype)
      params["prefix"] = runtime.FeatureBlock(self.config, dtype).init(
          key, z, jnp.zeros((1, 1), jnp.int32), causal(1))["params"]
    return params

  def prefix(self, params, f_BxTxH, positions_BxT, visible_BxTxT, cache=None, prefix_BxTxS=None):
    """h: Hydra++'s layer over the target's features (with its cache), or f itself."""
    if not self.prefix_layer:
      return f_BxTxH, cache
    return runtime.run_layer(runtime.FeatureBlock(self.config, param_dtype(params)),
                             params["prefix"], (f_BxTxH,), positions_BxT, visible_BxTxT, cache,
                             prefix_BxTxS)

  def _hidden(self, params, batch: TargetBatch):
    f = batch.features[0]
    b, t = batch.tokens.shape
    return self.prefix(params, f, jnp.broadcast_to(jnp.arange(t), (b, t)), causal(t))[0]

  def _logits_along(self, params, batch: TargetBatch, path_BxT, depth: int):
    """Head k's logits at every position t for k = 1..depth, each reading h_t, the real
    x_{t+1} and path tokens t+1 .. t+k-1 (the teacher-forced path): a list [B, T-k, V]."""
    h = self._hidden(params, batch)
    t = batch.tokens.shape[1]
    e_next = embed(self.config, batch.shared, batch.tokens)  # E(x_i)
    e_path = embed(self.config, batch.shared, path_BxT)
    out = []
    for k in range(1, depth + 1):
      n = t - k  # positions i whose inputs exist (up to x_{i+k}); callers cut the guesses
      parts = [h[:, :n], e_next[:, 1:n + 1]] + [e_path[:, i + 1:i + 1 + n] for i in range(1, k)]
      z = jnp.concatenate(parts, -1).astype(params["head_1"]["w"].dtype)
      out.append(lm_head(self.config, batch.shared, head_out(params, k, z)))
    return out

  def loss(self, params, batch: TargetBatch, key):
    del key
    t = batch.tokens.shape[1]
    total, metrics = 0.0, {}
    for k, logits in enumerate(self._logits_along(params, batch, batch.tokens, self.num_heads), 1):
      # Head k at position i guesses x_{i+k+1}: the target's distribution at i + k.
      logits = logits[:, :t - k - 1]
      target = batch.logits[:, k:t - 1]
      w = batch.mask[:, k + 1:]
      denom = jnp.maximum(w.sum(), 1.0)
      if self.teacher:
        ce = batch.distill(target, logits)
      else:
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch.tokens[:, k + 1:, None],
                                  -1)[..., 0]
      ce = jnp.sum(w * ce) / denom
      total += self.decay ** (k - 1) * ce
      metrics[f"ce/{k}"] = ce
      metrics[f"top1/{k}"] = jnp.sum(w * (logits.argmax(-1) == target.argmax(-1))) / denom
    return total, metrics

  def accept(self, params, batch: TargetBatch, depth: int):
    """Greedy chain acceptance: while drafts are accepted they are the target's argmax
    tokens, so the path the heads read is the target's argmax."""
    b, t = batch.tokens.shape
    depth = min(depth, self.num_heads)
    target_top = batch.logits.argmax(-1)
    path = jnp.pad(target_top[:, :-1], ((0, 0), (1, 0)))  # path[i] = argmax at i - 1
    matches = []
    for k, logits in enumerate(self._logits_along(params, batch, path, depth), 1):
      i = jnp.arange(t - k)
      ok = (logits.argmax(-1) == target_top[:, k:]) & (i + k + 1 < t)
      ok &= jnp.take(batch.mask, jnp.minimum(i + k + 1, t - 1), axis=1) > 0
      matches.append(jnp.pad(ok, ((0, 0), (0, k))))
    return jnp.stack(matches, -1), jnp.pad(batch.mask[:, 2:], ((0, 0), (0, 2)))

  def drafter(self, params, shared, *, depth: int | None = None, top_k: int = 1,
              tree: Sequence[Sequence[int]] | None = None) -> "Hydra":
    """A chain of `depth` tokens (default: one per head), the full top_k-ary tree, or the
    tree of choice paths (`StaticTree.build`)."""
    return Hydra(self, params, shared, StaticTree.build(depth or self.num_heads, top_k, tree))


@flax.struct.dataclass
class HydraState:
  cache: KVCache | None  # Hydra++'s layer cache over committed positions
  pending_BxCxH: jax.Array  # features of positions [cache.lengths, ctx.length - 1)
  h_BxH: jax.Array  # plain Hydra: the feature at the token before the root


@flax.struct.dataclass
class Hydra:
  """The Hydra drafter (see the module docstring)."""

  head: HydraHead
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
    cfg = self.head.config
    check_target("This Hydra head", cfg.hidden_size, cfg.vocab_size, target_config)
    if self.tree.depth > self.head.num_heads:
      raise ValueError(f"A tree of depth {self.tree.depth} needs {self.tree.depth} Hydra "
                       f"heads; this one has {self.head.num_heads}.")

  def _pending(self) -> int:
    return self.tree.depth + 1  # the root + every draft accepted

  def _layer(self, f, nxt, positions, visible, cache, prefix=None):
    del nxt
    return self.head.prefix(self.params, f, positions, visible, cache, prefix)

  def init(self, ctx, max_len: int, features) -> HydraState:
    (f,) = features
    b = f.shape[0]
    pending = runtime.pending_init(f, ctx, self._pending())
    cache = None
    if self.head.prefix_layer:
      cfg = self.head.config
      cache = KVCache.create(1, b, max_len + self._pending(), cfg.num_kv_heads, cfg.head_dim,
                             param_dtype(self.params))
      cache = runtime.prefill_layer(self._layer, cache, f, ctx.history,
                                    runtime.committed_pairs(ctx), max_len)
    return HydraState(cache, pending, pending[:, 0])

  def propose(self, state: HydraState, ctx, stop, sampling, key):
    cfg, head = self.head.config, self.head
    b = ctx.history.shape[0]
    pos_B = ctx.length - 1
    if head.prefix_layer:
      h, cache, lag_B = runtime.catch_up(self._layer, state.cache, state.pending_BxCxH, ctx)
      known_B = lag_B > 0
    else:
      h, cache, known_B = state.h_BxH[:, None], state.cache, ctx.length >= 2
    hs = cfg.hidden_size
    root = jnp.take_along_axis(ctx.history, pos_B[:, None], 1)
    z = jnp.zeros((b, 1, (head.num_heads + 1) * hs), h.dtype)
    z = z.at[..., :hs].set(h).at[..., hs:2 * hs].set(embed(cfg, self.shared, root).astype(h.dtype))
    logits_root = lm_head(cfg, self.shared, head_out(self.params, 1, z[..., :2 * hs]))

    def step(tokens_BxW, parent_z, positions_BxW, level_cache, prefix):
      del prefix
      d = positions_BxW[0, 0] - pos_B[0]  # the level (>= 1) below the parents' tokens
      z = jax.lax.dynamic_update_slice_in_dim(
          parent_z, embed(cfg, self.shared, tokens_BxW).astype(parent_z.dtype), (d + 1) * hs, 2)
      branch = lambda k: lambda z: lm_head(cfg, self.shared,
                                           head_out(self.params, k, z[..., :(k + 1) * hs]))
      ks = list(range(2, head.num_heads + 1)) or [1]  # one head: no level below the root's
      logits = jax.lax.switch(jnp.clip(d - 1, 0, len(ks) - 1), [branch(k) for k in ks], z)
      return logits, z, level_cache

    # The heads attend nothing: the levels get a one-slot-per-node placeholder cache.
    levels = KVCache.create(1, b, self.tree.depth * self.tree.width, 1, 1, h.dtype)
    tree, _, _, calls = static_tree.draft(self.tree, step, logits_root, z, levels, pos_B, stop,
                                          sampling, key, valid_B=known_B)
    return tree, HydraState(cache, state.pending_BxCxH, state.h_BxH), calls

  def commit(self, state: HydraState, ctx, verdict, features) -> HydraState:
    """The features of the root and the accepted path (Hydra++ catches its layer up on
    them next step); plain Hydra keeps the last one."""
    (f,) = features
    pending = runtime.accepted_features(f, verdict, self._pending())
    a_B = verdict.accepted_drafts
    return HydraState(state.cache, pending,
                      jnp.take_along_axis(pending, a_B[:, None, None], 1)[:, 0])


@registry.HEADS.register("hydra")
def _head(target_cfg: ModelConfig, *, num_heads: int = 4, mlp_layers: int = 1,
          prefix_layer: bool = False, teacher: bool = False, decay: float = 0.8) -> HydraHead:
  """Hydra (sequentially dependent heads); Hydra++ = prefix_layer=True, mlp_layers=4,
  teacher=True (configs/hydra.py:plus)."""
  if num_heads < 1 or mlp_layers < 1:
    raise ValueError(f"Hydra needs num_heads >= 1 and mlp_layers >= 1 (got {num_heads}, "
                     f"{mlp_layers}).")
  return HydraHead(target_cfg, num_heads, mlp_layers, prefix_layer, teacher, decay)


@registry.DRAFTERS.register("hydra", takes_stop_policy=True)
def _drafter(target, *, checkpoint: str, budget: str | None = None, depth: int | None = None,
             top_k: int | None = None, tree: Sequence[Sequence[int]] | None = None) -> Hydra:
  """A trained Hydra / Hydra++ head folder as a chain or a static tree; unset knobs come
  from the head's folder, or `budget=COSTS_JSON` sizes the chain from measured costs."""
  return io.trained_drafter("hydra", target, checkpoint, budget, depth=depth, top_k=top_k,
                            tree=tree)
