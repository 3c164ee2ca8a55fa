"""Mamba-2 mixers over a token tree: the state-space layer of Mamba-2 and Bamba targets.

A Mamba-2 head keeps a state h [P, N] that each token t updates as
    h_t = exp(a_t) h_{t-1} + dt_t x_t B_t^T,   y_t = C_t . h_t + D x_t,   a_t = dt_t A
(A < 0 a scalar per head, dt_t > 0 per token and head; heads in a group share B and C).
Before that, x, B and C pass through a causal depthwise conv of K taps (then SiLU).

A forward runs T new tokens that form a tree (`visible_BxTxT` = the ancestor-or-self
mask, parents first: a chain in a prefill, [root, draft nodes] in verification). Every
token's output is the one its root-to-token path gives run one token at a time (STree:
the state transitions accumulated along each path), computed at once in the SSD "dual"
(attention-like) form with the tree mask in place of the causal one:

    L_t = sum_{s anc t} a_s                                   (L = M @ a)
    y_t = sum_{s anc t} exp(L_t - L_s) (C_t . B_s) dt_s x_s + exp(L_t) C_t . h_0 + D x_t

where h_0 is the committed state. The conv of each token reads its own last K-1
ancestors' inputs (the committed conv state where the path is shorter).

A forward never changes the committed state: it returns, as `Pending`, what `commit`
needs to move it to the state after any one of its tokens (the accepted path's last):
    h = sum_{s anc t*} exp(L_t* - L_s) dt_s x_s B_s^T + exp(L_t*) h_0
and the conv state of the last K-1 inputs on that path. A prefill chunk commits each
row's state at its own length the same way, so padding past a prompt never leaks in.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from specjax.models.config import ModelConfig

_HI = jax.lax.Precision.HIGHEST  # path sums and state contractions in full float32


@flax.struct.dataclass
class Pending:
  """One forward's per-token ingredients of the state after each of its T tokens."""
  conv_BxTxKxC: jax.Array  # [B, T, K-1, C]: the conv state after token t (its path's inputs)
  x_BxTxHxP: jax.Array  # float32: the conv'd x
  b_BxTxGxN: jax.Array  # float32: the conv'd B
  dt_BxTxH: jax.Array  # float32
  logdecay_BxTxH: jax.Array  # float32: L_t, the summed a along t's path (t included)
  visible_BxTxT: jax.Array  # bool: the forward's ancestor-or-self mask


@flax.struct.dataclass
class SSMState:
  """A Mamba-2 layer's committed state (+ the last forward's `Pending`, until committed)."""
  conv_BxKxC: jax.Array  # [B, K-1, C]: the conv inputs of the last K-1 committed tokens
  h_BxHxPxN: jax.Array  # float32
  pending: Pending | None = None


def init_state(cfg: ModelConfig, batch: int, dtype) -> SSMState:
  """The state before any token (zeros: HF's zero-padded conv and zero initial state)."""
  return SSMState(jnp.zeros((batch, cfg.ssm_conv - 1, cfg.ssm_conv_dim), dtype),
                  jnp.zeros((batch, cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_state),
                            jnp.float32))


def path_windows(xbc_BxTxC: jax.Array, visible_BxTxT: jax.Array,
                 conv_BxKxC: jax.Array) -> jax.Array:
  """[B, T, K, C]: each token's conv input window along its own path, oldest first
  (window[..., K-1, :] is the token's own input). The ancestor j steps back is the one
  j shallower on the path; past the path's start, the committed conv state's entries."""
  km1 = conv_BxKxC.shape[1]
  depth_BxT = jnp.sum(visible_BxTxT, -1, dtype=jnp.int32)
  src_BxSxC = jnp.concatenate([conv_BxKxC.astype(xbc_BxTxC.dtype), xbc_BxTxC], axis=1)
  cols = []
  for j in range(km1, -1, -1):  # distance back: K-1 (oldest) ... 0 (the token itself)
    at_BxTxT = visible_BxTxT & (depth_BxT[:, None, :] == depth_BxT[:, :, None] - j)
    on_path = km1 + jnp.argmax(at_BxTxT, -1).astype(jnp.int32)
    cols.append(jnp.where(j < depth_BxT, on_path, km1 - 1 - j + depth_BxT))
  idx_BxTxK = jnp.stack(cols, -1)
  b, t, k = idx_BxTxK.shape
  return jnp.take_along_axis(src_BxSxC, idx_BxTxK.reshape(b, t * k, 1), 1).reshape(
      b, t, k, -1)


