"""specjax.kernels: attention for tree verification.

`attention_reference` (pure jnp, dense masked softmax over the preallocated cache) is what
the models call today; Pallas tree-attention kernels for TPU and GPU will sit beside it with
the same signature, and it stays as their reference.
"""

from .attention import attention_reference

__all__ = ["attention_reference"]
