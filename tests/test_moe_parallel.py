"""The expert-parallel routed MoE (`models.moe_parallel`) with speculative token shuffling
(`moe_shuffle`) and expert grouping (`moe_grouping`) on 8 forced host devices: exact
against the dense form whatever the placement, capacity or grouping; its dispatch counts
and the compiled program's all-to-all bytes match what the shapes say; greedy speculative
decoding equals single-device AR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import decode, models, sharding
from specjax.drafters import DraftModel
from specjax.models import model as model_lib
from specjax.models import moe_grouping, moe_parallel, moe_shuffle
from specjax.models.moe_parallel import Routed

VOCAB = 96
# A dense layer among routed ones, weights not renormalised (Qwen3-MoE's options).
CFG = models.ModelConfig("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=24,
                         num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                         num_experts=8, experts_per_token=2, moe_intermediate_size=16,
                         moe_layers=(0, 2), moe_norm_topk=False, max_position_embeddings=256)
MESH = "data=2,expert=4"


@pytest.fixture(scope="module")
def model():
  return models.Model(CFG, models.init_params(CFG, jax.random.key(0)), name="tiny-moe")


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, 16)))


def _forward(params, tokens, plan):
  """(logits, sown intermediates) of a causal forward under `plan`, jitted for it."""
  b, t = tokens.shape

  def f(p, tok):
    out, state = model_lib.module(CFG).apply(
        {"params": p}, tok, jnp.broadcast_to(jnp.arange(t), (b, t)), model_lib.causal(t),
        None, mutable=["intermediates"])
    return out[0], state["intermediates"]

  with sharding.use(plan):
    fn = jax.jit(f)
    placed = params if plan is None else jax.device_put(params, plan.param_shardings(params))
    logits, inter = fn(placed, tokens)
    hlo = None if plan is None else fn.lower(placed, tokens).compile().as_text()
  return np.asarray(logits), inter, hlo


@pytest.fixture(scope="module")
def dense(model, tokens):
  return _forward(model.params, tokens, None)


@pytest.fixture(scope="module")
def routed(model, tokens):
  """Forwards under each routed setting: {name: (logits, per-layer stats, hlo)}."""
  settings = {"plain": Routed(), "gate": Routed(shuffle="gate"),
              "previous": Routed(shuffle="previous"),
              "gate_small": Routed(capacity_factor=0.25, shuffle="gate"),
              "drop_small": Routed(capacity_factor=0.25, overflow="drop")}
  out = {}
  for name, opts in settings.items():
    logits, inter, hlo = _forward(model.params, tokens, sharding.Plan.create(MESH, moe=opts))
    out[name] = (logits, moe_parallel.dispatch_stats(inter), hlo)
  return out


def _devices_touched(routing_NxK, devices=4, experts=8):
  """Per token, how many devices hold its experts (numpy, from the sown routing)."""
  return np.array([len({int(e) // (experts // devices) for e in row}) for row in routing_NxK])


def test_routed_equals_dense_whatever_the_placement_and_capacity(dense, routed):
  want = dense[0]
  assert want.std() > 0.3
  for name in ("plain", "gate", "previous", "gate_small"):
    logits, stats, _ = routed[name]
    assert np.abs(logits - want).max() <= 1e-5, name
    assert [s["layer"] for s in stats] == [0, 2]
    assert all(s["dropped_rows"] == 0 and s["tokens"] == 64 for s in stats), name
  # A quarter of the capacity overflows: the exact path sends the rest in a second round,
  # the dropping one loses them (counted) and the logits move.
  small = routed["gate_small"][1]
  assert all(s["capacity"] == 2 and s["per_device"] == 8 for s in small)
  assert sum(s["overflow_rows"] for s in small) > 0
  logits, stats, _ = routed["drop_small"]
  assert sum(s["dropped_rows"] for s in stats) > 0
  assert np.abs(logits - want).max() > 1e-2


def test_dispatch_counts_follow_the_routing_and_shuffling_keeps_rows_local(dense, routed):
  """Each token has one row per device holding its experts (de-duplicated): local +
  remote rows equal that count from the routing, whatever the placement; placing tokens
  on their gate's device keeps more rows local."""
  inter = dense[1]
  for name in ("plain", "gate", "previous"):
    for s in routed[name][1]:
      touched = _devices_touched(np.asarray(inter[f"layers_{s['layer']}"]["mlp"]["routing"][0]))
      assert s["local_rows"] + s["remote_rows"] == touched.sum(), (name, s)
  remote = {n: sum(s["remote_rows"] for s in routed[n][1]) for n in ("plain", "gate")}
  assert remote["gate"] < remote["plain"], remote
  # "previous" has no prediction for the first MoE layer: the plain placement there.
  assert routed["previous"][1][0]["remote_rows"] == routed["plain"][1][0]["remote_rows"]


def test_compiled_all_to_all_bytes_match_the_capacity(routed):
  """Per device and MoE layer: x [D, C, H] and weights [D, C, E/D] out, results [D, C, H]
  back (float32); the overflow round (C = L) only inside a conditional."""
  d, h, el, layers = 4, 32, 2, 2
  per_layer = lambda c: 4 * d * c * (2 * h + el)
  full = moe_parallel.collective_bytes(routed["gate"][2])["all-to-all"]
  assert full == {"main": layers * per_layer(8), "conditional": 0}
  small = moe_parallel.collective_bytes(routed["gate_small"][2])["all-to-all"]
  assert small == {"main": layers * per_layer(2), "conditional": layers * per_layer(8)}
  dropping = moe_parallel.collective_bytes(routed["drop_small"][2])["all-to-all"]
  assert dropping == {"main": layers * per_layer(2), "conditional": 0}


