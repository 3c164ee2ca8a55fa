"""specjax: speculative decoding in JAX. `make install` installs it editable with `dev`."""

from setuptools import setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "ml-collections==1.1.0",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "datasets==5.2.0",
    "gguf==0.19.0",
    # Tokenizers and chat templates: transformers builds them (its GGUF converter is
    # semi-private: keep the pin), on tokenizers + jinja2; no torch at run time.
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "jinja2==3.1.6",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
]
EXTRAS = {
    # The parity reference (PyTorch CPU under transformers) and the test tools. The head
    # references eagle-llm==1.2.1 and medusa-llm==0.1 pin conflicting old packages their
    # model code does not import: `make install` adds them with --no-deps.
    "dev": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "hypothesis==6.170.15",
        "flatbuffers==25.12.19",  # jax.export serialization (the kernels' export tests)
        "torch==2.13.0",
        "accelerate==1.15.0",
        # What `speculators` (installed --no-deps by the Makefile: it pins older transformers
        # and datasets than ours) needs to import its EAGLE-3 model: it imports openai and
        # hs_connectors at its top level and logs with loguru.
        "openai==3.57.0",
        "hs-connectors==0.9.0",
        "loguru==0.7.3",
    ],
    "tpu": ["jax[tpu]==0.10.2"],
    "gpu": ["jax[cuda12]==0.10.2"],
}

setup(
    name="specjax",
    version="0.1.0",
    description="Speculative decoding in JAX: draft heads, lossless verification, sweeps.",
    python_requires=">=3.11",
    packages=[
        "specjax", "specjax.models", "specjax.drafters", "specjax.drafters.heads",
        "specjax.drafters.retrieval", "specjax.drafters.selfdraft", "specjax.stopping",
        "specjax.training", "specjax.evaluation", "specjax.kernels", "specjax.configs",
    ],
    package_dir={
        "specjax": "specjax",
        "specjax.training": "train",
        "specjax.evaluation": "eval",
        "specjax.kernels": "kernels",
        "specjax.configs": "configs",
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "specjax-eval=specjax.evaluation.cli:run",
        "specjax-train=specjax.training.cli:run",
        "specjax-distill=specjax.training.distill:cli",
        "specjax-export=specjax.drafters.export:main",
    ]},
)
