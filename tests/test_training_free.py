"""Training-free drafters that learn as they decode (Token Recycling, SuffixDecoding):
greedy losslessness on ragged batches, hot starts, and what each one's data holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import decode, registry
from specjax.drafters import Context, EagleHead, Hybrid, SuffixDecoding, TokenRecycling
from specjax.drafters.hybrid import merge
from specjax.models import shared_params
from specjax.tree import DraftTree
from specjax.sampling import Sampling
from test_engine import PROMPTS, TARGET, gen, tiny

V = TARGET.config.vocab_size
# Ragged, with a 1-token prompt and one longer than a prefill chunk (64 tokens).
LONG = np.random.default_rng(1).integers(0, V, 100).tolist()
BATCH = PROMPTS + [[4], LONG]


def eagle(depth=3):
  """An EAGLE-1 chain with random (not zero) head weights."""
  head = EagleHead(TARGET.config)
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(4), x.shape),
                        head.init(jax.random.key(3)))
  return head.drafter(params, shared_params(TARGET.config, TARGET.params), depth=depth)


DRAFTERS = {
    "token_recycling": lambda: registry.DRAFTERS.build("token_recycling", TARGET, num_nodes=12),
    "suffix": lambda: registry.DRAFTERS.build("suffix", TARGET, depth=8, corpus_size=256),
    # A trained head's chain, Token Recycling's tree and SuffixDecoding's chain in one tree.
    "hybrid": lambda: Hybrid.create([eagle(), DRAFTERS["token_recycling"](),
                                     DRAFTERS["suffix"]()]),
}


@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_equals_ar_cold_and_hot(name):
  """Cold, then carried into a second call (the hot start): both equal AR token for token,
  in a ragged batch and alone; the second call drafts from what the first learned."""
  want = gen(TARGET, BATCH, max_new_tokens=24, eos=None).token_lists()
  d = DRAFTERS[name]()
  cold = gen(TARGET, BATCH, max_new_tokens=24, eos=None, drafter=d)
  assert cold.token_lists() == want
  hot = gen(TARGET, BATCH, max_new_tokens=24, eos=None, drafter=d.carry(cold))
  assert hot.token_lists() == want
  assert hot.tau.mean() > cold.tau.mean() > 1.0
  alone = gen(TARGET, [[4]], max_new_tokens=24, eos=None, drafter=d.carry(hot))
  assert alone.token_lists()[0] == want[len(PROMPTS)]


def test_recycled_rows_are_the_targets_top_k():
  """After one step, the row of the root and of every tree node holds the target's top-k
  there (from a matrix whose tree has distinct tokens, so no row is written twice)."""
  k = 8
  matrix = jax.random.permutation(jax.random.key(3), jnp.tile(jnp.arange(V), (V, 1)), 1,
                                  independent=True)[:, :k].astype(jnp.int32)
  d = TokenRecycling.create(V, k, num_nodes=6).replace(matrix=matrix)
  prompt = [5, 9, 3]
  b = len(prompt)
  ctx = Context(jnp.asarray([prompt + [0] * 5], jnp.int32), jnp.asarray([b], jnp.int32))
  tree, _, _ = d.propose(d.init(ctx, 8, ()), ctx, None, Sampling.create(0.0), None)
  tokens, parents = np.asarray(tree.tokens[0]).tolist(), np.asarray(tree.parents[0]).tolist()
  assert len(set(tokens + [prompt[-1]])) == 1 + len(tokens)  # distinct rows
  out = gen(TARGET, [prompt], max_new_tokens=1, eos=None, drafter=d)
  learned = np.asarray(out.drafter_state.matrix)

  def path(i):  # the tokens from the root's child down to node i
    return [] if i < 0 else path(parents[i]) + [tokens[i]]

  for token, context in [(prompt[-1], prompt)] + [(tokens[i], prompt + path(i))
                                                  for i in range(len(tokens))]:
    logits = np.asarray(TARGET.logits([context]))[0, -1]
    np.testing.assert_array_equal(learned[token], np.argsort(-logits, kind="stable")[:k])
  untouched = sorted(set(range(V)) - set(tokens) - {prompt[-1]})
  np.testing.assert_array_equal(learned[untouched], np.asarray(matrix)[untouched])


def _propose(d: SuffixDecoding, history):
  ctx = Context(jnp.asarray([history + [0] * (32 - len(history))], jnp.int32),
                jnp.asarray([len(history)], jnp.int32))
  tree, _, _ = jax.jit(lambda d, ctx: d.propose((), ctx, None, Sampling.create(0.0), None))(
      d, ctx)
  return np.asarray(tree.tokens[0])[np.asarray(tree.valid[0])].tolist()


def test_suffix_follows_the_most_frequent_continuation():
  """In a hand-built corpus [5, 6] is followed by 7 three times in four and [5, 6, 7] by 8
  twice: the draft after ...5, 6 is [7, 8] (two tokens: the budget of a 2-token match).
  Within the request, the longest match's continuation wins."""
  d = SuffixDecoding(jnp.full((64,), -1, jnp.int32), depth=8).with_corpus(
      [[1, 5, 6, 7, 8], [5, 6, 7, 8, 2], [3, 5, 6, 7, 1], [5, 6, 9]])
  assert _propose(d, [2, 4, 5, 6]) == [7, 8]
  # [3, 5, 6] occurs once, followed by 7, 1: a longer match, probability 1, budget 3.
  assert _propose(d, [2, 3, 5, 6]) == [7, 1]
  assert _propose(d, [2, 3, 4]) == []  # no earlier 4 anywhere: no draft
  empty = SuffixDecoding(jnp.full((64,), -1, jnp.int32), depth=8)
  assert _propose(empty, [5, 6, 3, 4, 5, 6, 3, 4, 5, 6]) == [3, 4, 5, 6]


