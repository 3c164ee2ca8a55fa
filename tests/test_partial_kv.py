"""Partial-KV self-drafting (`drafters.selfdraft.partial_kv`): the target drafting over
its sinks and a recent window, outputs equal to AR, a bounded draft cache, and the target
distribution kept when sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import registry
from specjax.models.cache import KVCache

from test_engine import PROMPTS, TARGET, gen
import test_lossless_sampling as lossless


def test_greedy_partial_kv_equals_ar_and_a_full_window_drafts_perfectly():
  want = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None).token_lists()
  gains = {}
  for window in (2, 200):
    d = registry.DRAFTERS.build("partial_kv", TARGET, depth=3, sinks=2, window=window)
    out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d)
    assert out.token_lists() == want
    gains[window] = np.asarray(out.stats.gained)[:, :6]
  # A window holding the whole context is the target itself: every draft accepted.
  assert (gains[200] == 4).all()
  assert (gains[2] < 4).any()  # two sinks and two recent tokens miss some


def test_the_draft_cache_is_bounded_and_holds_sinks_and_the_window():
  d = registry.DRAFTERS.build("partial_kv", TARGET, depth=3, sinks=2, window=4)
  for max_len in (64, 8192):
    cache = KVCache.for_config(TARGET.config, 2, max_len, jnp.float32)
    k = jax.random.normal(jax.random.key(0), cache.k[0].shape)
    cache = cache.replace(k=(k,) + cache.k[1:], lengths=jnp.asarray([40, 5]))
    compact, valid = d.gather(cache)
    assert compact.k[0].shape == (2, TARGET.config.num_kv_heads, d.cache_slots,
                                  TARGET.config.head_dim) and d.cache_slots == 9
    # Row 0: slots 0, 1 (sinks) and 36..39 (the window); row 1: 0..4 once each.
    np.testing.assert_array_equal(compact.k[0][0, :, :6], k[0, :, [0, 1, 36, 37, 38, 39]]
                                  .transpose(1, 0, 2))
    np.testing.assert_array_equal(valid, [[True] * 6, [True, True, False, True, True, True]])
    np.testing.assert_array_equal(compact.k[0][1, :, 3:6], k[1, :, 2:5])


def test_sampled_partial_kv_keeps_the_target_distribution():
  # No sinks and one recent token: a draft that differs from the target on both prompts.
  d = registry.DRAFTERS.build("partial_kv", lossless.TARGET, depth=2, sinks=0, window=1)
  lossless.check_generate_matches_target(dict(temperature=1.0), d, min_gain=1.2, n=8_000)


def test_partial_kv_knobs_are_checked():
  with pytest.raises(ValueError, match="depth >= 1, sinks >= 0 and window >= 1"):
    registry.DRAFTERS.build("partial_kv", TARGET, window=0).validate(TARGET.config)
  with pytest.raises(ValueError, match="made for another target"):
    registry.DRAFTERS.build("partial_kv", TARGET).validate(lossless.TARGET.config)
