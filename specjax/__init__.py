"""specjax: speculative decoding in JAX, pure-functional and lossless where it says so.

  target = specjax.load("smollm2-135m")
  out = specjax.generate(target, prompts, max_new_tokens=64, drafter=..., stop=...)
"""

from specjax.decode import Output, generate
from specjax.models import Model, load

__version__ = "0.1.0"
__all__ = ["Model", "Output", "generate", "load"]
