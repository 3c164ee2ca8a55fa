"""SpecPV (`drafters.selfdraft.specpv`, LOSSY) and the partial caches it and partial-KV
self-drafting read (`models.partial_cache`): a partial verification attends exactly to
sinks + retrieved blocks + recent slots, a full one recomputes the buffered entries, a
partial cache holding everything decodes as AR, and Quest's bound bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import registry
from specjax.drafters import DraftModel
from specjax.drafters.selfdraft import specpv
from specjax.models import model as model_lib
from specjax.models import partial_cache
from specjax.models.cache import KVCache

from test_engine import PROMPTS, TARGET, gen

INNER = DraftModel.truncated(TARGET, 1, depth=3)


def make(**kw):
  return specpv.create(TARGET, INNER, **{"score_layer": 1, **kw})


def test_specpv_with_a_partial_cache_holding_everything_equals_ar():
  want = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None).token_lists()
  for period in (1, 3):  # every step full; two partial steps between full ones
    d = make(sinks=2, block=4, retrieve=1, window=200, period=period)
    out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None, drafter=d)
    assert out.token_lists() == want


def _setup(c=45):
  """A cache of c committed random tokens (2 rows, lengths c and c - 7), its clean copy, and a
  2-node chain to verify after each row's root."""
  rng = np.random.default_rng(0)
  toks = jnp.asarray(rng.integers(0, TARGET.config.vocab_size, (2, c + 3)), jnp.int32)
  n_B = jnp.asarray([c, c - 7])
  cache = KVCache.for_config(TARGET.config, 2, 128, jnp.float32)
  clean, _ = model_lib.prefill(TARGET.config, TARGET.params, cache, toks, n_B)
  tree_B3 = jnp.stack([toks[jnp.arange(2), n_B + i] for i in range(3)], 1)  # root + 2 nodes
  pos_B3 = n_B[:, None] + jnp.arange(3)
  return toks, n_B, clean, tree_B3, pos_B3


def _state(d, toks, n_B, blocks, full):
  b = 2
  start = jnp.maximum(n_B - d.buffer, 0)
  recent = jnp.take_along_axis(toks, start[:, None] + jnp.arange(d.buffer), 1)
  return specpv.SpecPVState((), jnp.int32(d.period - 1 if full else 0), jnp.bool_(full),
                            recent, jnp.asarray(blocks, jnp.int32),
                            jnp.ones((b, len(blocks[0])), bool))


def test_a_full_verification_recomputes_the_buffered_entries():
  d = make(sinks=2, block=4, retrieve=1, window=3, period=3)  # buffer = 2 * 4 = 8
  toks, n_B, clean, tree, pos = _setup()
  # The buffered entries (each row's last 8) as partial verifications left them: off.
  slot = np.arange(128)
  off = jnp.asarray((slot >= np.asarray(n_B)[:, None] - 8) & (slot < np.asarray(n_B)[:, None]),
                    jnp.float32)[:, None, :, None]
  noisy = clean.replace(k=tuple(k + off for k in clean.k), v=tuple(v + off for v in clean.v))
  want = model_lib.forward(TARGET.config, TARGET.params, tree, pos, model_lib.causal(3), clean)
  got, st = d.target_forward(_state(d, toks, n_B, [[0], [0]], True), TARGET.config,
                             TARGET.params, tree, pos, model_lib.causal(3), noisy, ())
  assert bool(st.full)
  np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
  for layer in range(TARGET.config.num_layers):
    for b, n in enumerate(np.asarray(n_B)):
      # The last `buffer` committed slots are recomputed and the 3 new ones written.
      for kv in ("k", "v"):
        np.testing.assert_allclose(getattr(got.cache, kv)[layer][b, :, n - 8:n + 3],
                                   getattr(want.cache, kv)[layer][b, :, n - 8:n + 3],
                                   atol=1e-5)
  assert np.abs(np.asarray(noisy.k[1]) - np.asarray(clean.k[1])).max() > 0.99  # it was off


