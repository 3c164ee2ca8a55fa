"""DFlash: a block-parallel drafter that drafts a whole block in one non-causal forward.

A few decoder layers read the target's hidden states as *context*: the states of several
target layers (evenly spaced from layer 1 to L-3) are concatenated and fused,

  c_t = hidden_norm(fc(concat(h^{l_1}_t, ..., h^{l_n}_t)))        n*H -> H, no bias

and every draft layer projects c_t through its own k_proj / v_proj (with RoPE at t) into
extra keys and values in front of the block's own. The query block is

  [x_r, m, m, ..., m]     at positions r, r + 1, ..., r + k - 1

(x_r the root, the last committed token, m a mask token), embedded with the target's
frozen embedding; it sees every committed context position < r and itself in both
directions, and the target's frozen LM head reads slot j's final normed state as the
draft of token r + j. So a block of k positions drafts k - 1 tokens in one call,
independent of the draft length.

Decoding keeps, per draft layer, a cache of the context keys/values of the committed
tokens: the prompt's at `init`, then the root's and the accepted tokens' from the
verification forward's features at `commit` (the root's own state is known only after
it is verified, so a block never sees it as context, as in training). Slot j of the
block fills tree level j: a chain (rank 0 everywhere) or a static tree of each slot's
top candidates (`static_tree.from_levels`), which no engine serves for DFlash today.
At T > 0 the levels are sampled from each slot's distribution (i.i.d. siblings, or
distinct ones for Recursive SD) and verified losslessly against it.

Training (`DFlashHead.loss`): random anchors r per row (Gumbel-top-A over positions whose
next token is a response token), one block per anchor, all blocks of a row in one
forward (block-diagonal visibility, each block seeing context < its anchor). Slot j is
scored against the target's distribution at r + j - 1 (soft cross-entropy, the forward
KL up to a constant; `loss="hard"` takes the data token instead), weighted
exp(-(j - 1) / gamma) and normalised by the weights' sum.

DSpark (`markov_rank > 0`, head "dspark"): a low-rank Markov head adds a logit bias from
the previous token, B(x_{j-1}) = W2 W1[x_{j-1}] (rank r), so slot j's distribution is
softmax(U_j + B(x_{j-1})); a confidence head c_j = sigmoid(w . [h_j; W1[x_{j-1}]] + b)
predicts slot j's acceptance. Training (teacher-forced previous tokens) adds
a_ce x CE(data token) + a_tv x ||p_j - p_target||_1 + a_conf x BCE(c_j, 1 - TV(p_j, p_target))
(DeepSpec's 0.1 / 0.9 / 1.0), each weighted exp(-(j - 1) / gamma). Decoding drafts the chain
slot by slot (x_{j-1} is the drafted token; the block's forward is still one), and the
draft ends where the cumulative product of confidences falls under `threshold`.

Departures (docs/heads.md, "DFlash"): the mask token is a target vocabulary id
(`mask_token`, default vocab_size - 1, SmolLM2 has no spare row); the target layers are
named as specjax names features (layer *inputs*: z-lab's layer id l is feature l + 1).
`from_zlab` / `export_zlab` read and write z-lab's checkpoint layout.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import assets, kernels, registry
from specjax import sampling as sampling_lib
from specjax.drafters import io, static_tree
from specjax.drafters.base import TargetBatch, TrainableHead, check_target
from specjax.drafters.heads import runtime
from specjax.models import cache as cache_lib
from specjax.models import llama
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig, from_hf_config
from specjax.models.model import FINAL, embed, lm_head, param_dtype
from specjax.tree import DraftTree, StaticTree

LOSSES = ("soft", "hard")


def default_taps(num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
  """The target features DFlash reads by default: z-lab's layer ids, evenly spaced from
  layer 1 to L - 3 (L // 2 for one draft layer), as layer inputs (id + 1)."""
  num, n = num_target_layers, num_draft_layers
  ids = [num // 2] if n == 1 else [int(round(1 + i * (num - 4) / (n - 1))) for i in range(n)]
  ids = sorted({min(max(i, 0), num - 2) for i in ids})
  return tuple(i + 1 for i in ids)


# --- the network: pure functions over a params dict named as flax names its layers -------

def _dense(p, x):
  y = x @ p["kernel"].astype(x.dtype)
  return y + p["bias"] if "bias" in p else y


def _rms(p, x, eps: float):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
  return p["scale"] * x32.astype(x.dtype)


def _kv(cfg: ModelConfig, p, x_BxSxH, cos, sin):
  """One layer's keys and values [B, KVH, S, Dh] of inputs x (RoPE on the keys)."""
  b, s, _ = x_BxSxH.shape
  k = _dense(p["k_proj"], x_BxSxH).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
  v = _dense(p["v_proj"], x_BxSxH).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    k = _rms(p["k_norm"], k, cfg.norm_eps)
  return llama.apply_rope(k, cos, sin).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def context_kv(cfg: ModelConfig, params, ctx_BxSxH, positions_BxS) -> tuple:
  """Every draft layer's (keys, values) of fused context states at their positions."""
  cos, sin = llama.rope_cos_sin(cfg, positions_BxS, ctx_BxSxH.dtype)
  return tuple(_kv(cfg, params[f"layers_{i}"]["self_attn"], ctx_BxSxH, cos, sin)
               for i in range(cfg.num_layers))


def block_forward(cfg: ModelConfig, params, x_BxTxH, positions_BxT, visible_BxTxT,
                  ctx_kv: tuple, prefix_BxTxS) -> jax.Array:
  """The draft layers on T block inputs, each attending to the context keys/values
  `ctx_kv` (per layer, [B, KVH, S, Dh]) where `prefix_BxTxS` allows and to the block where
  `visible_BxTxT` allows. Returns the final normed states [B, T, H]."""
  b, t, _ = x_BxTxH.shape
  cos, sin = llama.rope_cos_sin(cfg, positions_BxT, x_BxTxH.dtype)
  x = x_BxTxH
  for i in range(cfg.num_layers):
    p = params[f"layers_{i}"]
    a = p["self_attn"]
    h = _rms(p["input_layernorm"], x, cfg.norm_eps)
    q = _dense(a["q_proj"], h).reshape(b, t, cfg.num_heads, cfg.head_dim)
    if cfg.qk_norm:
      q = _rms(a["q_norm"], q, cfg.norm_eps)
    q = llama.apply_rope(q, cos, sin)
    k, v = _kv(cfg, a, h, cos, sin)
    o = kernels.attention(q, k, v, visible_BxTxT, ctx_kv[i][0], ctx_kv[i][1], prefix_BxTxS)
    x = x + _dense(a["o_proj"], o.reshape(b, t, -1))
    m = p["mlp"]
    h = _rms(p["post_attention_layernorm"], x, cfg.norm_eps)
    x = x + _dense(m["down_proj"], jax.nn.silu(_dense(m["gate_proj"], h)) *
                   _dense(m["up_proj"], h))
  return _rms(params["norm"], x, cfg.norm_eps)


def init_params(cfg: ModelConfig, num_taps: int, key, dtype=jnp.float32) -> dict:
  """Fresh DFlash params: kernels ~ N(0, 1/fan_in), norm scales 1."""
  h, hd = cfg.hidden_size, cfg.head_dim
  keys = iter(jax.random.split(key, 1 + 7 * cfg.num_layers))
  dense = lambda n_in, n_out: {"kernel": (jax.random.normal(next(keys), (n_in, n_out), dtype)
                                          * n_in ** -0.5)}
  ones = lambda n: {"scale": jnp.ones((n,), dtype)}
  params = {"fc": dense(num_taps * h, h), "hidden_norm": ones(h), "norm": ones(h)}
  for i in range(cfg.num_layers):
    attn = {"q_proj": dense(h, cfg.num_heads * hd), "k_proj": dense(h, cfg.num_kv_heads * hd),
            "v_proj": dense(h, cfg.num_kv_heads * hd), "o_proj": dense(cfg.num_heads * hd, h)}
    if cfg.attention_bias:
      for n in ("q_proj", "k_proj", "v_proj"):
        attn[n]["bias"] = jnp.zeros((attn[n]["kernel"].shape[1],), dtype)
    if cfg.qk_norm:
      attn.update(q_norm=ones(hd), k_norm=ones(hd))
    params[f"layers_{i}"] = {
        "input_layernorm": ones(h), "post_attention_layernorm": ones(h), "self_attn": attn,
        "mlp": {"gate_proj": dense(h, cfg.intermediate_size),
                "up_proj": dense(h, cfg.intermediate_size),
                "down_proj": dense(cfg.intermediate_size, h)}}
  return params


@flax.struct.dataclass
class DFlashHead(TrainableHead):
  """DFlash as a trainable head (`base.TrainableHead`; the module docstring)."""

  config: ModelConfig = flax.struct.field(pytree_node=False)  # the target's
  layer: ModelConfig = flax.struct.field(pytree_node=False)  # the draft layers' shape
  taps: tuple[int, ...] = flax.struct.field(pytree_node=False)  # target layer inputs read
  block_size: int = flax.struct.field(pytree_node=False, default=8)
  mask_token: int = flax.struct.field(pytree_node=False, default=0)
  gamma: float = flax.struct.field(pytree_node=False, default=4.0)
  num_anchors: int = flax.struct.field(pytree_node=False, default=32)
  loss_kind: str = flax.struct.field(pytree_node=False, default="soft")
  # DSpark: the Markov head's rank (0 = DFlash) and the loss weights of its three terms.
  markov_rank: int = flax.struct.field(pytree_node=False, default=0)
  ce_weight: float = flax.struct.field(pytree_node=False, default=0.1)
  tv_weight: float = flax.struct.field(pytree_node=False, default=0.9)
  conf_weight: float = flax.struct.field(pytree_node=False, default=1.0)

  @property
  def features(self) -> tuple[int, ...]:
    return self.taps

  def init(self, key, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    params = init_params(self.layer, len(self.taps), k1, dtype)
    if self.markov_rank:  # W2 zero: a fresh DSpark drafts as its DFlash backbone
      r, v, h = self.markov_rank, self.config.vocab_size, self.layer.hidden_size
      params["markov"] = {"w1": jax.random.normal(k2, (v, r), dtype) * r ** -0.5,
                          "w2": jnp.zeros((r, v), dtype)}
      params["confidence"] = {"kernel": jax.random.normal(k3, (h + r, 1), dtype) * 0.01,
                              "bias": jnp.zeros((1,), dtype)}
    return params

  def markov(self, params, logits_xV, prev_x):
    """(Markov-corrected logits [..., V], confidence logit [...]) of slot states whose
    backbone logits are `logits_xV`, given the previous tokens (identity for DFlash)."""
    if not self.markov_rank:
      return logits_xV, None
    e = jnp.take(params["markov"]["w1"], prev_x, axis=0)
    return logits_xV + (e @ params["markov"]["w2"]).astype(jnp.float32), e

  def truncate_markov(self, params, rank: int) -> tuple["DFlashHead", dict]:
    """(head, params) with the Markov head cut to `rank`, without retraining.

    The rank-r factors feed two maps of the previous token: the logit bias W1[x] W2 and
    the confidence's share W1[x] . w_e (w_e: the confidence kernel's rows that read the
    code). Both are rows of W1 [W2 | s w_e], and its best rank-`rank` approximation (the
    truncated SVD, from QR of W1 and SVD of the small r x (V + 1) factor) replaces them;
    s = ||W2|| / ||w_e|| weighs the confidence column like the whole bias."""
    r = self.markov_rank
    if not 0 < rank <= r:
      raise ValueError(f"truncate_markov: rank {rank} must be in 1..{r} (this head's rank).")
    m, conf = params["markov"], params["confidence"]
    h = self.layer.hidden_size
    w1 = np.asarray(m["w1"], np.float64)
    w_e = np.asarray(conf["kernel"], np.float64)[h:]  # [r, 1]
    scale = np.linalg.norm(m["w2"]) / max(np.linalg.norm(w_e), 1e-12)
    right = np.concatenate([np.asarray(m["w2"], np.float64), scale * w_e], 1)  # [r, V + 1]
    q, rr = np.linalg.qr(w1)  # [V, r], [r, r]
    u, s, vt = np.linalg.svd(rr @ right, full_matrices=False)
    root = np.sqrt(s[:rank])
    new_w1 = (q @ u[:, :rank]) * root  # [V, rank]
    new_right = root[:, None] * vt[:rank]  # [rank, V + 1]
    dtype = m["w1"].dtype
    out = dict(params, markov={"w1": jnp.asarray(new_w1, dtype),
                               "w2": jnp.asarray(new_right[:, :-1], dtype)},
               confidence={"kernel": jnp.concatenate(
                   [conf["kernel"][:h], jnp.asarray(new_right[:, -1:] / scale, dtype)]),
                           "bias": conf["bias"]})
    return self.replace(markov_rank=rank), out

  def confidence(self, params, g_xH, e_xR) -> jax.Array:
    """DSpark's confidence logit [...] of slot states g and their previous-token codes."""
    x = jnp.concatenate([g_xH, e_xR.astype(g_xH.dtype)], -1)
    return _dense(params["confidence"], x)[..., 0].astype(jnp.float32)

  def fuse(self, params, features) -> jax.Array:
    """[B, T, H]: the fused context state c_t of the target's tapped states."""
    x = jnp.concatenate([f.astype(param_dtype(params)) for f in features], -1)
    return _rms(params["hidden_norm"], _dense(params["fc"], x), self.layer.norm_eps)

  def weights(self) -> np.ndarray:
    """float32[k - 1]: slot j's loss weight exp(-(j - 1) / gamma)."""
    return np.exp(-np.arange(self.block_size - 1) / self.gamma).astype(np.float32)

  def blocks(self, params, shared, ctx_kv, tokens_BxT, anchors_BxA, slots: int) -> jax.Array:
    """Final states [B, A, slots, H] of slots 1..slots of the block at each anchor: the
    block [x_r, m, ..., m] at positions r.., seeing the context < r and itself."""
    b, t = tokens_BxT.shape
    a, k = anchors_BxA.shape[1], self.block_size
    root_BxA = jnp.take_along_axis(tokens_BxT, jnp.clip(anchors_BxA, 0, t - 1), 1)
    toks = jnp.where(jnp.arange(k) == 0, root_BxA[..., None], self.mask_token)
    x = embed(self.config, shared, toks.reshape(b, a * k)).astype(param_dtype(params))
    positions = (anchors_BxA[..., None] + jnp.arange(k)).reshape(b, a * k)
    block_id = np.repeat(np.arange(a), k)
    visible = jnp.asarray(block_id[:, None] == block_id[None, :])[None]
    prefix = jnp.arange(t)[None, None, :] < jnp.repeat(anchors_BxA, k, 1)[..., None]
    g = block_forward(self.layer, params, x, positions, visible, ctx_kv, prefix)
    return g.reshape(b, a, k, -1)[:, :, 1:1 + slots]

  def _context(self, params, batch: TargetBatch):
    b, t = batch.tokens.shape
    return context_kv(self.layer, params, self.fuse(params, batch.features),
                      jnp.broadcast_to(jnp.arange(t), (b, t)))

  def loss(self, params, batch: TargetBatch, key):
    b, t = batch.tokens.shape
    k = self.block_size
    # Anchors r with a response token at r + 1, drawn without replacement.
    pos = jnp.arange(t)
    ok_BxT = (pos >= 1) & (pos + 1 < t) & (jnp.pad(batch.mask[:, 1:], ((0, 0), (0, 1))) > 0)
    score, anchors = jax.lax.top_k(
        jnp.where(ok_BxT, jax.random.gumbel(key, (b, t)), -jnp.inf), min(self.num_anchors, t))
    live_BxA = jnp.isfinite(score)
    g = self.blocks(params, batch.shared, self._context(params, batch), batch.tokens, anchors,
                    k - 1)
    logits = lm_head(self.config, batch.shared, g)  # [B, A, k - 1, V]
    at = anchors[..., None] + jnp.arange(1, k)  # the drafted token's position
    inside = live_BxA[..., None] & (at < t)
    at = jnp.minimum(at, t - 1)
    mask = jnp.take_along_axis(batch.mask, at.reshape(b, -1), 1).reshape(at.shape)
    target = jnp.take_along_axis(batch.logits, (at - 1).reshape(b, -1)[..., None], 1
                                 ).reshape(logits.shape)
    label = jnp.take_along_axis(batch.tokens, at.reshape(b, -1), 1).reshape(at.shape)
    w = inside * mask * jnp.asarray(self.weights())
    norm = lambda x: jnp.sum(w * x) / jnp.maximum(w.sum(), 1e-6)
    hard = lambda lg: -jnp.take_along_axis(jax.nn.log_softmax(lg, -1), label[..., None],
                                           -1)[..., 0]
    metrics = {}
    if self.markov_rank:  # DSpark: teacher-forced previous tokens (the anchor's for slot 1)
      prev = jnp.take_along_axis(batch.tokens, (at - 1).reshape(b, -1), 1).reshape(at.shape)
      logits, e = self.markov(params, logits, prev)
      p, p_t = jax.nn.softmax(logits, -1), jax.nn.softmax(target, -1)
      l1 = jnp.sum(jnp.abs(p - p_t), -1)
      soft = jax.lax.stop_gradient(jnp.clip(1 - 0.5 * l1, 0, 1))
      z = self.confidence(params, g, e)
      bce = jnp.maximum(z, 0) - z * soft + jnp.log1p(jnp.exp(-jnp.abs(z)))
      ce, tv_, conf = norm(hard(logits)), norm(l1), norm(bce)
      loss = self.ce_weight * ce + self.tv_weight * tv_ + self.conf_weight * conf
      metrics.update(ce=ce, l1=tv_, conf_bce=conf,
                     conf_err=norm(jnp.abs(jax.nn.sigmoid(z) - soft)))
    else:
      loss = norm(batch.distill(target, logits) if self.loss_kind == "soft" else hard(logits))
      metrics["ce"] = loss
    hit = logits.argmax(-1) == target.argmax(-1)
    counted = (inside * mask).sum((0, 1))
    metrics.update({f"top1/{j + 1}": jnp.sum((inside * mask * hit)[..., j]) / jnp.maximum(
        counted[j], 1.0) for j in range(k - 1)})
    return loss, metrics

  def accept(self, params, batch: TargetBatch, depth: int, chunk: int = 32):
    """Greedy chain acceptance with the root at every position (anchors 1..T-1, `chunk`
    blocks a forward)."""
    b, t = batch.tokens.shape
    depth = min(depth, self.block_size - 1)
    ctx_kv = self._context(params, batch)
    n = -(-(t - 1) // chunk) * chunk
    anchors = (1 + jnp.arange(n)).reshape(-1, chunk)

    target_top = batch.logits.argmax(-1)

    def top(a_C):
      a_BxC = jnp.broadcast_to(a_C, (b, chunk))
      g = self.blocks(params, batch.shared, ctx_kv, batch.tokens, a_BxC, depth)
      logits = lm_head(self.config, batch.shared, g)  # [B, C, depth, V]
      # DSpark's previous token: the root, then the drafts (on an accepted prefix, the
      # target's argmax).
      at = jnp.minimum(a_BxC[..., None] + jnp.arange(depth), t - 1)
      prev = jnp.where(jnp.arange(depth) == 0,
                       jnp.take_along_axis(batch.tokens, at[..., :1].reshape(b, -1), 1
                                           ).reshape(b, chunk, 1),
                       jnp.take_along_axis(target_top, (at - 1).reshape(b, -1), 1
                                           ).reshape(at.shape))
      return self.markov(params, logits, prev)[0].argmax(-1)  # [B, C, depth]

    top_BxNxD = jnp.moveaxis(jax.lax.map(top, anchors), 0, 1).reshape(b, n, depth)[:, :t - 1]
    # Root at r = i + 1: draft j is token i + 1 + j, the target's argmax at i + j.
    i = jnp.arange(t - 1)[:, None] + jnp.arange(1, depth + 1)[None, :]
    target_top = jnp.take(target_top, jnp.minimum(i, t - 1), axis=1)
    ok = (top_BxNxD == target_top) & (i + 1 < t)
    ok &= jnp.take(batch.mask, jnp.minimum(i + 1, t - 1), axis=1) > 0
    return jnp.pad(ok, ((0, 0), (0, 1), (0, 0))), jnp.pad(batch.mask[:, 2:], ((0, 0), (0, 2)))

  def drafter(self, params, shared, *, depth: int | None = None, top_k: int = 1,
              tree: Sequence[Sequence[int]] | None = None,
              threshold: float = 0.0) -> "DFlash":
    """A chain of `depth` tokens (default: the block's k - 1), the full top_k-ary tree of
    each slot's candidates, or the tree of choice paths; DSpark: a chain cut where the
    cumulative product of confidences falls under `threshold` (0 = never)."""
    if not 0 <= threshold < 1:
      raise ValueError(f"threshold must be in [0, 1); got {threshold}.")
    if threshold and not self.markov_rank:
      raise ValueError("threshold cuts DSpark's chains by its confidence head; this DFlash "
                       "head has none.")
    return DFlash(self, params, shared,
                  StaticTree.build(depth or self.block_size - 1, top_k, tree), threshold)

  def validate(self, target_config: ModelConfig) -> None:
    check_target("This DFlash head", self.config.hidden_size, self.config.vocab_size,
                 target_config)
    bad = [f for f in self.taps if f != FINAL and not 0 <= f < target_config.num_layers]
    if bad or not self.taps:
      raise ValueError(f"DFlash taps {list(self.taps)} must be target features: layer inputs "
                       f"0..{target_config.num_layers - 1} of this "
                       f"{target_config.num_layers}-layer target, or FINAL ({FINAL}).")


@flax.struct.dataclass
class DFlashState:
  cache: KVCache  # per draft layer, the committed context's keys/values; slot = position


@flax.struct.dataclass
class DFlash:
  """The DFlash drafter (the module docstring)."""

  head: DFlashHead = flax.struct.field(pytree_node=False)
  params: Any
  shared: Any
  tree: StaticTree = flax.struct.field(pytree_node=False, default=StaticTree.chain(7))
  threshold: float = flax.struct.field(pytree_node=False, default=0.0)  # DSpark's cut
  takes_stop_policy = False
  merges = True  # commit reads the verdict's path and features only

  @property
  def drafts_vary(self) -> bool:  # DSpark's confidence cuts its chains short
    return self.threshold > 0

  @property
  def features(self) -> tuple[int, ...]:
    return self.head.taps

  @property
  def num_nodes(self) -> int:
    return self.tree.num_nodes

  def validate(self, target_config: ModelConfig) -> None:
    self.head.validate(target_config)
    if self.head.markov_rank and self.tree.parents != StaticTree.chain(self.tree.depth).parents:
      raise ValueError("DSpark drafts chains (its Markov head reads each slot's previous "
                       "drafted token): give depth, not top_k or tree.")
    if self.tree.depth > self.head.block_size - 1:
      raise ValueError(f"A tree of depth {self.tree.depth} needs a DFlash block of "
                       f"{self.tree.depth + 1}; this head's block is {self.head.block_size}.")

  def _write(self, cache: KVCache, ctx_BxSxH, positions_BxS, start_B) -> KVCache:
    kv = context_kv(self.head.layer, self.params, ctx_BxSxH, positions_BxS)
    return cache.replace(k=tuple(cache_lib.write(c, k, start_B) for c, (k, _) in zip(cache.k, kv)),
                         v=tuple(cache_lib.write(c, v, start_B) for c, (_, v) in zip(cache.v, kv)))

  def init(self, ctx, max_len: int, features) -> DFlashState:
    f = self.head.fuse(self.params, features)  # [B, max_len, H]
    b = f.shape[0]
    layer = self.head.layer
    cache = KVCache.create(layer.num_layers, b, max_len + self.tree.depth + 1,
                           layer.num_kv_heads, layer.head_dim, param_dtype(self.params))
    cache = self._write(cache, f, jnp.broadcast_to(jnp.arange(max_len), (b, max_len)),
                        jnp.zeros((b,), jnp.int32))
    return DFlashState(cache.replace(lengths=jnp.maximum(ctx.length - 1, 0)))

  def propose(self, state: DFlashState, ctx, stop, sampling, key):
    del stop
    cache = state.cache
    b, k = ctx.history.shape[0], self.head.block_size
    r_B = ctx.length - 1
    root = jnp.take_along_axis(ctx.history, r_B[:, None], 1)
    toks = jnp.where(jnp.arange(k) == 0, root, self.head.mask_token)
    x = embed(self.head.config, self.shared, toks).astype(param_dtype(self.params))
    g = block_forward(self.head.layer, self.params, x, r_B[:, None] + jnp.arange(k),
                      jnp.ones((1, k, k), bool), tuple(zip(cache.k, cache.v)),
                      cache.prefix_mask(k))
    g = g[:, 1:1 + self.tree.depth]
    logits_BxDxV = lm_head(self.head.config, self.shared, g)
    if self.head.markov_rank:
      tree = self._markov_chain(g, logits_BxDxV, root[:, 0], sampling, key)
    else:
      tree = static_tree.from_levels(self.tree, logits_BxDxV, sampling, key)
    return tree, state, jnp.ones((b,), jnp.int32)

  def _markov_chain(self, g_BxDxH, logits_BxDxV, root_B, sampling, key) -> DraftTree:
    """DSpark's chain: slot by slot, each conditioned on the token drafted before it, cut
    where the cumulative product of confidences falls under the threshold."""
    prev, toks, qs, conf = root_B, [], [], []
    for j, k in enumerate(jax.random.split(key, self.tree.depth)):
      logits, e = self.head.markov(self.params, logits_BxDxV[:, j], prev)
      q = sampling_lib.probs(logits, sampling)
      prev = sampling_lib.sample(k, q, sampling)
      toks.append(prev)
      qs.append(q)
      conf.append(jax.nn.sigmoid(self.head.confidence(self.params, g_BxDxH[:, j], e)))
    valid = jnp.cumprod(jnp.stack(conf, 1), 1) >= self.threshold
    return DraftTree.chain(jnp.stack(toks, 1), valid,
                           None if sampling.greedy else jnp.stack(qs, 1),
                           sampled=not sampling.greedy)

  def commit(self, state: DFlashState, ctx, verdict, features) -> DFlashState:
    """Appends the context of the root and the accepted nodes (their real features)."""
    c = self.tree.depth + 1
    f = runtime.accepted_features(self.head.fuse(self.params, features), verdict, c)
    cache = state.cache
    cache = self._write(cache, f, cache.lengths[:, None] + jnp.arange(c), cache.lengths)
    return DFlashState(cache.advance(verdict.accepted_drafts + 1))


def _build(target_cfg: ModelConfig, num_layers, taps, block_size, mask_token, gamma,
           num_anchors, loss, **dspark) -> DFlashHead:
  if loss not in LOSSES:
    raise ValueError(f"Unknown DFlash loss {loss!r}; expected one of {LOSSES}.")
  for name, v, low in (("num_layers", num_layers, 1), ("block_size", block_size, 2),
                       ("num_anchors", num_anchors, 1),
                       ("markov_rank", dspark.get("markov_rank", 0), 0)):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f"DFlash {name} must be an integer >= {low}; got {v!r}.")
  if not gamma > 0:
    raise ValueError(f"DFlash gamma must be > 0; got {gamma}.")
  mask_token = target_cfg.vocab_size - 1 if mask_token is None else int(mask_token)
  if not 0 <= mask_token < target_cfg.vocab_size:
    raise ValueError(f"DFlash mask_token {mask_token} is not a token id of this target "
                     f"(vocabulary {target_cfg.vocab_size}).")
  taps = tuple(int(f) for f in taps) if taps else default_taps(target_cfg.num_layers,
                                                                num_layers)
  head = DFlashHead(target_cfg, target_cfg.replace(num_layers=num_layers), taps, block_size,
                    mask_token, float(gamma), num_anchors, loss, **dspark)
  head.validate(target_cfg)
  return head


@registry.HEADS.register("dflash")
def _head(target_cfg: ModelConfig, *, num_layers: int = 2, taps: Sequence[int] | None = None,
          block_size: int = 8, mask_token: int | None = None, gamma: float = 4.0,
          num_anchors: int = 32, loss: str = "soft") -> DFlashHead:
  """DFlash: `num_layers` draft layers shaped like the target's, reading the target's
  layer inputs `taps` (default: z-lab's spacing), drafting block_size - 1 tokens a
  forward; trained on `num_anchors` blocks per row, slot j weighted exp(-(j-1)/gamma),
  against the target's distribution (`loss="soft"`) or the data token ("hard")."""
  return _build(target_cfg, num_layers, taps, block_size, mask_token, gamma, num_anchors,
                loss)


@registry.HEADS.register("dspark")
def _dspark_head(target_cfg: ModelConfig, *, num_layers: int = 2,
                 taps: Sequence[int] | None = None, block_size: int = 8,
                 mask_token: int | None = None, gamma: float = 4.0, num_anchors: int = 32,
                 markov_rank: int = 256, ce_weight: float = 0.1, tv_weight: float = 0.9,
                 conf_weight: float = 1.0) -> DFlashHead:
  """DSpark: a DFlash backbone (same knobs) with a rank-`markov_rank` Markov head and a
  confidence head, trained on ce_weight x CE + tv_weight x L1 + conf_weight x BCE."""
  if markov_rank < 1:
    raise ValueError(f"DSpark needs markov_rank >= 1; got {markov_rank} (0 is DFlash).")
  return _build(target_cfg, num_layers, taps, block_size, mask_token, gamma, num_anchors,
                "soft", markov_rank=markov_rank, ce_weight=float(ce_weight),
                tv_weight=float(tv_weight), conf_weight=float(conf_weight))


@registry.DRAFTERS.register("dflash", takes_stop_policy=False)
def _drafter(target, *, checkpoint: str, budget: str | None = None, depth: int | None = None,
             top_k: int | None = None, tree: Sequence[Sequence[int]] | None = None) -> DFlash:
  """A trained DFlash head folder (specjax or z-lab layout) as a chain or a static tree of
  each slot's top candidates; unset knobs come from the head's folder, or
  `budget=COSTS_JSON` sizes the chain from measured costs."""
  return io.trained_drafter("dflash", target, checkpoint, budget, depth=depth, top_k=top_k,
                            tree=tree)


@registry.DRAFTERS.register("dspark", takes_stop_policy=False)
def _dspark_drafter(target, *, checkpoint: str, budget: str | None = None,
                    depth: int | None = None, top_k: int | None = None,
                    tree: Sequence[Sequence[int]] | None = None,
                    threshold: float | None = None) -> DFlash:
  """A trained DSpark head folder as a chain of up to `depth` tokens (or sized by
  `budget`), cut where the cumulative product of its confidences falls under `threshold`;
  unset knobs come from the head's folder. DSpark drafts chains: a `top_k` > 1 or a
  `tree` is refused when the drafter is checked."""
  return io.trained_drafter("dspark", target, checkpoint, budget, depth=depth, top_k=top_k,
                            tree=tree, threshold=threshold)


# --- z-lab's checkpoint layout -------------------------------------------------------------

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


def _state_dict(head: DFlashHead, params) -> dict[str, np.ndarray]:
  """z-lab's names (no embedding, no LM head; Linear weights [out, in])."""
  p = jax.tree.map(np.asarray, params)
  w = lambda d: np.ascontiguousarray(d["kernel"].T)
  sd = {"fc.weight": w(p["fc"]), "hidden_norm.weight": p["hidden_norm"]["scale"],
        "norm.weight": p["norm"]["scale"]}
  for i in range(head.layer.num_layers):
    pre, lp = f"layers.{i}.", p[f"layers_{i}"]
    for n in _NORMS:
      sd[f"{pre}{n}.weight"] = lp[n]["scale"]
    for n in _ATTN:
      sd[f"{pre}self_attn.{n}.weight"] = w(lp["self_attn"][n])
      if "bias" in lp["self_attn"][n]:
        sd[f"{pre}self_attn.{n}.bias"] = lp["self_attn"][n]["bias"]
    for n in ("q_norm", "k_norm"):
      if n in lp["self_attn"]:
        sd[f"{pre}self_attn.{n}.weight"] = lp["self_attn"][n]["scale"]
    for n in _MLP:
      sd[f"{pre}mlp.{n}.weight"] = w(lp["mlp"][n])
  return sd


def export_zlab(out: str, head: DFlashHead, params) -> None:
  """Writes `head` in z-lab's DFlash layout: config.json (a Hugging Face config of the
  draft layers + block_size, num_target_layers, dflash_config) + model.safetensors."""
  if any(f < 1 for f in head.taps):
    raise ValueError(f"z-lab's layout names target layer outputs; taps {list(head.taps)} read "
                     "the embedding (0) or the final normed state (FINAL), which it cannot.")
  if head.layer.rope_scaling or head.layer.sliding_window:
    raise ValueError("Exporting a DFlash head with RoPE scaling or a sliding window is not "
                     "supported.")
  layer = head.layer
  config = {
      # from_hf_config gives q/k norms to qwen3 layers only.
      "architectures": ["DFlashDraftModel"],
      "model_type": "qwen3" if layer.qk_norm else (
          "llama" if layer.model_type in (None, "qwen3") else layer.model_type),
      "vocab_size": layer.vocab_size, "hidden_size": layer.hidden_size,
      "intermediate_size": layer.intermediate_size, "num_hidden_layers": layer.num_layers,
      "num_attention_heads": layer.num_heads, "num_key_value_heads": layer.num_kv_heads,
      "head_dim": layer.head_dim, "rms_norm_eps": layer.norm_eps, "hidden_act": "silu",
      "max_position_embeddings": layer.max_position_embeddings,
      "rope_theta": layer.rope_theta, "attention_bias": layer.attention_bias,
      "tie_word_embeddings": False, "block_size": head.block_size,
      "num_target_layers": head.config.num_layers,
      "dflash_config": {"mask_token_id": head.mask_token,
                        "target_layer_ids": [f - 1 for f in head.taps]}}
  os.makedirs(out, exist_ok=True)
  assets.save_arrays(os.path.join(out, "model.safetensors"), _state_dict(head, params),
                     metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=1)


def from_zlab(path: str, target_cfg: ModelConfig):
  """("dflash", DFlashHead, params) from z-lab's layout (config.json with dflash_config +
  model.safetensors with fc.*, hidden_norm.*, layers.*, norm.*)."""
  hf = io.read_json(os.path.join(path, "config.json"))
  dc = hf["dflash_config"]
  block = dc.get("block_size", hf.get("block_size"))
  if block is None:
    raise ValueError(f"{path!r}: config.json gives no block_size.")
  if hf.get("num_target_layers", target_cfg.num_layers) != target_cfg.num_layers:
    raise ValueError(f"{path!r} was made for a {hf['num_target_layers']}-layer target; this "
                     f"target has {target_cfg.num_layers} layers.")
  if "target_layer_ids" not in dc:
    raise ValueError(f"{path!r}: dflash_config gives no target_layer_ids.")
  layer = from_hf_config(hf)
  check_target(f"The head in {path!r}", layer.hidden_size, layer.vocab_size, target_cfg)
  head = DFlashHead(target_cfg, layer, tuple(int(i) + 1 for i in dc["target_layer_ids"]),
                    int(block), int(dc["mask_token_id"]))
  head.validate(target_cfg)
  sd = io.state_dict(path, io.EAGLE_FILES)
  dense = lambda name: {"kernel": sd[f"{name}.weight"].T,
                        **({"bias": sd[f"{name}.bias"]} if f"{name}.bias" in sd else {})}
  norm = lambda name: {"scale": sd[f"{name}.weight"]}
  params = {"fc": dense("fc"), "hidden_norm": norm("hidden_norm"), "norm": norm("norm")}
  for i in range(layer.num_layers):
    pre = f"layers.{i}."
    attn = {n: dense(f"{pre}self_attn.{n}") for n in _ATTN}
    if layer.qk_norm:
      attn.update(q_norm=norm(f"{pre}self_attn.q_norm"), k_norm=norm(f"{pre}self_attn.k_norm"))
    params[f"layers_{i}"] = {**{n: norm(pre + n) for n in _NORMS}, "self_attn": attn,
                             "mlp": {n: dense(f"{pre}mlp.{n}") for n in _MLP}}
  return "dflash", head, params
