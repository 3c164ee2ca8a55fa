"""specjax.kernels: attention for tree verification.

`attention` (dispatch.py) is what the models call: the pure-jnp `attention_reference`
(dense masks, XLA) by default, or the Pallas tree-attention kernels of tree_attention.py
(TPU Mosaic, GPU Triton; each beside its jnp reference) with impl="pallas".
"""

from .attention import attention_reference
from .dispatch import IMPLS, attention, check_impl

__all__ = ["IMPLS", "attention", "attention_reference", "check_impl"]
