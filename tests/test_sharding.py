"""specjax on device meshes (8 forced CPU devices, see conftest): sharded loading, greedy
decoding and training equal their single-device results; checkpoints move between
meshes; two real processes train and decode over jax.distributed; bad meshes and rules
fail before compiling; 7B / 70B Llama layouts fit a TPU chip."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from specjax import decode, models, registry, sharding
from specjax.configs import eagle as eagle_config
from specjax.drafters import load_drafter
from specjax.evaluation import layouts
from specjax.training import metrics, trainer

import doubles

TARGET = "tiny-random-8h"  # 8 query heads, 4 KV heads: tensor=8 keeps the cache's heads whole
# Two meshes in `make test`, all four in `make test-slow`.
MESHES = ["data=8", pytest.param("tensor=8", marks=pytest.mark.slow), "data=2,tensor=4",
          pytest.param("data=2,fsdp=2,tensor=2", marks=pytest.mark.slow)]
WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def tiny_config(mesh: str = "", steps: int = 6):
  c = eagle_config.get_config("tiny")
  c.target = TARGET
  c.steps, c.eval_every, c.log_every, c.checkpoint_every = steps, 3, 3, 3
  c.mesh = mesh
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of the same tiny EAGLE run on one device and on a data x fsdp x tensor mesh."""
  out = {}
  for name, mesh in (("single", ""), ("mesh", "data=2,fsdp=2,tensor=2")):
    out[name] = str(tmp_path_factory.mktemp(name))
    trainer.train(tiny_config(mesh), out[name])
  return out


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _head_params(workdir):
  from specjax.drafters import io  # pylint: disable=g-import-not-at-top
  return io.load(os.path.join(workdir, trainer.HEAD_DIR), models.RANDOM[TARGET])[2]


# ---- meshes and rules ---------------------------------------------------------------------


def test_mesh_must_match_the_devices():
  assert dict(sharding.make_mesh("data=2,tensor=-1").shape) == {"data": 2, "tensor": 4}
  with pytest.raises(sharding.ShardingError, match="needs 3 devices; there are 8"):
    sharding.make_mesh("data=3")
  with pytest.raises(sharding.ShardingError, match="needs 16 devices"):
    sharding.make_mesh("data=4,tensor=4")
  with pytest.raises(sharding.ShardingError, match="distinct names"):
    sharding.make_mesh("data=2,model=4")
  with pytest.raises(sharding.ShardingError, match="name=size"):
    sharding.make_mesh("data")


def test_axes_that_do_not_divide_fail_before_compiling():
  plan = sharding.Plan.create("data=1,tensor=8")
  # tiny-random: 4 heads x 16 = 64 columns split 8 ways is fine, but a vocabulary of 500 is not.
  cfg = models.RANDOM["tiny-random"].replace(vocab_size=500)
  abstract = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
  with pytest.raises(sharding.ShardingError,
                     match=r"'embed_tokens/embedding' has shape \(500, 64\): dimension 0 "
                           r"\('vocab', size 500\) does not split over mesh axes 'tensor'"):
    plan.param_shardings(abstract)
  # Rules can move the vocabulary elsewhere (here: unsharded).
  ok = sharding.Plan.create("data=1,tensor=8", [("vocab", None), ("heads", "tensor"),
                                                ("mlp", "tensor"), ("kv_heads", "tensor")])
  assert ok.param_shardings(abstract)["embed_tokens"]["embedding"].spec == P(None, None)
  with pytest.raises(sharding.ShardingError, match="batch_size"):
    trainer.train(_with(tiny_config("data=8"), batch_size=4), "/nonexistent/never-written")
  with pytest.raises(sharding.ShardingError, match="names mesh axis 'model'"):
    sharding.Plan.create("data=8", [("batch", "model")])


def _with(c, **kw):
  for k, v in kw.items():
    c[k] = v
  return c


