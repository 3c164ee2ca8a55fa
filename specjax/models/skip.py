"""The target's own forward with some of its sub-layers skipped: self-speculation with no
extra weights (SWIFT skips attention and MLP sub-layers; DEL exits after a layer, which
skips every sub-layer above it), and the early-exiting forward SpecEE decodes with (each
sequence leaves the network at the layer a decision function picks).

`skip_Lx2[i] = (skip layer i's attention, skip its MLP)` is a traced array: each sub-layer
runs under `lax.cond`, so changing the skip set never recompiles, and a skipped sub-layer
costs nothing. A skipped attention writes no keys/values into the cache; a drafter that
reads the target's committed cache with one skip set never reads the slots it left
unwritten (they are skipped for every draft token of the step).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from specjax.models import cache as cache_lib
from specjax.models import quant
from specjax.models.config import ModelConfig
from specjax.models.llama import (Attention, RMSNorm, apply_rope, feed_forward, in_window,
                                  rope_cos_sin)
from specjax.models.model import Forward, embed, lm_head, param_dtype


def check(cfg: ModelConfig, what: str) -> None:
  """Raises unless `cfg` is a target whose sub-layers can be skipped."""
  if cfg.arch != "llama":
    raise ValueError(f"{what} skips the target's own sub-layers, which is built for "
                     f"Llama-family targets; this target is {cfg.arch!r}.")


class _SubLayers(NamedTuple):
  """A cached forward's embedded input and its sub-layers, by layer index."""

  x: jax.Array  # [B, T, H]: the new tokens' embeddings
  attention: Callable  # (i, x, kv) -> (x + attention, kv with the new keys/values)
  mlp: Callable  # (i, x) -> x + MLP
  keys_values: Callable  # (i, x, kv) -> kv with layer i's keys/values of x written


def _sublayers(cfg: ModelConfig, params: Any, tokens_BxT, positions_BxT, visible_BxTxT,
               cache) -> _SubLayers:
  """What `forward_skipping` and `forward_exiting` run, layer by layer (as
  `llama.Block` does; the new keys/values go at `cache.lengths`)."""
  dtype = param_dtype(params)
  cos, sin = rope_cos_sin(cfg, positions_BxT, dtype)
  visible, prefix = in_window(cfg, positions_BxT, visible_BxTxT, None, cache)
  if prefix is None and cfg.attention_impl == "xla":
    prefix = cache.prefix_mask(tokens_BxT.shape[1])
  norm = lambda p, x: RMSNorm(cfg.norm_eps, dtype).apply({"params": p}, x)
  layer = lambda i: quant.materialize(params[f"layers_{i}"])

  def attention(i, x, kv):
    h, kv = Attention(cfg, dtype).apply({"params": layer(i)["self_attn"]}, norm(
        layer(i)["input_layernorm"], x), cos, sin, visible, prefix, kv, cache.lengths)
    return x + h, kv

  def mlp(i, x):
    return x + feed_forward(cfg, dtype, i).apply({"params": layer(i)["mlp"]},
                                                 norm(layer(i)["post_attention_layernorm"], x))

  def keys_values(i, x, kv):
    k, v = _keys_values(cfg, layer(i)["self_attn"], norm(layer(i)["input_layernorm"], x),
                        cos, sin)
    return cache_lib.write(kv[0], k, cache.lengths), cache_lib.write(kv[1], v, cache.lengths)

  return _SubLayers(embed(cfg, params, tokens_BxT).astype(dtype), attention, mlp,
                    keys_values)


def forward_skipping(cfg: ModelConfig, params: Any, tokens_BxT, positions_BxT, visible_BxTxT,
                     cache, skip_Lx2) -> Forward:
  """`models.forward` (with a cache, no features) with the sub-layers `skip_Lx2` marks
  skipped. Returns the logits and final normed state at every new token and the cache
  with their keys/values written at `cache.lengths` for the attention that ran."""
  sub = _sublayers(cfg, params, tokens_BxT, positions_BxT, visible_BxTxT, cache)
  x, ks, vs = sub.x, [], []
  for i in range(cfg.num_layers):
    x, kv = jax.lax.cond(skip_Lx2[i, 0], lambda x, kv: (x, kv),
                         functools.partial(sub.attention, i), x, (cache.k[i], cache.v[i]))
    x = jax.lax.cond(skip_Lx2[i, 1], lambda x: x, functools.partial(sub.mlp, i), x)
    ks.append(kv[0])
    vs.append(kv[1])
  hidden = final_norm(cfg, params, x)
  return Forward(lm_head(cfg, params, hidden), hidden, (),
                 cache.replace(k=tuple(ks), v=tuple(vs)))


def exit_after(num_layers: int, layer: jax.Array) -> jax.Array:
  """bool[L, 2]: the skip set of exiting after `layer` layers (traced)."""
  return jnp.broadcast_to((jnp.arange(num_layers) >= layer)[:, None], (num_layers, 2))


def final_norm(cfg: ModelConfig, params: Any, hidden_xH) -> jax.Array:
  """The target's final norm over a layer's output (what its LM head would read there)."""
  return RMSNorm(cfg.norm_eps, param_dtype(params)).apply({"params": params["norm"]},
                                                          hidden_xH)