def test_a_partial_verification_attends_to_sinks_blocks_and_recent_slots_only():
  d = make(sinks=2, block=4, retrieve=2, window=3, period=3)  # recent = 3 + 8 = 11 slots
  toks, n_B, clean, tree, pos = _setup()
  blocks = [[3, 5], [1, 0]]  # row 1's block 0 lies in its sinks: only slots 2, 3 count
  got, st = d.target_forward(_state(d, toks, n_B, blocks, False), TARGET.config,
                             TARGET.params, tree, pos, model_lib.causal(3), clean, ())
  assert not bool(st.full)
  seen = np.zeros((2, 128), bool)
  for b, n in enumerate(np.asarray(n_B)):
    kept = {0, 1} | set(range(n - 11, n)) | {s for blk in blocks[b]
                                              for s in range(4 * blk, 4 * blk + 4)}
    seen[b, sorted(kept)] = True
  prefix = jnp.broadcast_to(jnp.asarray(seen)[:, None], (2, 3, 128))
  want = model_lib.forward(TARGET.config, TARGET.params, tree, pos, model_lib.causal(3), clean,
                           prefix_BxTxS=prefix)
  np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
  full = model_lib.forward(TARGET.config, TARGET.params, tree, pos, model_lib.causal(3), clean)
  assert np.abs(np.asarray(got.logits) - np.asarray(full.logits)).max() > 1e-3
  # The new entries land in the full cache after each row's context, nothing else moves.
  for layer in range(TARGET.config.num_layers):
    for b, n in enumerate(np.asarray(n_B)):
      np.testing.assert_allclose(got.cache.k[layer][b, :, n:n + 3],
                                 want.cache.k[layer][b, :, n:n + 3], atol=1e-5)
      np.testing.assert_array_equal(got.cache.k[layer][b, :, :n], clean.k[layer][b, :, :n])


def test_partial_slots_are_bounded_by_the_knobs_not_the_context():
  d = make(sinks=2, block=4, retrieve=2, window=3, period=3)
  st = _state(d, jnp.zeros((2, 64), jnp.int32), jnp.asarray([40, 8]), [[3, 5], [1, 0]], False)
  for lengths in ([40, 8], [7000, 30]):
    src, valid = d.partial_slots(st, jnp.asarray(lengths))
    assert src.shape == valid.shape == (2, d.cache_slots) and d.cache_slots == 2 + 8 + 3 + 8
  # Row 1 (8 slots): every committed slot once, nothing else.
  src, valid = d.partial_slots(st, jnp.asarray([40, 8]))
  assert sorted(np.asarray(src[1])[np.asarray(valid[1])].tolist()) == list(range(8))


def test_quest_bounds_bound_every_key_and_pick_the_top_blocks():
  rng = np.random.default_rng(1)
  k = jnp.asarray(rng.normal(size=(2, 2, 32, 8)), jnp.float32)  # [B, KVH, S, D]
  q = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)  # 4 query heads, 2 per kv head
  k = k.at[0, :, 20:24].set(5.0 * jnp.sign(q[0, ::2, None, :]))  # block 5 of row 0 aligns
  lengths = jnp.asarray([30, 9])
  bound = partial_cache.block_bounds(q, k, lengths, 4)
  dots = np.einsum("bkgd,bksd->bs", np.asarray(q).reshape(2, 2, 2, 8), np.asarray(k))
  for b in range(2):
    for blk in range(8):
      keys = [s for s in range(4 * blk, 4 * blk + 4) if s < int(lengths[b])]
      if keys:
        assert bound[b, blk] >= dots[b, keys].max() - 1e-4
      else:
        assert bound[b, blk] == -np.inf
  eligible = jnp.ones((2, 8), bool).at[0, 0].set(False)
  ids, valid = partial_cache.select_blocks(bound, eligible, 4)
  assert int(ids[0, 0]) == 5 and 0 not in np.asarray(ids[0]).tolist()
  assert np.asarray(valid).tolist() == [[True] * 4, [True, True, True, False]]  # 3 blocks


def test_specpv_is_registered_lossy_and_checks_its_knobs():
  assert registry.DRAFTERS.meta("specpv")["lossy"]
  with pytest.raises(ValueError, match="block, window, period >= 1"):
    make(period=0)
  with pytest.raises(ValueError, match="score_layer=5"):
    make(score_layer=5)
  with pytest.raises(ValueError, match="attention_impl='xla'"):
    make().validate(TARGET.with_attention("pallas").config)