def test_suffix_corpus_is_fifo_and_round_trips(tmp_path):
  d = SuffixDecoding(jnp.full((8,), -1, jnp.int32))
  d = d.with_corpus([[1, 2, 3]]).with_corpus([[4, 5, 6]], append=True)
  assert np.asarray(d.corpus).tolist() == [-1, 1, 2, 3, -1, 4, 5, 6]
  d = d.with_corpus([[7, 8]], append=True)  # the oldest tokens fall out
  assert np.asarray(d.corpus).tolist() == [3, -1, 4, 5, 6, -1, 7, 8]
  d.save_corpus(str(tmp_path / "c.npy"))
  loaded = registry.DRAFTERS.build("suffix", TARGET, corpus_size=8,
                                   corpus=str(tmp_path / "c.npy"))
  np.testing.assert_array_equal(loaded.corpus, d.corpus)
  with pytest.raises(ValueError, match="No SuffixDecoding corpus"):
    registry.DRAFTERS.build("suffix", TARGET, corpus=str(tmp_path / "missing.npy"))


@pytest.mark.parametrize("drafter,match", [
    (lambda: TokenRecycling.create(V + 1), "matrix has 65 rows"),
    (lambda: TokenRecycling.create(V, k=2), "uses rank 7"),
    (lambda: SuffixDecoding(jnp.full((8,), V, jnp.int32)), "another tokenizer"),
    (lambda: SuffixDecoding(jnp.full((8,), -1, jnp.int32), depth=0), "depth >= 1"),
])
def test_bad_drafters_are_refused_before_compiling(drafter, match):
  with pytest.raises(ValueError, match=match):
    decode.generate(TARGET, [[1, 2]], max_new_tokens=4, drafter=drafter())
  with pytest.raises(ValueError, match="num_nodes must be in"):
    TokenRecycling.create(V, num_nodes=81)


