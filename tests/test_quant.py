"""Weight-only quantized targets (`models.quant`): per-group int8/int4 codes, their logit
error against the float model, and speculation that is lossless against the quantized
target."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.drafters import DraftModel, PromptLookup
from specjax.models import quant

from test_engine import PROMPTS, TARGET, gen, tiny


def test_codes_and_scales_reconstruct_each_group_within_half_a_step():
  w = jax.random.normal(jax.random.key(0), (32, 12))
  for bits, top in ((8, 127), (4, 7)):
    qt = quant.quantize_array(w, bits, group=8)
    assert qt.q.dtype == (jnp.int8 if bits == 8 else jnp.int4) and qt.scale.shape == (4, 12)
    codes = np.asarray(qt.q.astype(jnp.int32))
    assert codes.min() >= -top and codes.max() <= top and np.abs(codes).max() == top
    step = np.repeat(np.asarray(qt.scale), 8, axis=0)  # each row's group scale
    assert (np.abs(np.asarray(qt.dequantize()) - np.asarray(w)) <= step / 2 + 1e-6).all()
  with pytest.raises(ValueError, match="group of 5 rows does not divide"):
    quant.quantize_array(w, 8, group=5)
  with pytest.raises(ValueError, match="bits must be one of"):
    quant.quantize_array(w, 3, group=8)


def test_quantized_targets_store_less_and_err_more_with_fewer_bits():
  toks = np.asarray([[3, 9, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])
  err, size = {}, {}
  for bits in (8, 4):
    q = TARGET.quantized(bits, group=16)
    assert quant.is_quantized(q.params) and q.dtype == TARGET.dtype
    err[bits] = quant.logit_error(TARGET, q, toks)
    size[bits] = quant.weight_bytes(q.params)
  assert err[8]["kl"] < err[4]["kl"] and err[8]["max_abs_logit"] < err[4]["max_abs_logit"]
  assert err[8]["top1_agreement"] >= err[4]["top1_agreement"]
  assert size[4] < size[8] < quant.weight_bytes(TARGET.params)
  assert quant.logit_error(TARGET, TARGET, toks)["max_abs_logit"] == 0.0
  with pytest.raises(ValueError, match="built for Llama-family targets"):
    tiny(arch="gpt2").quantized(8)


def test_speculation_is_lossless_against_the_quantized_target():
  """Greedy decoding of an int4 target with drafts equals that target's own AR output
  (not the float model's: the quantized model is the one verifying)."""
  q = TARGET.quantized(4, group=16)
  want = gen(q, PROMPTS, max_new_tokens=20, eos=None).token_lists()
  assert want != gen(TARGET, PROMPTS, max_new_tokens=20, eos=None).token_lists()
  for drafter in (DraftModel.truncated(q, 1, depth=3), PromptLookup(depth=4),
                  DraftModel.from_model(TARGET, depth=3)):  # the float model drafting
    assert gen(q, PROMPTS, max_new_tokens=20, eos=None, drafter=drafter).token_lists() == want


def test_quantized_kernels_shard_like_their_kernels():
  from specjax import sharding  # pylint: disable=g-import-not-at-top
  assert sharding.param_axes("layers_0/mlp/up_proj/kernel/q", 2) == ("embed", "mlp")
  assert sharding.param_axes("layers_0/mlp/up_proj/kernel/scale", 2) == (None, "mlp")
  assert sharding.param_axes("layers_0/input_layernorm/scale", 1) == (None,)
