"""Tree attention: N draft-tree tokens over a per-sequence cache prefix and their ancestors.

Query t of sequence b sees cache slot s when s < lengths[b] (the committed prefix) and
tree key t' when t' is an ancestor of t or t itself. The tree's structure travels as
packed bits, `ancestors_BxTxW` (int32, bit j of word w = key 32 w + j), not as a dense
[B, T, S] mask: a kernel that knows it reads each cache slot of the prefix once and
skips every block past a sequence's length.

Three implementations, one signature (`tree_attention`):
  reference  pure jnp: the dense masks rebuilt from lengths and bits, `attention_reference`
  tpu        Mosaic: grid (batch, KV head, cache block), lengths and ancestor bits in SMEM
             by scalar prefetch; a block past the sequence's length maps to the last
             needed block (no new DMA) and skips its compute; online softmax in VMEM
             scratch; the tree's own keys join at the last block
  gpu        Pallas on GPU (Triton): grid (batch, KV head), a loop over exactly the
             prefix's cache blocks (its trip count is the sequence's length), then the
             tree's keys; rows padded to a power of two
Grouped-query attention: the G query heads of a KV head are one (G x T)-row block, so
each cache block is read once per KV head. Scores and softmax run in float32; inputs
and output may be float32 or bfloat16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from .attention import (BITS, attention_reference, pack_ancestors, prefix_mask,  # noqa: F401
                        unpack_ancestors)

_MASKED = -1e30  # as attention_reference: finite, so a row with nothing visible gives no NaN


def reference(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, cache_k_BxKxSxD, cache_v_BxKxSxD, lengths_B,
              ancestors_BxTxW):
  """The dense-mask computation the kernels must match."""
  t, s = q_BxTxHxD.shape[1], cache_k_BxKxSxD.shape[2]
  return attention_reference(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD,
                             unpack_ancestors(ancestors_BxTxW, t), cache_k_BxKxSxD,
                             cache_v_BxKxSxD, prefix_mask(lengths_B, t, s))


# ---- shared pieces ---------------------------------------------------------------------------


def _rows(q_BxTxHxD, kvh: int):
  """[B, K, G*T, D]: the G query heads of each KV head stacked, group-major."""
  b, t, h, d = q_BxTxHxD.shape
  return q_BxTxHxD.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4).reshape(
      b, kvh, (h // kvh) * t, d)


def _unrows(o_BxKxMxD, t: int):
  b, kvh, m, d = o_BxKxMxD.shape
  g = m // t
  return o_BxKxMxD.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, kvh * g, d)


def _tree_mask(bit_words, t: int):
  """bool[M, T] from each row's ancestor words (a list of W [M, 1] int32 columns)."""
  key = jax.lax.broadcasted_iota(jnp.int32, (bit_words[0].shape[0], t), 1)
  mask = jnp.zeros(key.shape, bool)
  for w, word in enumerate(bit_words):
    shift = key - w * BITS
    inside = (shift >= 0) & (shift < BITS)
    mask = mask | (inside & ((jnp.right_shift(word, jnp.clip(shift, 0, BITS - 1)) & 1) == 1))
  return mask