def test_merge_drops_repeated_candidates_and_packs_the_rest():
  """Two chains sharing their first token and a 2-node tree: the shared prefix is verified
  once, the second chain's tail hangs from the first chain's node, survivors come first."""
  a = DraftTree.chain(jnp.asarray([[7, 8]]), jnp.asarray([[True, True]]))
  b = DraftTree.chain(jnp.asarray([[7, 9, 4]]), jnp.asarray([[True, True, False]]))
  c = DraftTree(jnp.asarray([[8, 7]]), jnp.asarray([[-1, 0]]), jnp.asarray([[True, True]]))
  m = merge([a, b, c])
  n_valid = int(m.valid.sum())
  got = [(int(t), int(p)) for t, p, v in zip(m.tokens[0], m.parents[0], m.valid[0]) if v]
  # a: 7 (0), 8 under 7 (1); b: 7 is a copy of node 0, 9 under node 0 (2), 4 was invalid;
  # c: 8 at the root (3), 7 under it (4).
  assert got == [(7, -1), (8, 0), (9, 0), (8, -1), (7, 3)] and n_valid == 5
  assert not bool(m.valid[0, n_valid:].any())


def test_hybrid_refuses_parts_that_need_their_own_tree():
  from specjax.drafters import DraftModel  # pylint: disable=g-import-not-at-top
  h = Hybrid.create([DraftModel.truncated(TARGET, 1, depth=2), DRAFTERS["suffix"]()])
  with pytest.raises(ValueError, match="cannot be part of a hybrid tree"):
    decode.generate(TARGET, [[1, 2]], max_new_tokens=4, drafter=h)
  with pytest.raises(ValueError, match="naming another drafter"):
    registry.DRAFTERS.check("hybrid", None, parts=[{"depth": 3}, {"drafter": "suffix"}])
  with pytest.raises(ValueError, match="at least 2 drafters"):
    registry.DRAFTERS.check("hybrid", None, parts=[{"drafter": "suffix"}])
  with pytest.raises(ValueError, match=r"drafter 'suffix': unknown knobs \['nodes'\]"):
    registry.DRAFTERS.check("hybrid", None, parts=[{"drafter": "suffix", "nodes": 3},
                                                   {"drafter": "token_recycling"}])


def test_suffix_cut_by_costs_drafts_only_what_pays():
  """With step costs, the draft keeps the length with the most expected tokens per ms:
  free verification keeps all of it; verification dearer than its expected gain, none."""
  corpus = [[1, 5, 6, 7, 8], [5, 6, 7, 8, 2], [3, 5, 6, 7, 1], [5, 6, 9]]
  d = SuffixDecoding(jnp.full((64,), -1, jnp.int32), depth=4).with_corpus(corpus)
  assert _propose(d.replace(step_ms=(1.0,) * 5), [2, 4, 5, 6]) == [7, 8]
  # Expected tokens: 1 + 0.75 (one draft), 1 + 0.75 + 0.5 (two), against AR's 1 token.
  assert _propose(d.replace(step_ms=(1.0, 2.0, 2.5, 3.0, 3.0)), [2, 4, 5, 6]) == []
  assert _propose(d.replace(step_ms=(1.0, 1.5, 1.6, 3.0, 3.0)), [2, 4, 5, 6]) == [7, 8]
  assert _propose(d.replace(step_ms=(1.0, 1.5, 2.5, 3.0, 3.0)), [2, 4, 5, 6]) == [7]


DEEP = tiny(layers=4, seed=2)  # SWIFT skips sub-layers of layers 1-2


