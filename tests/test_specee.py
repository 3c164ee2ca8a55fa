"""SpecEE: the early-exiting forward, its exit rule, its predictors' training, and that it
is refused where it is not defined (sampling) and labelled LOSSY where it runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.configs import specee as specee_config
from specjax.evaluation import sweep
from specjax import decode, models, registry
from specjax.drafters import EagleHead, io
from specjax.drafters.selfdraft import specee
from specjax.models import Model, ModelConfig, init_params, shared_params
from specjax.models import skip as skip_lib
from specjax.models.model import causal, forward
from specjax.training import specee as specee_training

V, LAYERS, K = 16, 4, 4


def _shallow_target(seed=0):
  """A 4-layer target whose layers 2 and 3 add nothing (zero output projections): leaving
  after layer 1 gives the full model's token, leaving after layer 0 often does not."""
  cfg = ModelConfig(arch="llama", vocab_size=V, hidden_size=32, intermediate_size=64,
                    num_layers=LAYERS, num_heads=4, num_kv_heads=2, head_dim=8,
                    max_position_embeddings=256)
  params = init_params(cfg, jax.random.key(seed))
  for i in (2, 3):
    params[f"layers_{i}"]["self_attn"]["o_proj"]["kernel"] *= 0
    params[f"layers_{i}"]["mlp"]["down_proj"]["kernel"] *= 0
  return Model(cfg, params)


TARGET = _shallow_target()
HEAD = EagleHead(TARGET.config)
HEAD_PARAMS = HEAD.init(jax.random.key(1))
PROMPTS = [[3], [1, 4, 1, 5, 9, 2, 6, 5, 3, 5] * 7]  # 1 token and more than a prefill chunk


def _inner():
  return HEAD.drafter(HEAD_PARAMS, shared_params(TARGET.config, TARGET.params), depth=1,
                      top_k=K)


def _always(bias: float):
  """Predictors that always (bias > 0) or never (< 0) fire."""
  p = specee.init_predictors(jax.random.key(2), LAYERS - 1, K)
  return dict(p, w2=p["w2"] * 0, b2=jnp.full_like(p["b2"], bias))


def test_exiting_forward_exits_per_row_and_fills_the_cache_above_the_exit():
  """Row 0 leaves after layer 1, row 1 runs the full depth: their logits are layer 1's
  and the full model's, and row 0's slots in layers 2-3 hold those layers' keys/values of
  its exit state, the same whether row 1 still ran those layers or not."""
  cfg, params = TARGET.config, TARGET.params
  tokens = jnp.asarray([[5, 7, 2], [4, 4, 9]], jnp.int32)
  full = forward(cfg, params, tokens, jnp.broadcast_to(jnp.arange(3), (2, 3)), causal(3),
                 features=(2,))
  cache = models.KVCache.for_config(cfg, 2, 8, jnp.float32)
  cache = forward(cfg, params, tokens[:, :2], jnp.broadcast_to(jnp.arange(2), (2, 2)),
                  causal(2), cache).cache.advance(jnp.full((2,), 2, jnp.int32))

  def run(leaving):
    def decide(layer, x, live, c):
      leave = jnp.asarray(leaving) & (layer == 1)
      return leave, skip_lib.exit_logits(cfg, params, x), c
    return skip_lib.forward_exiting(cfg, params, tokens[:, 2:], jnp.full((2, 1), 2),
                                    causal(1), cache, decide, ())

  full_cache = forward(cfg, params, tokens, jnp.broadcast_to(jnp.arange(3), (2, 3)),
                       causal(3), models.KVCache.for_config(cfg, 2, 8, jnp.float32)).cache
  out, ran = run([True, False])
  np.testing.assert_array_equal(ran, [2, LAYERS])
  x1 = full.features[0][:, 2:]  # the output of layer 1 at the new token
  np.testing.assert_allclose(out.logits[0], skip_lib.exit_logits(cfg, params, x1)[0],
                             atol=1e-5)
  np.testing.assert_allclose(out.logits[1], full.logits[1, 2:], atol=1e-5)
  both, ran_both = run([True, True])  # every row left: layers 2-3 only project keys/values
  np.testing.assert_array_equal(ran_both, [2, 2])
  for i in (2, 3):
    np.testing.assert_allclose(out.cache.k[i][0, :, 2], both.cache.k[i][0, :, 2], atol=1e-5)
    np.testing.assert_allclose(out.cache.v[i][0, :, 2], both.cache.v[i][0, :, 2], atol=1e-5)
    # Layers 2-3 add nothing here, so the exit state is their input in the full forward:
    # the propagated keys/values are the full forward's.
    np.testing.assert_allclose(out.cache.k[i][0, :, 2], full_cache.k[i][0, :, 2], atol=1e-5)
    np.testing.assert_allclose(out.cache.v[i][0, :, 2], full_cache.v[i][0, :, 2], atol=1e-5)
  assert np.abs(np.asarray(both.cache.k[3][0, :, 2])).sum() > 0


