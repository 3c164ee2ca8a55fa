"""LongSpec (`drafters.heads.longspec`): its drafts equal a cache-free recomputation over the
whole sequence (the ring of window keys is exact), greedy equals AR, sampling keeps the
target distribution, and the draft's memory does not grow with the context."""

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.base import Context
from specjax.drafters.heads import longspec
from specjax.models import model as model_lib
from specjax.models import projections, shared_params
from specjax.models.cache import KVCache
from specjax.sampling import Sampling
from specjax.verify import Verdict

from test_engine import PROMPTS, TARGET, gen
import test_lossless_sampling as lossless


def drafter(target, window=6, depth=3, scale=0.3):
  """A random LongSpec head for `target`, weights large enough to draft varied tokens."""
  head = longspec.LongSpecHead(target.config, window)
  params = head.init(jax.random.key(1))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = treedef.unflatten([x + scale * jax.random.normal(k, x.shape) if x.ndim == 2 else x
                              for x, k in zip(leaves, keys)])
  return head.drafter(params, shared_params(target.config, target.params), depth=depth)


def _reference_first_draft(d, tokens_T, c):
  """The draft's logits for the token after position c of `tokens_T`, computed over the
  whole sequence at once: self-attention over the last `window` positions, cross-attention
  over the target's last-layer keys of positions < c."""
  cfg = TARGET.config
  t = c + 1
  toks = jnp.asarray(tokens_T[:t])[None]
  pos = jnp.arange(t)[None]
  out = model_lib.causal_forward(cfg, TARGET.params, toks, features=(cfg.num_layers - 1,))
  emb = model_lib.embed(cfg, d.shared, toks)
  k, v = longspec.self_keys_values(cfg, d.params, emb, pos)
  ck, cv = projections.keys_values(cfg, TARGET.params, cfg.num_layers - 1, out.features[0], pos)
  j = jnp.arange(t)
  self_mask = ((j <= c) & (j > c - d.window))[None, None]
  g = longspec.layer(cfg, d.params, emb[:, c:], pos[:, c:], k, v, self_mask, ck, cv,
                     (j < c)[None, None])
  return model_lib.lm_head(cfg, d.shared, g)[0, 0]


def test_drafts_equal_a_cache_free_recomputation_across_commits():
  d = drafter(TARGET, window=6, depth=3)
  rng = np.random.default_rng(0)
  seq = rng.integers(0, TARGET.config.vocab_size, 64)
  c = 20  # committed positions; the root is seq[c]
  hist = jnp.asarray(np.pad(seq, (0, 64)))[None]
  cache = KVCache.for_config(TARGET.config, 1, 128, jnp.float32)
  cache, _ = model_lib.prefill(TARGET.config, TARGET.params, cache, hist, jnp.asarray([c]))
  ctx = Context(hist, jnp.asarray([c + 1]), cache)
  state = d.init(ctx, 128, ())
  sampled = Sampling.create(temperature=1.0)
  for step in range(3):  # propose, accept 2 drafts, commit (ring writes), again
    tree, state, _ = d.propose(state, ctx, None, sampled, jax.random.key(step))
    want = _reference_first_draft(d, np.asarray(ctx.history[0]), c)
    np.testing.assert_allclose(tree.probs[0, 0], jax.nn.softmax(want), atol=1e-5)
    a = 2
    verdict = Verdict(path=jnp.asarray([[0, 1, 2]]), accepted_drafts=jnp.asarray([a]),
                      next_token=jnp.asarray([7]))
    state = d.commit(state, ctx, verdict, ())
    new = np.asarray(ctx.history[0]).copy()
    new[c + 1:c + 1 + a] = np.asarray(tree.tokens[0, :a])
    new[c + 1 + a] = 7
    seq_new = jnp.asarray(new)[None]
    cache, _ = model_lib.prefill(TARGET.config, TARGET.params, cache, seq_new,
                                 jnp.asarray([c + 1 + a]))
    c += 1 + a
    ctx = Context(seq_new, jnp.asarray([c + 1]), cache)
  # Past the window several times over: the ring's slots wrapped.
  assert c > 2 * d.window


def test_greedy_longspec_equals_ar():
  want = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None).token_lists()
  for window in (3, 512):
    out = gen(TARGET, PROMPTS, max_new_tokens=24, eos=None,
              drafter=drafter(TARGET, window=window))
    assert out.token_lists() == want


def test_the_draft_memory_is_the_window_whatever_the_context():
  d = drafter(TARGET, window=512, depth=4)
  for max_len in (600, 8192):
    hist = jnp.zeros((2, max_len), jnp.int32)
    cache = KVCache.for_config(TARGET.config, 2, max_len, jnp.float32)
    ctx = Context(hist, jnp.asarray([7000 % max_len, 300]), cache)
    state = jax.eval_shape(lambda: d.init(ctx, max_len, ()))
    sizes = [x.shape for x in jax.tree.leaves(state)]
    cfg = TARGET.config
    assert sizes == [(2, cfg.num_kv_heads, 512, cfg.head_dim)] * 2 + [(2, 4)]


def test_sampled_longspec_keeps_the_target_distribution():
  lossless.check_generate_matches_target(dict(temperature=1.0),
                                         drafter(lossless.TARGET, window=2, depth=2, scale=0.0),
                                         min_gain=1.05, n=8_000)


def test_a_7k_token_prompt_decodes_as_ar_with_the_window_sized_draft_state():
  from test_engine import tiny  # pylint: disable=g-import-not-at-top
  cfg = tiny().config.replace(max_position_embeddings=8192)
  target = model_lib.Model(cfg, tiny().params)
  d = drafter(target, window=512, depth=4)
  prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, 7000).tolist()
  want = gen(target, [prompt], max_new_tokens=12, eos=None, max_len=7040).token_lists()
  out = gen(target, [prompt], max_new_tokens=12, eos=None, max_len=7040, drafter=d)
  assert out.token_lists() == want
  ctx = Context(jnp.zeros((1, 7040), jnp.int32), jnp.asarray([7000]),
                KVCache.for_config(cfg, 1, 7040, jnp.float32))
  state = jax.eval_shape(lambda: d.init(ctx, 7040, ()))
  assert state.ring_k.shape == (1, cfg.num_kv_heads, 512, cfg.head_dim)


def test_longspec_drafts_chains_only():
  import pytest  # pylint: disable=g-import-not-at-top
  head = longspec.LongSpecHead(TARGET.config, 8)
  with pytest.raises(ValueError, match="LongSpec drafts a chain"):
    head.drafter(head.init(jax.random.key(0)), shared_params(TARGET.config, TARGET.params),
                 top_k=2)


def test_longspec_verifies_through_the_tree_attention_kernel():
  """The verification forward reads the committed prefix through the Pallas kernel's prefix
  path and the drafts through its tree mask (interpreted here): still equal to AR."""
  pallas = TARGET.with_attention("pallas")
  want = gen(TARGET, PROMPTS[:2], max_new_tokens=8, eos=None).token_lists()
  out = gen(pallas, PROMPTS[:2], max_new_tokens=8, eos=None, drafter=drafter(pallas))
  assert out.token_lists() == want