def test_param_and_cache_layouts():
  plan = sharding.Plan.create("data=2,fsdp=2,tensor=2")
  model = models.load(TARGET, plan=plan)
  attn = model.params["layers_0"]["self_attn"]
  assert attn["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert attn["o_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
  assert model.params["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert model.params["norm"]["scale"].sharding.spec == P(None)
  cache = jax.eval_shape(lambda: model.init_cache(4, 64))
  assert plan.cache_shardings(cache).k[0].spec == P(("data", "fsdp"), "tensor", None, None)
  # 4 KV heads do not split 8 ways: the cache keeps them whole, the batch still splits.
  wide = sharding.Plan.create("data=1,tensor=8")
  assert wide.cache_shardings(cache).k[0].spec == P("data", None, None, None)


def test_loading_places_each_weight_slice_by_slice(tmp_path):
  """A Hugging Face folder read with a plan: each device holds exactly its slice of the
  (transposed) weight, equal to the unsharded load."""
  path = doubles.write_tiny_llama(str(tmp_path / "hf"), tokenizer=False, num_attention_heads=8,
                                  num_key_value_heads=4, hidden_size=64)
  plan = sharding.Plan.create("fsdp=2,tensor=4")
  ref, placed = models.load(path), models.load(path, plan=plan)
  for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(placed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  w = placed.params["layers_1"]["mlp"]["down_proj"]["kernel"]  # [mlp, embed]
  assert w.sharding.spec == P("tensor", "fsdp")
  for shard in w.addressable_shards:
    assert shard.data.shape == (w.shape[0] // 4, w.shape[1] // 2)
    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(w)[shard.index])


# ---- decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_greedy_generate_equals_single_device(mesh, runs):
  single = models.load(TARGET)
  plan = sharding.Plan.create(mesh)
  target = models.load(TARGET, plan=plan)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 512, n).tolist() for n in (5, 40, 1)]  # ragged; 3 rows pad
  for drafter_of in (lambda t: None,
                     lambda t: load_drafter(os.path.join(runs["mesh"], trainer.HEAD_DIR), t)):
    ref = decode.generate(single, prompts, max_new_tokens=16, eos=None,
                          drafter=drafter_of(single))
    out = decode.generate(target, prompts, max_new_tokens=16, eos=None,
                          drafter=drafter_of(target), plan=plan)
    assert out.token_lists() == ref.token_lists()
    np.testing.assert_array_equal(out.stats.target_calls, ref.stats.target_calls)
  # The target really is placed across the mesh (the cache layout: test_param_and_cache_layouts).
  assert len(target.params["embed_tokens"]["embedding"].sharding.device_set) == 8


@pytest.mark.parametrize("name,knobs", [("pearl", {"gamma": 3}),
                                        ("easyspec", {"depth": 3, "group": 2}),
                                        ("mirror", {"gamma": 3, "kappa": 2})])
def test_parallel_drafters_on_a_mesh_of_8_devices_equal_ar(name, knobs):
  """PEARL, EasySpec and Mirror SD (draft and target on one mesh, batch and tensor axes;
  Mirror's branch rows split over the batch axis)."""
  plan = sharding.Plan.create("data=2,tensor=4")
  single, target = models.load(TARGET), models.load(TARGET, plan=plan)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 512, n).tolist() for n in (7, 30, 2, 12)]
  want = decode.generate(single, prompts, max_new_tokens=12, eos=None).token_lists()
  d = registry.DRAFTERS.build(name, target, layers=1, **knobs)
  out = decode.generate(target, prompts, max_new_tokens=12, eos=None, drafter=d, plan=plan)
  assert out.token_lists() == want


# ---- training ------------------------------------------------------------------------------