def test_swift_equals_ar_while_its_skip_set_changes_without_recompiling():
  """The skip set moves during decoding (a traced value: no new program), greedy output
  equals AR cold and hot, and the search stops after `max_iterations` tries, keeping the
  best set it found for the next call."""
  want = gen(DEEP, BATCH, max_new_tokens=24, eos=None).token_lists()
  d = registry.DRAFTERS.build("swift", DEEP, depth=3, threshold=0.0, window=8, bo_every=3,
                              max_iterations=12)
  out = gen(DEEP, BATCH, max_new_tokens=24, eos=None, drafter=d)
  assert out.token_lists() == want
  assert (np.asarray(out.stats.gained) > 1).any()
  s = out.drafter_state
  steps = int(np.asarray(out.stats.target_calls).max())
  assert int(s.iteration) == min(steps, 12) and bool(s.done) == (steps >= 12)
  # The search tried several sets, and drafts with the best of them.
  tried = np.asarray(s.tried)[np.asarray(s.tried_score) >= 0]
  assert len(tried) == int(s.iteration) and len({t.tobytes() for t in tried}) > 1
  best = int(np.argmax(np.asarray(s.tried_score)))
  np.testing.assert_array_equal(s.mask, np.asarray(s.tried)[best])
  assert float(s.score) == float(np.max(s.tried_score))
  assert int(np.asarray(s.mask).sum()) == 2  # round(0.45 x 4 eligible sub-layers)
  assert not np.asarray(s.mask)[[0, -1]].any()  # the first and last layers always run
  compiled = decode._generate._cache_size()  # pylint: disable=protected-access
  hot = gen(DEEP, BATCH, max_new_tokens=24, eos=None, drafter=d.carry(out))
  assert hot.token_lists() == want
  assert decode._generate._cache_size() == compiled  # pylint: disable=protected-access
  assert bool(hot.drafter_state.done)
  if bool(s.done):  # a finished search no longer moves
    np.testing.assert_array_equal(hot.drafter_state.mask, s.mask)


def test_swift_is_refused_for_targets_it_cannot_skip_in():
  with pytest.raises(ValueError, match="at least 3 layers"):
    decode.generate(TARGET, [[1, 2]], max_new_tokens=4,
                    drafter=registry.DRAFTERS.build("swift", TARGET))
  with pytest.raises(ValueError, match="Llama-family"):
    registry.DRAFTERS.build("swift", tiny(arch="gpt2"))


def test_del_picks_the_exit_with_the_most_tokens_per_layer():
  """`choose` maximises the paper's TPL(l, d) over exit layers and lengths (d = 0: AR)."""
  d = registry.DRAFTERS.build("del", DEEP, exit_layers=(1, 2, 3), depth=6)
  for alpha in ([0.0, 0.0, 0.0], [0.95, 0.2, 0.3], [0.3, 0.99, 0.999], [0.5, 0.6, 0.7]):
    a = np.asarray(alpha)
    tpl = [[(1 - a[e] ** (n + 1)) / (1 - a[e]) / (n * layer + 4) for n in range(7)]
           for e, layer in enumerate((1, 2, 3))]
    e, n = np.unravel_index(np.argmax(tpl), (3, 7))
    layer, length = d.choose(jnp.asarray(a, jnp.float32))
    assert (int(layer), int(length)) == ((1, 2, 3)[e], n), alpha
  assert int(d.choose(jnp.zeros(3))[1]) == 0  # no exit predicts anything: AR steps


def test_del_learns_the_exit_that_equals_the_target():
  """Layers 2-3 of this target add nothing (zero output projections), so exiting after
  layer 2 is the target itself: its shadow tokens are always right, DEL drafts from it,
  and every draft is accepted. Output equals AR either way."""
  zero = {"self_attn": ("o_proj",), "mlp": ("down_proj",)}
  params = jax.tree.map(lambda x: x, DEEP.params)
  for i in (2, 3):
    for block, names in zero.items():
      for name in names:
        params[f"layers_{i}"][block][name]["kernel"] *= 0
  shallow = DEEP.__class__(DEEP.config, params)
  want = gen(shallow, BATCH, max_new_tokens=24, eos=None).token_lists()
  d = registry.DRAFTERS.build("del", shallow, exit_layers=(1, 2), depth=4, decay=0.5)
  out = gen(shallow, BATCH, max_new_tokens=24, eos=None, drafter=d)
  assert out.token_lists() == want
  assert (np.asarray(out.stats.gained).max(1) == 5).all()
  assert (out.tau > 2.5).all()
  noisy = registry.DRAFTERS.build("del", DEEP, exit_layers=(1, 2), depth=4)
  assert gen(DEEP, BATCH, max_new_tokens=24, eos=None, drafter=noisy).token_lists() == \
      gen(DEEP, BATCH, max_new_tokens=24, eos=None).token_lists()
