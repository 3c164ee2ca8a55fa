"""specjax: speculative decoding in JAX, pure-functional and lossless where it says so.

  target = specjax.load("smollm2-135m")
  out = specjax.generate(target, prompts, max_new_tokens=64, drafter=..., stop=...)

Drafters, stop policies and acceptance rules are registered by name in `specjax.registry`
and imported on first use, so `import specjax` loads only the decode loop and the models.
"""

from specjax import drafters, stopping
from specjax.decode import Output, generate
from specjax.models import Model, load

__version__ = "0.1.0"
__all__ = ["Model", "Output", "drafters", "generate", "load", "stopping"]