def ssd(x_BxTxHxP, dt_BxTxH, a_H, b_BxTxGxN, c_BxTxGxN, d_H, visible_BxTxT, h0_BxHxPxN):
  """(y [B, T, H, P], L [B, T, H]): the SSD dual form over a tree (module docstring)."""
  bsz, t, h, p = x_BxTxHxP.shape
  g = b_BxTxGxN.shape[2]
  r = h // g  # heads per group
  m = visible_BxTxT
  logdecay_BxTxH = jnp.einsum("bts,bsh->bth", m.astype(jnp.float32), dt_BxTxH * a_H,
                              precision=_HI)
  diff_BxTxSxH = logdecay_BxTxH[:, :, None] - logdecay_BxTxH[:, None]
  decay_BxTxSxH = jnp.where(m[..., None], jnp.exp(jnp.where(m[..., None], diff_BxTxSxH, 0.)),
                            0.)
  cb_BxTxSxG = jnp.einsum("btgn,bsgn->btsg", c_BxTxGxN, b_BxTxGxN, precision=_HI)
  w = (decay_BxTxSxH.reshape(bsz, t, t, g, r) * cb_BxTxSxG[..., None]
       * dt_BxTxH.reshape(bsz, 1, t, g, r))
  x5 = x_BxTxHxP.reshape(bsz, t, g, r, p)
  y = jnp.einsum("btsgr,bsgrp->btgrp", w, x5, precision=_HI)
  from_h0 = jnp.einsum("btgn,bgrpn->btgrp", c_BxTxGxN, h0_BxHxPxN.reshape(bsz, g, r, p, -1),
                       precision=_HI)
  y = y + jnp.exp(logdecay_BxTxH).reshape(bsz, t, g, r)[..., None] * from_h0
  y = y + d_H.reshape(g, r)[:, :, None] * x5
  return y.reshape(bsz, t, h, p), logdecay_BxTxH