def test_sharded_training_matches_single_device(runs):
  """Same losses and the same updates (the exported head after 6 steps)."""
  rows = {k: [r for r in metrics.read(os.path.join(w, metrics.METRICS))] for k, w in runs.items()}
  assert [r["step"] for r in rows["single"]] == [r["step"] for r in rows["mesh"]]
  for a, b in zip(rows["single"], rows["mesh"]):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  for a, b in zip(_leaves(_head_params(runs["single"])), _leaves(_head_params(runs["mesh"]))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoint_restores_onto_another_mesh(runs, tmp_path):
  """The mesh run's step-3 checkpoint, resumed on a 4 x 2 mesh, ends where it did."""
  work = str(tmp_path / "resumed")
  shutil.copytree(runs["mesh"], work)
  shutil.rmtree(os.path.join(work, "checkpoints", "6"))
  shutil.rmtree(os.path.join(work, trainer.HEAD_DIR))
  last = trainer.train(tiny_config("data=4,tensor=2"), work)
  ref = [r for r in metrics.read(os.path.join(runs["mesh"], metrics.METRICS))
         if r["split"] == "eval"][-1]
  np.testing.assert_allclose(last["loss"], ref["loss"], rtol=1e-5)
  for a, b in zip(_leaves(_head_params(work)), _leaves(_head_params(runs["mesh"]))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_decode(runs, tmp_path):
  """Two processes on localhost (4 CPU devices each, one 8-device mesh) train the tiny
  run, each feeding its own half of every batch, then decode, each its own prompts:
  the same losses as one process, and each process gets the tokens of its prompts."""
  port, work = _free_port(), str(tmp_path / "two")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
         "JAX_NUM_PROCESSES": "2"}
  procs = [subprocess.Popen([sys.executable, WORKER, work, "data=2,fsdp=2,tensor=2",
                             os.path.join(runs["mesh"], trainer.HEAD_DIR)],
                            env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  assert [o["process"] for o in outs] == [0, 1] and all(o["devices"] == 8 for o in outs)
  ref = [r for r in metrics.read(os.path.join(runs["mesh"], metrics.METRICS))]
  got = metrics.read(os.path.join(work, metrics.METRICS))  # written by process 0 only
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5)
  single = models.load(TARGET)
  drafter = load_drafter(os.path.join(runs["mesh"], trainer.HEAD_DIR), single)
  for o in outs:
    want = decode.generate(single, o["prompts"], max_new_tokens=12, eos=None, drafter=drafter)
    assert o["tokens"] == want.token_lists()


# ---- large layouts -------------------------------------------------------------------------


def test_7b_and_70b_fit_a_tpu_chip_on_256_devices():
  """Per-device bytes of bf16 params + KV cache from `jax.eval_shape` and the rules on an
  abstract 256-device mesh (no allocation)."""
  rows = {r["model"]: r for r in layouts.table()}
  for name, hbm in (("llama2-7b", 16 * 2**30), ("llama3-70b", 16 * 2**30)):
    r = rows[name]
    assert r["devices"] == 256 and 0 < r["param_bytes"] + r["cache_bytes"] < hbm, r
  # 131 GiB of 70B params would not fit one chip; fsdp x tensor = 32 splits every matrix
  # (only norm scales, 0.1% of the bytes, are replicated).
  r = rows["llama3-70b"]
  assert r["total_param_bytes"] > 100 * 2**30
  assert r["total_param_bytes"] / 32 <= r["param_bytes"] < 1.001 * r["total_param_bytes"] / 32


def test_pearl_on_disjoint_device_groups_equals_ar():
  """PEARL's target on devices 0-3 (tensor=4) and its draft on devices 4-7: two programs
  a step, each on its own group; greedy output equals single-device AR and PEARL in one
  program, and each model's weights live only on its own group."""
  from specjax.drafters.selfdraft import pearl  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  plan_t = sharding.Plan.create(sharding.make_mesh("tensor=4", devices[:4]))
  plan_d = sharding.Plan.create(sharding.make_mesh("tensor=4", devices[4:]))
  single = models.load(TARGET)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 512, n).tolist() for n in (7, 30, 2)]
  want = decode.generate(single, prompts, max_new_tokens=12, eos=None).token_lists()
  d = registry.DRAFTERS.build("pearl", single, layers=1, gamma=3)
  one = decode.generate(single, prompts, max_new_tokens=12, eos=None, drafter=d)
  out = pearl.generate_on_groups(single, d, prompts, target_plan=plan_t, draft_plan=plan_d,
                                 max_new_tokens=12)
  assert out.token_lists() == want == one.token_lists()
  np.testing.assert_array_equal(out.stats.target_calls, one.stats.target_calls)
  placed_t = decode._place_tree(plan_t, single.params)  # pylint: disable=protected-access
  placed_d = decode._place_tree(plan_d, d.params)  # pylint: disable=protected-access
  groups = lambda tree: {frozenset(x.sharding.device_set) for x in jax.tree.leaves(tree)}
  assert groups(placed_t) == {frozenset(devices[:4])}
  assert groups(placed_d) == {frozenset(devices[4:])}
  assert out.tokens.sharding.device_set == set(devices[:4])