def test_balanced_placement_fills_every_device_and_honours_preferences():
  """12 tokens over 4 devices of 3 slots: device 2 is over-asked; token 3 falls back to
  its second device, token 7 (second device full) and token 5 (none) fill the free slots
  interleaved over the devices."""
  first = [2, 2, 2, 2, 0, -1, 1, 2, 0, 3, 3, 3]
  second = [-1, -1, -1, 1, -1, -1, -1, 3, -1, -1, -1, -1]
  slots = np.asarray(moe_shuffle.balanced_placement(jnp.array([first, second]).T, 4))
  assert sorted(slots) == list(range(12))
  on = {int(t): s // 3 for s, t in enumerate(slots)}
  assert [on[t] for t in (0, 1, 2, 4, 6, 8, 9, 10, 11)] == [2, 2, 2, 0, 1, 0, 3, 3, 3]
  assert on[3] == 1 and on[5] == 0 and on[7] == 1
  # No preference at all: round-robin over the devices, not contiguous shares.
  none = np.asarray(moe_shuffle.balanced_placement(jnp.full((8, 2), -1), 4))
  assert list(none) == [0, 4, 1, 5, 2, 6, 3, 7]
  routing = jnp.array([[0, 5], [6, 7], [2, 3]])  # 8 experts on 4 devices
  weights = jnp.array([[0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
  assert np.asarray(moe_shuffle.preferred_devices(routing, weights, 8, 4)).tolist() == [
      [2, 0], [3, -1], [1, -1]]


def test_expert_grouping_is_exact_and_groups_experts_picked_together(model, dense, tokens):
  calib = np.random.default_rng(1).integers(0, VOCAB, (8, 32))
  grouped, perms = moe_grouping.grouped(model, calib, 4)
  assert set(perms) == {0, 2}
  for i, perm in perms.items():
    assert sorted(perm) == list(range(8))
    # The grouping's score (co-occurrence inside groups less the load penalty) beats
    # the identity's; without the penalty, co-occurrence inside groups alone does.
    co = moe_grouping.co_occurrence(moe_grouping.routing(model, calib)[i], 8)
    on_device = lambda p: np.argsort(p) // 2  # the device of each old expert
    base = np.arange(8) // 2
    assert (moe_grouping.score(co, on_device(perm), 4) >
            moe_grouping.score(co, base, 4))
    pairs_only = moe_grouping.group(co, 4, balance=0.0)
    assert (moe_grouping.score(co, on_device(pairs_only), 4, 0.0) >
            moe_grouping.score(co, base, 4, 0.0))
  got = np.asarray(model_lib.causal_forward(CFG, grouped.params, tokens).logits)
  assert np.abs(got - dense[0]).max() <= 1e-5
  with pytest.raises(ValueError, match="do not split"):
    moe_grouping.grouped(model, calib, 3)


def test_routed_greedy_speculative_decoding_equals_ar(model):
  """Grouped experts, gate shuffling and half capacity (exact overflow) on data=2,expert=4,
  with a draft; previous-layer shuffling on expert=8 (one expert a device), AR."""
  prompts = [list(np.random.default_rng(i).integers(0, VOCAB, n)) for i, n in
             enumerate((5, 30, 2, 12))]
  want = decode.generate(model, prompts, max_new_tokens=10, eos=None).token_lists()
  calib = np.random.default_rng(1).integers(0, VOCAB, (8, 32))
  grouped, _ = moe_grouping.grouped(model, calib, 4)
  plan = sharding.Plan.create(MESH, moe=Routed(capacity_factor=0.5, shuffle="gate"))
  target = models.Model(CFG, jax.device_put(grouped.params,
                                            plan.param_shardings(grouped.params)))
  out = decode.generate(target, prompts, max_new_tokens=10, eos=None, plan=plan,
                        drafter=DraftModel.truncated(target, 1, depth=3))
  assert out.token_lists() == want
  plan8 = sharding.Plan.create("expert=8", moe=Routed(shuffle="previous"))
  out = decode.generate(model, prompts, max_new_tokens=10, eos=None, plan=plan8)
  assert out.token_lists() == want


def test_bad_routed_settings_fail_before_compiling(model, tokens):
  with pytest.raises(ValueError, match="shuffle 'random'"):
    Routed(shuffle="random")
  with pytest.raises(ValueError, match="capacity_factor must be in"):
    Routed(capacity_factor=0.0)
  with pytest.raises(ValueError, match="overflow"):
    Routed(overflow="retry")
  with pytest.raises(ValueError, match="experts on exactly one mesh axis"):
    jax.eval_shape(lambda p: _trace(p, tokens, sharding.Plan.create("data=8", moe=Routed())),
                   model.params)
  six = CFG.replace(num_experts=6)
  with pytest.raises(ValueError, match="6 experts do not split over mesh axis 'expert'"):
    jax.eval_shape(lambda p: _trace(p, tokens, sharding.Plan.create("data=2,expert=4",
                                                                   moe=Routed()), six),
                   jax.eval_shape(lambda: models.init_params(six, jax.random.key(0))))
  rules = dict(sharding.DEFAULT_RULES, batch=("data", "expert"))
  with pytest.raises(ValueError, match="which the batch splits over"):
    jax.eval_shape(lambda p: _trace(p, tokens, sharding.Plan.create(
        MESH, tuple(rules.items()), moe=Routed())), model.params)


def _trace(params, tokens, plan, cfg=CFG):
  b, t = tokens.shape
  with sharding.use(plan):
    return model_lib.forward(cfg, params, tokens, jnp.broadcast_to(jnp.arange(t), (b, t)),
                             model_lib.causal(t)).logits
