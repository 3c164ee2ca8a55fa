"""Weight-only quantized targets: int8 (W8A16) and int4 (W4A16) linear weights with
per-group scales, dequantised inside the forward.

After "Speculative Decoding Meets Quantization" (its W4A16 setting): each linear layer's
kernel W [in, out] is cut into groups of `group` input rows; a group's scale is its largest
|w| over the largest code, s = max|w| / (2^(bits-1) - 1), and it is stored as
q = round(W / s) (symmetric, no zero point) in int8 or int4. Activations stay in the
model's float dtype. `QTensor` is a pytree leaf pair (q, s); `materialize` turns a params
tree holding them back into float kernels, and every forward calls it first
(`models.forward`, and `models.skip` per layer), so the dequantisation sits right before
each matmul in the traced program, where XLA can fuse it into the matmul (whether a
backend then keeps only the codes resident, or hoists float copies out of the decode
loop, is the compiler's call: `decode.program_bytes` tells).

Quantized: the attention and MLP projections of Llama-family targets. Kept in float: the
embedding, the LM head, the norms and a mixture-of-experts layer's stacked experts (the usual W4A16 recipe; the LM head is shared with
draft heads). Speculation with a quantized target is lossless relative to the quantized
target, which is the model being verified with (`logit_error` measures how far it is from
the float one).
"""

from __future__ import annotations

import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

BITS = (8, 4)
# Params that are quantized: the linear kernels of attention and MLP.
_QUANTIZED = re.compile(r"layers_\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$")


@flax.struct.dataclass
class QTensor:
  """A quantized kernel: codes q [in, out] (int8 or int4) and scales [in / group, out]."""

  q: jax.Array
  scale: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.q.shape

  @property
  def dtype(self):
    return self.scale.dtype

  def dequantize(self) -> jax.Array:
    groups, out = self.scale.shape
    w = self.q.astype(self.scale.dtype).reshape(groups, -1, out) * self.scale[:, None, :]
    return w.reshape(self.q.shape)


def _is_q(x) -> bool:
  return isinstance(x, QTensor)


def quantize_array(w_IxO: jax.Array, bits: int, group: int) -> QTensor:
  """Symmetric per-group quantization of a kernel [in, out] along its input rows."""
  if bits not in BITS:
    raise ValueError(f"Quantization bits must be one of {BITS}; got {bits!r}.")
  rows, out = w_IxO.shape
  if group < 1 or rows % group:
    raise ValueError(f"A quantization group of {group} rows does not divide a kernel with "
                     f"{rows} input rows; pick a divisor of the hidden and MLP sizes.")
  top = 2 ** (bits - 1) - 1
  w = w_IxO.astype(jnp.float32).reshape(rows // group, group, out)
  scale = jnp.maximum(jnp.max(jnp.abs(w), axis=1), 1e-12) / top  # [groups, out]
  q = jnp.clip(jnp.round(w / scale[:, None, :]), -top, top).reshape(rows, out)
  return QTensor(q.astype(jnp.int8 if bits == 8 else jnp.int4),
                 scale.astype(w_IxO.dtype))


def quantize(params: Any, bits: int, group: int = 64) -> Any:
  """`params` with every attention and MLP kernel of a Llama-family model quantized."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  if not any(_QUANTIZED.search(_path(p)) for p, _ in flat):
    raise ValueError("No attention or MLP kernels to quantize: weight-only quantization is "
                     "built for Llama-family params (layers_i/self_attn, layers_i/mlp).")

  def one(path, leaf):
    return quantize_array(leaf, bits, group) if _QUANTIZED.search(_path(path)) else leaf
  return jax.tree_util.tree_map_with_path(one, params)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def materialize(params: Any) -> Any:
  """`params` with every `QTensor` dequantised (unchanged when it holds none)."""
  return jax.tree.map(lambda x: x.dequantize() if _is_q(x) else x, params, is_leaf=_is_q)


def is_quantized(params: Any) -> bool:
  return any(_is_q(x) for x in jax.tree.leaves(params, is_leaf=_is_q))


def weight_bytes(params: Any) -> int:
  """Bytes the params occupy as stored (int4 codes count half a byte)."""
  total = 0
  for x in jax.tree.leaves(params):
    bits = 4 if x.dtype == jnp.int4 else 8 * x.dtype.itemsize
    total += x.size * bits // 8
  return total


def logit_error(reference, quantized, tokens_NxT) -> dict[str, float]:
  """How far a quantized model's next-token distributions are from the reference's over
  `tokens_NxT`: max |logit difference|, mean KL(reference || quantized) and top-1
  agreement, every position."""
  tokens = jnp.asarray(tokens_NxT, jnp.int32)
  a, b = [], []
  for i in range(tokens.shape[0]):  # a row at a time: full-vocabulary logits are large
    a.append(reference.logits(tokens[i:i + 1])[0])
    b.append(quantized.logits(tokens[i:i + 1])[0])
  la, lb = jnp.concatenate(a), jnp.concatenate(b)
  pa, log_pa, log_pb = jax.nn.softmax(la), jax.nn.log_softmax(la), jax.nn.log_softmax(lb)
  return {"max_abs_logit": float(jnp.max(jnp.abs(la - lb))),
          "kl": float(jnp.mean(jnp.sum(pa * (log_pa - log_pb), -1))),
          "top1_agreement": float(jnp.mean(jnp.argmax(la, -1) == jnp.argmax(lb, -1)))}


__all__ = ["BITS", "QTensor", "is_quantized", "logit_error", "materialize", "quantize",
           "quantize_array", "weight_bytes"]
