"""The attention the models' forward calls: `attention(..., impl=)`.

  impl="xla"          `attention_reference`: dense masks, XLA's fusions (the default, and
                      the only path on CPU unless asked)
  impl="pallas"       the tree-attention kernel of the backend (`tree_attention.tpu` on TPU,
                      `.gpu` on GPU; on CPU the TPU kernel in interpret mode, for tests)
  impl="pallas_tpu" / "pallas_gpu"   that kernel (interpreted where it cannot run natively)

The kernels take the structure, not masks: each sequence's committed prefix length and the
tree's ancestor bits (packed from the [B, T, T] visibility, a few bytes per token). Calls
that carry an explicit prefix mask instead (a draft head's own pending levels, sliding
windows) and cache-free passes take the XLA path whatever `impl` says.

Under a sharded `generate` (`sharding.use(plan)` is active while it traces) a kernel runs
per device through `jax.shard_map`: batch over the batch axes, KV heads (and their query
heads) over the tensor axis when they divide, so each device sees whole sequences and
whole GQA groups.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from specjax import sharding

from .attention import attention_reference, pack_ancestors, prefix_mask

IMPLS = ("xla", "pallas", "pallas_tpu", "pallas_gpu")
_PLATFORM = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"Unknown attention impl {impl!r}; expected one of {IMPLS}.")
  return impl


def kernel(impl: str):
  """The tree-attention function `impl` names, interpreted off its hardware."""
  from . import tree_attention  # pylint: disable=g-import-not-at-top  (Pallas, on first use)

  backend = _PLATFORM.get(jax.default_backend(), "cpu")
  name = {"pallas": "tpu" if backend == "cpu" else backend,
          "pallas_tpu": "tpu", "pallas_gpu": "gpu"}[check_impl(impl)]
  return functools.partial(tree_attention.IMPLS[name], interpret=name != backend)


def attention(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, visible_BxTxT, cache_k_BxKxSxD=None,
              cache_v_BxKxSxD=None, prefix_BxTxS=None, lengths_B=None, impl: str = "xla"):
  """Attention of T new tokens over the cache and themselves ([B, T, H, D] out).

  The cache part is either `prefix_BxTxS` (an explicit mask) or, when that is None,
  the committed slots [0, lengths_B) of each sequence.
  """
  if cache_k_BxKxSxD is None:
    return attention_reference(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, visible_BxTxT)
  t, s = q_BxTxHxD.shape[1], cache_k_BxKxSxD.shape[2]
  if impl == "xla" or prefix_BxTxS is not None:
    if prefix_BxTxS is None:
      prefix_BxTxS = prefix_mask(lengths_B, t, s)
    return attention_reference(q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, visible_BxTxT,
                               cache_k_BxKxSxD, cache_v_BxKxSxD, prefix_BxTxS)
  b = q_BxTxHxD.shape[0]
  ancestors = pack_ancestors(jax.numpy.broadcast_to(visible_BxTxT, (b, t, t)))
  args = (q_BxTxHxD, k_BxKxTxD, v_BxKxTxD, cache_k_BxKxSxD, cache_v_BxKxSxD, lengths_B,
          ancestors)
  fn = kernel(impl)
  plan = sharding.active()
  if plan is None:
    return fn(*args)
  return _per_device(plan, fn, k_BxKxTxD.shape[1])(*args)


def _per_device(plan: sharding.Plan, fn, kv_heads: int):
  """`fn` under `jax.shard_map`: whole sequences and whole GQA groups per device."""
  batch = plan.spec(("batch",))[0]
  heads = plan.spec(("kv_heads",))[0]
  if heads is not None and kv_heads % plan.axis_size(heads):
    heads = None  # as the cache: KV heads that do not divide stay whole
  q = P(batch, None, heads, None)
  kv = P(batch, heads, None, None)
  return jax.shard_map(fn, mesh=plan.mesh, in_specs=(q, kv, kv, kv, kv, P(batch),
                                                     P(batch, None, None)),
                       out_specs=q, check_vma=False)