def state_after(pending: Pending, h0_BxHxPxN: jax.Array, t_B: jax.Array) -> jax.Array:
  """float32[B, H, P, N]: the state after token t_B[b] of the pending forward."""
  rows = jnp.arange(t_B.shape[0])
  on_path_BxS = pending.visible_BxTxT[rows, t_B]
  lt_BxH = pending.logdecay_BxTxH[rows, t_B]
  coef_BxSxH = jnp.where(on_path_BxS[..., None],
                         jnp.exp(jnp.where(on_path_BxS[..., None],
                                           lt_BxH[:, None] - pending.logdecay_BxTxH, 0.)),
                         0.) * pending.dt_BxTxH
  bsz, s, h, p = pending.x_BxTxHxP.shape
  g = pending.b_BxTxGxN.shape[2]
  new = jnp.einsum("bsgr,bsgrp,bsgn->bgrpn", coef_BxSxH.reshape(bsz, s, g, h // g),
                   pending.x_BxTxHxP.reshape(bsz, s, g, h // g, p), pending.b_BxTxGxN,
                   precision=_HI).reshape(h0_BxHxPxN.shape)
  return new + jnp.exp(lt_BxH)[..., None, None] * h0_BxHxPxN


def commit(state: SSMState, path_BxA: jax.Array, n_B: jax.Array) -> SSMState:
  """The state after the pending forward's token path[b, n[b] - 1] (the accepted path's
  last; n = 0 keeps the committed state); the pending ingredients are dropped."""
  if state.pending is None:
    return state
  t_B = jnp.take_along_axis(path_BxA, jnp.clip(n_B - 1, 0, path_BxA.shape[1] - 1)[:, None],
                            1)[:, 0]
  keep_B = n_B > 0
  rows = jnp.arange(t_B.shape[0])
  conv = jnp.where(keep_B[:, None, None], state.pending.conv_BxTxKxC[rows, t_B],
                   state.conv_BxKxC)
  h = jnp.where(keep_B[:, None, None, None], state_after(state.pending, state.h_BxHxPxN, t_B),
                state.h_BxHxPxN)
  return SSMState(conv, h)


def advance(state: SSMState, n_B: jax.Array) -> SSMState:
  """The state after the first n[b] tokens of a pending chain."""
  if state.pending is None:
    return state
  t = state.pending.dt_BxTxH.shape[1]
  return commit(state, jnp.broadcast_to(jnp.arange(t), (n_B.shape[0], t)), n_B)


def pad(state: SSMState, width: int) -> SSMState:
  """The pending ingredients padded to `width` tokens (never on a path: masked out), so
  verification forwards of different widths return one shape."""
  if state.pending is None:
    return state
  p = state.pending
  t = p.dt_BxTxH.shape[1]
  along = lambda x: jnp.pad(x, ((0, 0), (0, width - t)) + ((0, 0),) * (x.ndim - 2))
  return state.replace(pending=Pending(
      along(p.conv_BxTxKxC), along(p.x_BxTxHxP), along(p.b_BxTxGxN), along(p.dt_BxTxH),
      along(p.logdecay_BxTxH), jnp.pad(p.visible_BxTxT, ((0, 0), (0, width - t),
                                                         (0, width - t)))))


def gated_rmsnorm(y_BxTxI, z_BxTxI, scale_I, groups: int, eps: float):
  """RMSNorm of y * silu(z) over each of `groups` channel groups, then the scale."""
  v = y_BxTxI.astype(jnp.float32) * jax.nn.silu(z_BxTxI.astype(jnp.float32))
  vg = v.reshape(v.shape[:-1] + (groups, -1))
  vg = vg * jax.lax.rsqrt(jnp.mean(vg * vg, -1, keepdims=True) + eps)
  return scale_I * vg.reshape(v.shape).astype(scale_I.dtype)


class Mamba2Mixer(nn.Module):
  """The Mamba-2 mixer (Hugging Face `Mamba2Mixer` / `BambaMixer` names and layouts):
  in_proj -> [z, xBC, dt]; causal conv + SiLU over xBC; split x, B, C; the SSD over the
  tree; gated grouped RMSNorm; out_proj. Returns (out, state with `Pending`), or
  (out, None) without a state (a full forward from zero state, nothing kept)."""

  cfg: ModelConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BxTxD, visible_BxTxT, state: SSMState | None):
    cfg = self.cfg
    inner, cdim, h, k = cfg.ssm_inner, cfg.ssm_conv_dim, cfg.ssm_heads, cfg.ssm_conv
    g, n, p = cfg.ssm_groups, cfg.ssm_state, cfg.ssm_head_dim
    dense = lambda size, name: nn.Dense(size, use_bias=cfg.ssm_proj_bias, dtype=self.dtype,
                                        param_dtype=self.dtype, name=name)
    conv_w = self.param("conv_kernel", nn.initializers.lecun_normal(), (k, 1, cdim),
                        self.dtype)  # HF conv1d.weight [C, 1, K], transposed
    conv_b = (self.param("conv_bias", nn.initializers.zeros, (cdim,), self.dtype)
              if cfg.ssm_conv_bias else jnp.zeros((cdim,), self.dtype))
    a_log = self.param("A_log", lambda _, s: jnp.log(jnp.arange(1, s[0] + 1.)), (h,))
    d = self.param("D", nn.initializers.ones, (h,))
    dt_bias = self.param("dt_bias", nn.initializers.ones, (h,))
    scale = self.param("norm_scale", nn.initializers.ones, (inner,), self.dtype)

    bsz, t, _ = x_BxTxD.shape
    visible_BxTxT = jnp.broadcast_to(visible_BxTxT, (bsz, t, t))
    zxbcdt = dense(inner + cdim + h, "in_proj")(x_BxTxD)
    z, xbc, dt = jnp.split(zxbcdt, [inner, inner + cdim], axis=-1)
    conv0 = (jnp.zeros((bsz, k - 1, cdim), xbc.dtype) if state is None else state.conv_BxKxC)
    window_BxTxKxC = path_windows(xbc, visible_BxTxT, conv0)
    xbc = jax.nn.silu(jnp.sum(window_BxTxKxC * conv_w[:, 0], axis=2) + conv_b)
    xs, bs, cs = jnp.split(xbc.astype(jnp.float32), [inner, inner + g * n], axis=-1)
    dt = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32)),
                  *cfg.ssm_dt_limit)
    h0 = (jnp.zeros((bsz, h, p, n), jnp.float32) if state is None else state.h_BxHxPxN)
    x_BxTxHxP, b_BxTxGxN = xs.reshape(bsz, t, h, p), bs.reshape(bsz, t, g, n)
    y, logdecay = ssd(x_BxTxHxP, dt, -jnp.exp(a_log.astype(jnp.float32)), b_BxTxGxN,
                      cs.reshape(bsz, t, g, n), d.astype(jnp.float32), visible_BxTxT, h0)
    y = gated_rmsnorm(y.reshape(bsz, t, inner), z, scale, g, cfg.norm_eps)
    out = dense(cfg.hidden_size, "out_proj")(y.astype(self.dtype))
    if state is None:
      return out, None
    return out, state.replace(pending=Pending(window_BxTxKxC[:, :, 1:], x_BxTxHxP, b_BxTxGxN,
                                              dt, logdecay, visible_BxTxT))