def test_an_exit_needs_the_layer_argmax_among_the_candidates():
  """Predictors that never fire run every layer (output = AR); predictors that always fire
  leave wherever the early argmax is a candidate: fewer layers, and here (layers 2-3 add
  nothing, layer 0 is checked too) output that may differ from AR's."""
  ar = decode.generate(TARGET, PROMPTS, max_new_tokens=12, eos=None)
  never = specee.create(TARGET, _inner(), _always(-50.0), static=(0, 1, 2))
  out = decode.generate(TARGET, PROMPTS, max_new_tokens=12, eos=None, drafter=never)
  assert out.token_lists() == ar.token_lists()
  np.testing.assert_array_equal(out.drafter_state.layers, 12 * LAYERS)
  # Only layer 1 scheduled (its +-2 neighbours are layer 3, which never exits, and -1):
  # every exit is exact, so the output is AR's with fewer layers run.
  at_one = specee.create(TARGET, _inner(), _always(50.0), static=(1,))
  out = decode.generate(TARGET, PROMPTS, max_new_tokens=12, eos=None, drafter=at_one)
  assert out.token_lists() == ar.token_lists()
  layers = np.asarray(out.drafter_state.layers)
  assert layers.sum() < 2 * 12 * LAYERS, layers  # (each row exits when the random head's
  # candidates hold the token: row 0 here, not row 1's repeated tokens)
  # The history carries to the next call (a hot start): it then schedules from the exits.
  warm = at_one.carry(out)
  assert int(warm.past_count) == 12 and set(np.asarray(warm.past).tolist()) <= {1, 3}
  compiled = decode._generate._cache_size()  # pylint: disable=protected-access
  hot = decode.generate(TARGET, PROMPTS, max_new_tokens=12, eos=None, drafter=warm)
  assert hot.token_lists() == ar.token_lists()
  assert decode._generate._cache_size() == compiled  # pylint: disable=protected-access


def test_trained_predictors_exit_where_it_is_exact(tmp_path):
  """Trained on the target's own greedy rows, the predictors learn that layer 1 is exact
  and layer 0 is not; the oracle's static layer is layer 1, and decoding with them equals
  AR while running fewer layers."""
  rows = decode.generate(TARGET, [[i % V, (3 * i) % V] for i in range(24)],
                         max_new_tokens=30, eos=None)
  tokens = np.concatenate([np.asarray([[i % V, (3 * i) % V] for i in range(24)]),
                           np.asarray(rows.tokens)], 1).astype(np.int32)
  mask = np.zeros(tokens.shape, np.float32)
  mask[:, 2:] = 1
  data = specee_training.collect(TARGET, HEAD, HEAD_PARAMS, tokens, mask, str(tmp_path),
                                 candidates=K, batch_size=24)
  assert data["x"].shape[1:] == (LAYERS - 1, 3 * K)
  assert data["label"][:, 1:].all()  # layers 1 and 2 are exact
  assert not data["label"][:, 0].all()
  params, _ = specee_training.fit(data["x"], data["label"], steps=300, lr=3e-3)
  p = specee_training.scores(params, data["x"])
  assert p[:, 1].mean() > 0.9 and p[:, 0].mean() < p[:, 1].mean()
  static = specee_training.oracle_layers(data, 1)
  assert static == (1,), static
  sim = specee_training.simulate(p, data, static, threshold=0.5)
  assert sim["equal_to_full"] == 1.0 and sim["mean_layers"] < LAYERS
  d = specee.create(TARGET, _inner(), params, static=static)
  out = decode.generate(TARGET, PROMPTS, max_new_tokens=12, eos=None, drafter=d)
  ar = decode.generate(TARGET, PROMPTS, max_new_tokens=12, eos=None)
  assert out.token_lists() == ar.token_lists()
  assert np.asarray(out.drafter_state.layers).sum() < 2 * 12 * LAYERS


def test_config_run_writes_predictors_the_registry_builds(tmp_path):
  """configs/specee.py:tiny=1 end to end: examples, fit, metrics, the predictor folder
  (with its head's folder relative to it), and `drafter="specee"` decoding greedily."""
  target = models.load("tiny-random")
  head = EagleHead(target.config)
  io.save(str(tmp_path / "head"), "eagle", {}, head.init(jax.random.key(0)), target.config)
  c = specee_config.get_config("tiny=1")
  c.head = str(tmp_path / "head")
  metrics = specee_training.train(c, str(tmp_path / "run"))
  assert metrics["train_examples"] > 500 and len(metrics["static"]) == 1
  for sim in metrics["simulated"].values():
    assert 0 <= sim["exit_rate"] <= 1 and 1 <= sim["mean_layers"] <= 2
  d = registry.DRAFTERS.build("specee", target, checkpoint=str(tmp_path / "run" / "predictor"))
  out = decode.generate(target, [[1, 2, 3]], max_new_tokens=5, eos=None, drafter=d)
  assert int(out.lengths[0]) == 5
  with pytest.raises(ValueError, match="greedy decoding only"):
    decode.generate(target, [[1, 2, 3]], max_new_tokens=5, temperature=1.0, drafter=d)


def test_specee_is_refused_where_undefined_and_labelled_lossy(tmp_path):
  with pytest.raises(ValueError, match="greedy decoding only"):
    registry.check_combination(takes_stop_policy=False, has_stop=False, rule=None,
                               temperatures=[0.0, 1.0], greedy_only=True)
  m = sweep.Method("specee", drafter="specee", drafter_kwargs={"checkpoint": "x"})
  assert m.lossy
  assert not sweep.Method("suffix", drafter="suffix").lossy
  wrong = specee.create(TARGET, _inner(), specee.init_predictors(jax.random.key(0), 2, K),
                        static=(1,))
  with pytest.raises(ValueError, match="need 3 exit layers"):
    wrong.validate(TARGET.config)
  with pytest.raises(ValueError, match="static exit layers"):
    specee.create(TARGET, _inner(), _always(1.0), static=(3,))
  with pytest.raises(ValueError, match="threshold is a probability"):
    specee.create(TARGET, _inner(), _always(1.0), static=(1,), threshold=1.5)
  with pytest.raises(FileNotFoundError, match="No SpecEE predictors"):
    specee.load(str(tmp_path))