def exit_logits(cfg: ModelConfig, params: Any, hidden_BxTxH) -> jax.Array:
  """float32[B, T, V]: the target's final norm and LM head over a layer's output (the
  prediction of exiting there)."""
  return lm_head(cfg, params, final_norm(cfg, params, hidden_BxTxH))


def _keys_values(cfg: ModelConfig, p_attn: Any, x_BxTxH, cos, sin):
  """One layer's keys and values ([B, KVH, T, D] each) of the normed inputs, as
  `llama.Attention` makes them."""
  b, t, _ = x_BxTxH.shape
  dense = lambda name: x_BxTxH @ p_attn[name]["kernel"] + (
      p_attn[name]["bias"] if cfg.attention_bias else 0)
  k = dense("k_proj").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = dense("v_proj").reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    k = RMSNorm(cfg.norm_eps, x_BxTxH.dtype).apply({"params": p_attn["k_norm"]}, k)
  return apply_rope(k, cos, sin).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def forward_exiting(cfg: ModelConfig, params: Any, tokens_BxT, positions_BxT, visible_BxTxT,
                    cache, decide, carry) -> tuple[Forward, jax.Array]:
  """`models.forward` (with a cache, no features) where each sequence may leave after any
  layer but the last.

  After layer i < L - 1, `decide(i, x_BxTxH, live_B, carry) -> (exit_B, logits_BxTxV,
  carry)` sees the residual stream of the sequences still inside (`live_B`) and says which
  leave, with their logits there. A layer runs while any sequence is inside (under
  `lax.cond`: layers above every exit cost nothing). Cache policy: a sequence's slots in
  the layers above its exit hold the keys/values those layers project from its exit
  state (CALM's state propagation), so later tokens attend to every position at every
  layer; the projections cost about a sixteenth of a layer (keys and values only, when
  every sequence has left; the whole layer, output discarded, while others still run).

  Returns the Forward (the exit logits and exit state normed by the final norm for the
  sequences that left) and int32[B]: the layers each sequence ran.
  """
  b = tokens_BxT.shape[0]
  sub = _sublayers(cfg, params, tokens_BxT, positions_BxT, visible_BxTxT, cache)
  x = sub.x
  live = jnp.ones((b,), bool)
  ran = jnp.full((b,), cfg.num_layers, jnp.int32)
  logits = jnp.zeros(tokens_BxT.shape + (cfg.vocab_size,), jnp.float32)
  ks, vs = [], []
  for i in range(cfg.num_layers):

    def layer(x, kv, i=i):
      x, kv = sub.attention(i, x, kv)
      return sub.mlp(i, x), kv

    def propagate(x, kv, i=i):
      return x, sub.keys_values(i, x, kv)

    x_new, kv = jax.lax.cond(live.any(), layer, propagate, x, (cache.k[i], cache.v[i]))
    x = jnp.where(live[:, None, None], x_new, x)  # a sequence that left keeps its exit state
    ks.append(kv[0])
    vs.append(kv[1])
    if i < cfg.num_layers - 1:
      leave, at_exit, carry = jax.lax.cond(
          live.any(), functools.partial(decide, i), lambda x, live, c: (
              jnp.zeros_like(live), logits, c), x, live, carry)
      leave &= live
      logits = jnp.where(leave[:, None, None], at_exit, logits)
      ran = jnp.where(leave, i + 1, ran)
      live &= ~leave
  hidden = final_norm(cfg, params, x)
  logits = jax.lax.cond(live.any(), lambda: jnp.where(
      live[:, None, None], lm_head(cfg, params, hidden), logits), lambda: logits)
  return Forward(logits, hidden, (), cache.replace(k=tuple(ks), v=tuple(vs))), ran


def layer_groups(num_layers: int, group: int) -> tuple[tuple[int, ...], ...]:
  """EasySpec's grouping: the first and last layers alone, the ones between in consecutive
  groups of `group`."""
  if num_layers <= 2:
    return tuple((i,) for i in range(num_layers))
  middle = range(1, num_layers - 1)
  return ((0,),) + tuple(tuple(middle[i:i + group]) for i in range(0, len(middle), group)) + (
      (num_layers - 1,),)


def forward_layer_parallel(cfg: ModelConfig, params: Any, tokens_BxT, positions_BxT,
                           visible_BxTxT, cache, group: int) -> Forward:
  """`models.forward` (with a cache, no features) with EasySpec's layer-parallel
  attention: in each group (`layer_groups`) every layer's attention reads the group's
  input, then the layers' attention outputs and MLPs are added in order, x <- x + a_l,
  x <- x + MLP_l(x). The attentions of a group depend on nothing of each other, so devices
  can run them at once; the result is an approximation, and so are the keys/values
  written at `cache.lengths`. `group` 1 is the exact forward."""
  sub = _sublayers(cfg, params, tokens_BxT, positions_BxT, visible_BxTxT, cache)
  x, ks, vs = sub.x, [None] * cfg.num_layers, [None] * cfg.num_layers
  for layers in layer_groups(cfg.num_layers, group):
    deltas = []
    for i in layers:  # all read the group's input
      h, (ks[i], vs[i]) = sub.attention(i, x, (cache.k[i], cache.v[i]))
      deltas.append(h - x)
    for i, d in zip(layers, deltas):
      x = sub.mlp(i, x + d)
  hidden = final_norm(cfg, params, x)
  return Forward(lm_head(cfg, params, hidden), hidden, (),
                 cache.replace(k=tuple(ks), v=tuple(vs)))
