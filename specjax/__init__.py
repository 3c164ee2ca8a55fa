"""specjax: speculative decoding in JAX, pure-functional and lossless where it says so."""

__version__ = "0.1.0"