def _online(carry, s_MxN, v_NxD):
  """One online-softmax update of (max, sum, acc) with scores s and values v."""
  m, l, acc = carry
  m_new = jnp.maximum(m, jnp.max(s_MxN, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(s_MxN - m_new)
  acc = acc * alpha + jax.lax.dot_general(p.astype(v_NxD.dtype), v_NxD, (((1,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
  return m_new, l * alpha + jnp.sum(p, axis=1, keepdims=True), acc


def _scores(q_MxD, k_NxD, scale):
  return jax.lax.dot_general(q_MxD, k_NxD, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) * scale


def _cache_block(s: int, want: int) -> int:
  """The largest block of <= `want` slots that tiles `s` (multiples of 8, else all of s)."""
  for bk in (want, 512, 256, 128, 64, 32, 16, 8):
    if bk <= want and s % bk == 0:
      return bk
  return s


# ---- TPU (Mosaic) -------------------------------------------------------------------------


def _tpu_kernel(lengths_ref, anc_ref, q_ref, ck_ref, cv_ref, k_ref, v_ref, o_ref,
                m_sc, l_sc, acc_sc, *, t: int, w: int, bk: int, scale: float):
  b, j = pl.program_id(0), pl.program_id(2)
  length = lengths_ref[b]

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, _MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def update(s, v):
    m, l, acc = _online((m_sc[...], l_sc[...], acc_sc[...]), s, v)
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  q = q_ref[0, 0]

  @pl.when(j * bk < length)  # blocks past the prefix: no compute (and no new DMA)
  def _():
    s = _scores(q, ck_ref[0, 0], scale)
    slot = j * bk + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    update(jnp.where(slot < length, s, _MASKED), cv_ref[0, 0])

  @pl.when(j == pl.num_programs(2) - 1)
  def _():
    rows = q.shape[0]
    row_t = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) % t
    words = []
    for word in range(w):  # each row's ancestor word, read from SMEM
      col = jnp.zeros((rows, 1), jnp.int32)
      for i in range(t):
        col = jnp.where(row_t == i, anc_ref[b, i * w + word], col)
      words.append(col)
    s = _scores(q, k_ref[0, 0], scale)
    update(jnp.where(_tree_mask(words, t), s, _MASKED), v_ref[0, 0])
    o_ref[0, 0] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)


def tpu(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, cache_k_BxKxSxD, cache_v_BxKxSxD, lengths_B,
        ancestors_BxTxW, *, block: int = 512, interpret: bool = False):
  """The Mosaic TPU kernel (interpret=True runs it anywhere, slowly)."""
  b, t, h, d = q_BxTxHxD.shape
  kvh, s = cache_k_BxKxSxD.shape[1], cache_k_BxKxSxD.shape[2]
  w = ancestors_BxTxW.shape[2]
  m = (h // kvh) * t
  bk = _cache_block(s, block)
  q = _rows(q_BxTxHxD, kvh)

  def cache_map(bi, hi, j, lengths, anc):
    last = jnp.maximum(pl.cdiv(lengths[bi], bk) - 1, 0)
    return bi, hi, jnp.minimum(j, last), 0

  whole = lambda rows: pl.BlockSpec((1, 1, rows, d), lambda bi, hi, j, *_: (bi, hi, 0, 0))
  out = pl.pallas_call(
      functools.partial(_tpu_kernel, t=t, w=w, bk=bk, scale=1.0 / float(np.sqrt(d))),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, kvh, s // bk),
          in_specs=[whole(m), pl.BlockSpec((1, 1, bk, d), cache_map),
                    pl.BlockSpec((1, 1, bk, d), cache_map), whole(t), whole(t)],
          out_specs=whole(m),
          scratch_shapes=[pltpu.VMEM((m, 1), jnp.float32), pltpu.VMEM((m, 1), jnp.float32),
                          pltpu.VMEM((m, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((b, kvh, m, d), q_BxTxHxD.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(lengths_B.astype(jnp.int32), ancestors_BxTxW.reshape(b, t * w), q, cache_k_BxKxSxD,
    cache_v_BxKxSxD, k_BxKxTxD, v_BxKxTxD)
  return _unrows(out, t)


# ---- GPU (Pallas on Triton) -------------------------------------------------------------------


def _gpu_kernel(lengths_ref, anc_ref, q_ref, ck_ref, cv_ref, k_ref, v_ref, o_ref, *,
                t: int, w: int, bk: int, scale: float):
  rows, d = q_ref.shape
  t_pad = k_ref.shape[0]
  length = plgpu.load(lengths_ref)
  q = plgpu.load(q_ref)
  carry = (jnp.full((rows, 1), _MASKED, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
           jnp.zeros((rows, d), jnp.float32))

  def block(j, carry):  # only the blocks that hold the prefix
    start = j * bk
    slot = start + jnp.arange(bk)
    inside = slot < length
    k = plgpu.load(ck_ref.at[pl.ds(start, bk), :], mask=inside[:, None], other=0.0)
    v = plgpu.load(cv_ref.at[pl.ds(start, bk), :], mask=inside[:, None], other=0.0)
    s = jnp.where(inside[None, :], _scores(q, k, scale), _MASKED)
    return _online(carry, s, v)

  carry = jax.lax.fori_loop(0, pl.cdiv(length, bk), block, carry)
  row_t = jnp.arange(rows)[:, None] % t_pad
  # Row r's word: the word of its tree token r % T' (anc_ref is [W, T'], one row per word).
  words = [jnp.sum(jnp.where(row_t == jnp.arange(t_pad)[None, :],
                             plgpu.load(anc_ref.at[pl.ds(word, 1), :]), 0), axis=1,
                   keepdims=True) for word in range(w)]
  tree = _tree_mask(words, t_pad) & (jnp.arange(t_pad)[None, :] < t)
  s = jnp.where(tree, _scores(q, plgpu.load(k_ref), scale), _MASKED)
  _, l, acc = _online(carry, s, plgpu.load(v_ref))
  plgpu.store(o_ref, (acc / l).astype(o_ref.dtype))


def _pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def gpu(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, cache_k_BxKxSxD, cache_v_BxKxSxD, lengths_B,
        ancestors_BxTxW, *, block: int = 64, interpret: bool = False):
  """The Pallas GPU (Triton) kernel. Triton blocks are powers of two: the tree is padded to
  T' = pow2(T) tokens and the G x T' query rows to a power of two (padded keys are never
  visible, padded rows are dropped); the head dimension must be one."""
  b, t, h, d = q_BxTxHxD.shape
  kvh, s = cache_k_BxKxSxD.shape[1], cache_k_BxKxSxD.shape[2]
  w = ancestors_BxTxW.shape[2]
  if d & (d - 1):
    raise ValueError(f"The GPU tree-attention kernel needs a power-of-two head_dim; got {d}.")
  g, tp = h // kvh, _pow2(t)
  pad_t = lambda x, axis: jnp.pad(x, [(0, tp - t if i == axis else 0) for i in range(x.ndim)])
  m = _pow2(g * tp)
  q = jnp.pad(_rows(pad_t(q_BxTxHxD, 1), kvh), ((0, 0), (0, 0), (0, m - g * tp), (0, 0)))
  bk = min(block, _pow2(s))
  per_head = lambda rows: pl.BlockSpec((None, None, rows, d), lambda bi, hi: (bi, hi, 0, 0))
  out = pl.pallas_call(
      functools.partial(_gpu_kernel, t=t, w=w, bk=bk, scale=1.0 / float(np.sqrt(d))),
      grid=(b, kvh),
      in_specs=[pl.BlockSpec((None,), lambda bi, hi: (bi,)),
                pl.BlockSpec((None, w, tp), lambda bi, hi: (bi, 0, 0)),
                per_head(m), per_head(s), per_head(s), per_head(tp), per_head(tp)],
      out_specs=per_head(m),
      out_shape=jax.ShapeDtypeStruct((b, kvh, m, d), q_BxTxHxD.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
  )(lengths_B.astype(jnp.int32), pad_t(ancestors_BxTxW, 1).transpose(0, 2, 1), q,
    cache_k_BxKxSxD,
    cache_v_BxKxSxD, pad_t(k_BxKxTxD, 2), pad_t(v_BxKxTxD, 2))
  out = out[:, :, :g * tp].reshape(b, kvh, g, tp, d)[:, :, :, :t]
  return _unrows(out.reshape(b, kvh, g * t, d), t)


IMPLS = {"reference": reference, "tpu": tpu, "gpu": gpu}
