"""Pallas tree-attention kernels (kernels/tree_attention.py) on CPU: interpret mode matches
the jnp reference on random trees; both kernels lower and export for their hardware;
`generate` with impl="pallas" gives the XLA path's tokens (alone and sharded)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import export

from specjax import decode, kernels, models, sharding
from specjax.drafters import DraftModel
from specjax.kernels import tree_attention as ta

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def ancestor_mask(parents):
  """bool[T, T]: ancestor-or-self of each node (parents[i] < i, -1 = none)."""
  t = len(parents)
  mask = np.zeros((t, t), bool)
  for i in range(t):
    j = i
    while j >= 0:
      mask[i, j] = True
      j = parents[j]
  return mask


@st.composite
def trees(draw):
  """A batch of random trees with prefixes: random parents (so random depths), tree sizes
  across the 32-bit word boundary, prefix lengths including 0 and the full cache, GQA
  ratios 1, 2 and 4, both dtypes."""
  b = draw(st.integers(1, 3))
  t = draw(st.sampled_from([1, 2, 5, 9, 33]))
  kvh = draw(st.sampled_from([1, 2]))
  g = draw(st.sampled_from([1, 2, 4]))
  d = draw(st.sampled_from([8, 16]))
  s = draw(st.sampled_from([8, 24, 64]))
  lengths = [draw(st.sampled_from([0, s, 1, s - 1]) | st.integers(0, s)) for _ in range(b)]
  parents = [[draw(st.integers(-1, i - 1)) for i in range(t)] for _ in range(b)]
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  seed = draw(st.integers(0, 2**16))
  return b, t, kvh, g, d, s, lengths, parents, dtype, seed


def make_inputs(b, t, kvh, g, d, s, lengths, parents, dtype, seed):
  rng = np.random.default_rng(seed)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  visible = jnp.asarray(np.stack([ancestor_mask(p) for p in parents]))
  return (arr(b, t, kvh * g, d), arr(b, kvh, t, d), arr(b, kvh, t, d), arr(b, kvh, s, d),
          arr(b, kvh, s, d), jnp.asarray(lengths, jnp.int32), jax.jit(ta.pack_ancestors)(visible))


def test_ancestor_bits_round_trip():
  visible = jnp.asarray(np.random.default_rng(0).random((2, 40, 40)) < 0.5)
  bits = ta.pack_ancestors(visible)
  assert bits.shape == (2, 40, 2) and bits.dtype == jnp.int32
  np.testing.assert_array_equal(ta.unpack_ancestors(bits, 40), visible)


@pytest.mark.parametrize("name", ["tpu", "gpu"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=trees())
def test_interpreted_kernel_matches_reference(name, case):
  args = make_inputs(*case)
  dtype = case[-2]
  # Each under one jit: op by op, every random shape would compile dozens of small ops.
  want = jax.jit(ta.reference)(*args).astype(jnp.float32)
  got = jax.jit(functools.partial(ta.IMPLS[name], block=8, interpret=True))(*args)
  assert got.dtype == dtype and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want),
                             atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_reference_differs_when_the_tree_is_wrong():
  """The comparison above can fail: a kernel that ignored the ancestor bits (a chain's
  causal mask instead of the tree's) is caught."""
  case = (1, 5, 2, 2, 16, 24, [10], [[-1, 0, 0, 1, 2]], jnp.float32, 3)
  args = make_inputs(*case)
  chain = ta.pack_ancestors(jnp.tril(jnp.ones((1, 5, 5), bool)))
  wrong = ta.tpu(*args[:-1], chain, interpret=True)
  assert float(jnp.abs(wrong - ta.reference(*args)).max()) > 1e-2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name,platform,marker", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_kernel_lowers_and_exports_for_its_hardware(name, platform, marker, dtype):
  """Lowered through Mosaic (TPU) or Triton (GPU) and serialized, from this CPU-only
  install: shapes of a SmolLM2-like layer (64-dim heads, GQA 3, a 512-slot cache)."""
  b, t, kvh, g, d, s = 2, 8, 3, 3, 64, 512
  shapes = [(b, t, kvh * g, d), (b, kvh, t, d), (b, kvh, t, d), (b, kvh, s, d), (b, kvh, s, d)]
  args = [jax.ShapeDtypeStruct(x, dtype) for x in shapes] + [
      jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, t, 1), jnp.int32)]
  # Triton calls carry no cross-version guarantee: exporting one has to say so.
  checks = [export.DisabledSafetyCheck.custom_call(marker)] if platform == "cuda" else []
  exported = export.export(jax.jit(ta.IMPLS[name]), platforms=[platform],
                           disabled_checks=checks)(*args)
  assert marker in exported.mlir_module()
  assert exported.out_avals[0].shape == shapes[0] and exported.out_avals[0].dtype == dtype
  assert len(exported.serialize()) > 1000


def test_dispatcher():
  args = make_inputs(2, 3, 2, 2, 8, 16, [0, 16], [[-1, 0, 0]] * 2, jnp.float32, 0)
  q, k, v, ck, cv, lengths, bits = args
  visible = ta.unpack_ancestors(bits, 3)
  want = ta.reference(*args)
  for impl in kernels.IMPLS:
    got = kernels.attention(q, k, v, visible, ck, cv, None, lengths, impl=impl)
    np.testing.assert_allclose(got, want, atol=2e-5)
  # An explicit prefix mask (a head's pending levels) takes the XLA path, kernel or not.
  prefix = jnp.zeros((2, 3, 16), bool).at[:, :, 3].set(True)
  explicit = kernels.attention(q, k, v, visible, ck, cv, prefix, lengths, impl="pallas")
  np.testing.assert_allclose(explicit, kernels.attention_reference(q, k, v, visible, ck, cv,
                                                                   prefix), atol=1e-6)
  with pytest.raises(ValueError, match="Unknown attention impl 'triton'"):
    models.load("tiny-random").with_attention("triton")


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 512, n).tolist() for n in (5, 70, 1)]  # ragged, past a chunk


@pytest.mark.parametrize("drafter", [None, "chain", "tree"])
def test_generate_with_pallas_equals_xla(prompts, drafter):
  """impl="pallas" (the TPU kernel interpreted on CPU) in every target forward: prefill
  chunks, AR steps, chain and tree verification."""
  xla = models.load("tiny-random")
  pallas = xla.with_attention("pallas")
  make = {None: lambda m: None,
          "chain": lambda m: DraftModel.truncated(m, 1, depth=3),
          "tree": lambda m: DraftModel.truncated(m, 1, tree=[(0,), (1,), (0, 0), (1, 0)])}
  want = decode.generate(xla, prompts, max_new_tokens=10, eos=None, drafter=make[drafter](xla))
  got = decode.generate(pallas, prompts, max_new_tokens=10, eos=None,
                        drafter=make[drafter](pallas))
  assert got.token_lists() == want.token_lists()
  np.testing.assert_array_equal(got.stats.target_calls, want.stats.target_calls)


def test_sharded_generate_runs_the_kernel_per_device(prompts):
  """Under a plan the kernel enters through jax.shard_map (batch over data, KV heads over
  tensor): the same tokens as one device with XLA attention."""
  want = decode.generate(models.load("tiny-random-8h"), prompts, max_new_tokens=8, eos=None)
  plan = sharding.Plan.create("data=2,tensor=4")
  target = models.load("tiny-random-8h", plan=plan).with_attention("pallas")
  got = decode.generate(target, prompts, max_new_tokens=8, eos=None, plan=plan)
  assert got.token_lists() == want.token_lists()


def test_microbenchmark_on_cpu_only_checks_correctness(capsys):
  from specjax.kernels import bench  # pylint: disable=g-import-not-at-top
  out = bench.main([])
  assert out["backend"] == "cpu" and max(out["max_abs_error"].values()) < 1e-2
  assert "correctness only" in capsys.readouterr().out
