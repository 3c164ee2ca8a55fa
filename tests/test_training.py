"""specjax-train and the trainable heads (EAGLE-1, EAGLE-3, Falcon, Hydra, Hydra++, Medusa-1,
DFlash, DSpark, EAGLE-1 with FSPAD's options, an independent draft LM, PPD's prompt tokens)
on the tiny random target.

Loss falls; a SIGKILLed run resumes onto the uninterrupted curve; no gradient reaches the
target; trained heads decode exactly as AR (greedy, ragged batch); the drafter's cached
drafting matches a cache-free reference (no train/serve mismatch); 7B shapes check out
without allocating; bad input fails early with a clear message.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from specjax import decode, models, registry
from specjax.configs import dflash as dflash_config
from specjax.configs import dspark as dspark_config
from specjax.configs import eagle as eagle_config
from specjax.configs import eagle3 as eagle3_config
from specjax.configs import falcon as falcon_config
from specjax.configs import fastdraft as fastdraft_config
from specjax.configs import hydra as hydra_config
from specjax.configs import longspec as longspec_config
from specjax.configs import medusa as medusa_config
from specjax.configs import ppd as ppd_config
from specjax.drafters import (Eagle3Head, EagleHead, FalconHead, HydraHead, MedusaHead, io,
                              load_drafter)
from specjax.drafters.heads import dflash, eagle, falcon, medusa
from specjax.drafters.base import Context, TargetBatch
from specjax.models import ModelConfig, causal, causal_forward, shared_params
from specjax.sampling import Sampling
from specjax.stopping import get as get_stop
from specjax.verify import Verdict
from specjax.training import data as data_lib
from specjax.training import metrics, trainer

# kind -> (config file, its tiny argument)
CONFIGS = {"eagle": (eagle_config, "tiny"), "eagle3": (eagle3_config, "tiny"),
           "hydra": (hydra_config, "tiny"), "hydrapp": (hydra_config, "plus_tiny"),
           "medusa": (medusa_config, "tiny"), "falcon": (falcon_config, "tiny"),
           "dflash": (dflash_config, "tiny"), "dspark": (dspark_config, "tiny"),
           "fspad": (eagle_config, "fspad_tiny"),
           "draft_lm": (fastdraft_config, "pretrain_tiny"), "ppd": (ppd_config, "tiny"),
           "longspec": (longspec_config, "tiny")}
KINDS = list(CONFIGS)
# LongSpec's residual stream starts at the token's embedding, which the tiny target's tied
# LM head maps back to the same token, the tiny target's own argmax ~94% of the time: its
# top-1 starts at that ceiling (its loss must still fall).
TOP1_AT_START = {"longspec"}
BIN = os.path.join(os.path.dirname(sys.executable), "specjax-train")


def tiny_config(kind, **overrides):
  module, arg = CONFIGS[kind]
  c = module.get_config(arg)
  for k, v in overrides.items():
    c[k] = v
  return c


def run_dir(kind, tmp_path_factory=None):
  """The workdir of a finished tiny run of `kind` (trained once per test run)."""
  del tmp_path_factory
  return conftest.shared_run(f"train-{kind}", lambda w: trainer.train(tiny_config(kind), w))


def fitted_eagle3(target):
  """The tiny config's EAGLE-3 head, its vocabulary fitted to random tokens."""
  c = tiny_config("eagle3")
  head = Eagle3Head(target.config, tuple(c.head_kwargs.aux_layers), c.head_kwargs.draft_vocab,
                    c.head_kwargs.ttt_steps)
  tokens = np.random.default_rng(9).integers(0, 512, (16, 32))
  return head.fit(head.init(jax.random.key(0)), tokens, np.ones_like(tokens, np.float32),
                  shared_params(target.config, target.params))


@pytest.fixture(scope="module", params=KINDS)
def trained(request, tmp_path_factory):
  """(kind, workdir) of a finished tiny run."""
  return request.param, run_dir(request.param, tmp_path_factory)


def test_loss_falls_and_outputs_written(trained):
  kind, workdir = trained
  rows = metrics.read(os.path.join(workdir, metrics.METRICS))
  evals = [r for r in rows if r["split"] == "eval"]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == tiny_config(kind).steps
  # Held-out loss (most of Medusa's is the target's own entropy) and top-1 agreement.
  assert evals[-1]["loss"] < evals[0]["loss"] - 0.02, evals
  if kind in TOP1_AT_START:
    assert evals[-1]["top1/1"] > 0.9, evals
  else:
    assert evals[-1]["top1/1"] > evals[0]["top1/1"], evals
  assert evals and all(1.0 <= r["sim_tau"] <= 1 + tiny_config(kind).sim_depth for r in evals)
  assert os.path.getsize(os.path.join(workdir, metrics.PLOT)) > 1000
  meta = io.read_meta(os.path.join(workdir, trainer.HEAD_DIR))
  assert meta["kind"] == tiny_config(kind).head and meta["target"]["vocab_size"] == 512
  # The held-out acceptance travels with the head (what `budget=` sizes drafts from).
  depth = min(tiny_config(kind).sim_depth, tiny_config(kind).head_kwargs.get("num_heads", 99))
  assert meta["sim_accept"] == [evals[-1][f"sim_accept/{k}"] for k in range(1, depth + 1)]


TREE = [(0,), (1,), (0, 0), (1, 0)]


@pytest.mark.parametrize("kind,decode_knobs", [
    ("eagle", {}), ("eagle", {"tree": TREE}), ("eagle", {"top_k": 3, "depth": 3, "num_nodes": 7}),
    ("eagle3", {}), ("eagle3", {"top_k": 3, "depth": 3, "num_nodes": 7}),
    ("hydra", {}), ("hydra", {"tree": TREE}), ("hydrapp", {}), ("hydrapp", {"tree": TREE}),
    ("medusa", {}), ("medusa", {"tree": TREE}), ("falcon", {}),
    ("falcon", {"depth": 7, "top_k": 2}), ("dflash", {}), ("dflash", {"tree": TREE}),
    ("dspark", {}), ("dspark", {"threshold": 0.0}), ("fspad", {"top_k": 3, "depth": 3,
                                                                "num_nodes": 7}),
    ("draft_lm", {}), ("draft_lm", {"tree": TREE}), ("ppd", {}), ("ppd", {"tree": TREE}),
    ("longspec", {})],
                         ids=["eagle_chain", "eagle_tree", "eagle2_dynamic", "eagle3_chain",
                              "eagle3_dynamic", "hydra_chain", "hydra_tree", "hydrapp_chain",
                              "hydrapp_tree", "medusa_chain", "medusa_tree", "falcon_chain",
                              "falcon_tree", "dflash_chain", "dflash_tree",
                              "dspark_cut_chain", "dspark_chain", "fspad_dynamic",
                              "draft_lm_chain", "draft_lm_tree", "ppd_chain", "ppd_tree",
                              "longspec_chain"])
def test_trained_head_greedy_equals_ar(kind, decode_knobs, tmp_path_factory):
  workdir = run_dir(kind, tmp_path_factory)
  target = models.load("tiny-random")
  drafter = load_drafter(os.path.join(workdir, trainer.HEAD_DIR), target, **decode_knobs)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 512, n).tolist() for n in (7, 70, 1, 23)]  # ragged, > a chunk
  ar = decode.generate(target, prompts, max_new_tokens=24, eos=None)
  spec = decode.generate(target, prompts, max_new_tokens=24, eos=None, drafter=drafter)
  assert spec.token_lists() == ar.token_lists()
  assert (np.asarray(spec.stats.target_calls) <= 24).all()


def _kill_after_checkpoint(cmd, ckpt_dir, min_step):
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(
        ckpt_dir) else []
    if steps and max(steps) >= min_step:
      break
    if proc.poll() is not None:
      raise AssertionError("the run ended before it could be killed")
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


@pytest.mark.parametrize("kind", ["eagle", "hydra", "hydrapp", "medusa", "falcon", "dspark",
                                  "draft_lm", "ppd"])
def test_resume_from_a_checkpoint_matches_uninterrupted(kind, tmp_path_factory):
  """A run restarted from the shared run's step-30 checkpoint (what a kill leaves) ends
  where the uninterrupted one did (in-process; the SIGKILL test below does it for real)."""
  straight = run_dir(kind, tmp_path_factory)
  resumed = tmp_path_factory.mktemp(f"{kind}_resumed")
  shutil.copytree(os.path.join(straight, "checkpoints", "30"), resumed / "checkpoints" / "30")
  shutil.copy(os.path.join(straight, trainer.CONFIG_FILE), resumed / trainer.CONFIG_FILE)
  trainer.train(tiny_config(kind), str(resumed))
  a = [r for r in metrics.read(os.path.join(straight, metrics.METRICS)) if r["step"] > 30]
  b = [r for r in metrics.read(str(resumed / metrics.METRICS)) if r["step"] > 30]
  assert [r["step"] for r in a] == [r["step"] for r in b] and a
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(ra["loss"], rb["loss"], rtol=1e-5)
  t = models.load("tiny-random")
  _, _, pa, _ = io.load(os.path.join(straight, trainer.HEAD_DIR), t.config)
  _, _, pb, _ = io.load(str(resumed / trainer.HEAD_DIR), t.config)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), pa, pb)


# EAGLE-3 and DFlash in `make test` (a CLI killed for real costs two processes), EAGLE-1
# in `make test-slow`; every other kind resumes in-process above.
@pytest.mark.parametrize("kind", [pytest.param("eagle", marks=pytest.mark.slow), "eagle3",
                                  "dflash"])
def test_sigkill_resume_matches_uninterrupted(kind, tmp_path_factory):
  """specjax-train SIGKILLed after its step-10 checkpoint and rerun ends on the shared
  (uninterrupted, same config) run's curve and weights."""
  module, arg = CONFIGS[kind]
  straight = run_dir(kind, tmp_path_factory)
  killed = str(tmp_path_factory.mktemp(f"{kind}_killed"))
  cmd = [BIN, "--config", f"configs/{module.__name__.split('.')[-1]}.py:{arg}",
         "--workdir", killed]
  _kill_after_checkpoint(cmd, os.path.join(killed, "checkpoints"), 10)
  assert not os.path.exists(os.path.join(killed, trainer.HEAD_DIR))  # it really was cut
  subprocess.run(cmd, check=True, capture_output=True)
  a = metrics.read(os.path.join(straight, metrics.METRICS))
  b = metrics.read(os.path.join(killed, metrics.METRICS))
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(ra["loss"], rb["loss"], rtol=1e-5)
  t = models.load("tiny-random")
  _, ha, pa, _ = io.load(os.path.join(straight, trainer.HEAD_DIR), t.config)
  _, hb, pb, _ = io.load(os.path.join(killed, trainer.HEAD_DIR), t.config)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), pa, pb)
  jax.tree.map(np.testing.assert_array_equal, ha, hb)  # EAGLE-3's vocabulary map


# EAGLE-3 (features from three depths) and Falcon (LSTM + block) in `make test`; every
# kind in `make test-slow`.
SOME_KINDS = [k if k in ("eagle3", "falcon") else pytest.param(k, marks=pytest.mark.slow)
              for k in KINDS]


@pytest.mark.parametrize("kind", SOME_KINDS)
def test_no_gradient_reaches_target(kind):
  c = tiny_config(kind)
  target = models.load("tiny-random")
  if kind == "eagle3":
    head, params = fitted_eagle3(target)
  else:
    head = registry.HEADS.build(c.head, target.config, **c.head_kwargs)
    params = head.init(jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 16)), jnp.int32)
  mask = jnp.ones((2, 16))

  def loss_of_target(target_params):
    batch = trainer.target_batch(target, target_params, head, tokens, mask)
    return head.loss(params, batch, jax.random.key(1))[0]

  grads = jax.jit(jax.grad(loss_of_target))(target.params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  # And the train step leaves the target's params bit for bit.
  before = jax.tree.map(np.array, target.params)
  start = jax.tree.map(np.array, params)  # the step donates its state
  tx = trainer.optimizer(c, params)
  step, _ = trainer.make_steps(target, head, tx, 0, 2)
  state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  for _ in range(3):
    state, _ = step(state, target.params, tokens, mask)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, target.params))
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(
      jax.tree.map(lambda a, b: a - b, state.params, start)))


def _first_chain(target, head, depth: int, prompt_len: int):
  """A greedy chain of `depth` drafted by `head` (random params) right after the prompt
  (longer than a prefill chunk of 64): (params, shared, prompt, the prompt's final
  features [1, 128, H], the DraftTree, draft calls)."""
  params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(2), x.shape),
                        head.init(jax.random.key(1)))
  shared = shared_params(target.config, target.params)
  drafter = head.drafter(params, shared, depth=depth)
  prompt = np.random.default_rng(1).integers(0, 512, prompt_len).tolist()
  max_len = 128
  hist = jnp.zeros((1, max_len), jnp.int32).at[0, :len(prompt)].set(jnp.asarray(prompt))
  ctx = Context(hist, jnp.asarray([len(prompt)], jnp.int32))
  f = causal_forward(target.config, target.params, hist, features=(models.FINAL,)).features[0]

  @jax.jit  # one program, not hundreds of op-by-op ones
  def first(drafter, ctx, f):
    return drafter.propose(drafter.init(ctx, max_len, (f,)), ctx, get_stop(None),
                           Sampling.create(0.0), jax.random.key(0))

  tree, _, calls = first(drafter, ctx, f)
  return params, shared, prompt, f, tree, calls


def test_eagle_drafts_as_a_cache_free_reference():
  """The greedy chain EAGLE proposes inside the loop (head cache, pending features) equals
  a cache-free recomputation: all pairs [real ..., drafted ...] through the head at once."""
  target = models.load("tiny-random")
  cfg = target.config
  head = EagleHead(cfg)
  params, shared, prompt, f, tree, _ = _first_chain(target, head, 4, 90)
  # Reference: pairs (f_i, x_{i+1}) for the prompt, then (g, drafted token) per step.
  feats, nxt, drafted = f[:, :len(prompt) - 1], jnp.asarray([prompt[1:]]), []

  @jax.jit
  def last_out(feats, nxt):
    n = feats.shape[1]
    g, _ = eagle.net(cfg, cfg, params, shared, feats, nxt, jnp.arange(n)[None], causal(n))
    return g[:, -1:], models.lm_head(cfg, shared, g[:, -1:]).argmax(-1)[0, 0]

  for _ in range(4):
    g, tok = last_out(feats, nxt)
    tok = int(tok)
    drafted.append(tok)
    feats = jnp.concatenate([feats, g], 1)
    nxt = jnp.concatenate([nxt, jnp.asarray([[tok]])], 1)
  assert np.asarray(tree.tokens)[0].tolist() == drafted


def test_eagle3_8b_head_shapes_without_allocating():
  """Llama-3-8B's shapes: 128k vocabulary, a 32k draft vocabulary (EAGLE-3's)."""
  cfg = ModelConfig("llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
  head = Eagle3Head(cfg, (2, 16, 29), draft_vocab=32000)
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.bfloat16))
  assert shapes["fc"]["kernel"].shape == (3 * 4096, 4096)
  assert shapes["layer"]["self_attn"]["q_proj"]["kernel"].shape == (8192, 4096)
  assert shapes["layer"]["self_attn"]["k_proj"]["kernel"].shape == (8192, 1024)
  assert shapes["lm_head"]["kernel"].shape == (4096, 32000)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  attn = 8192 * 4096 + 2 * 8192 * 1024 + 4096 * 4096  # q, k, v read 2H; o_proj H -> H
  assert n == 3 * 4096 * 4096 + attn + 3 * 4096 * 14336 + 4 * 4096 + 4096 * 32000
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(shapes))


def test_eagle3_never_drafts_outside_its_vocabulary():
  """Greedy and sampled, chain and dynamic tree: every drafted token is in the map."""
  target = models.load("tiny-random")
  head, params = fitted_eagle3(target)
  params = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(3), x.shape), params)
  allowed = set(np.asarray(head.draft_ids).tolist())
  assert len(allowed) == 128
  shared = shared_params(target.config, target.params)
  rng = np.random.default_rng(4)
  hist = jnp.asarray(rng.integers(0, 512, (4, 64)), jnp.int32)
  ctx = Context(hist, jnp.asarray([9, 30, 2, 50], jnp.int32))
  feats = causal_forward(target.config, target.params, hist, features=head.features).features
  propose = jax.jit(lambda d, s: d.propose(d.init(ctx, 64, feats), ctx, get_stop(None), s,
                                            jax.random.key(1))[0])
  drafted = []
  for knobs in ({"depth": 4}, {"top_k": 4, "depth": 3, "num_nodes": 9}):
    drafter = head.drafter(params, shared, **knobs)
    for s in (Sampling.create(0.0), Sampling.create(1.0)):
      drafted += np.asarray(propose(drafter, s).tokens).ravel().tolist()
  assert set(drafted) <= allowed and len(set(drafted)) > 8


def test_falcon_drafts_as_a_cache_free_reference():
  """Falcon's drafts inside the loop (layer cache, LSTM carry, the re-queried last block,
  a second forward) equal a cache-free recomputation: every pair through the LSTM and the
  relaxed-mask layer at once, blocks aligned to end at the last real pair."""
  target = models.load("tiny-random")
  cfg = target.config
  k = 2
  head = FalconHead(cfg, block=k)
  params, shared, prompt, f, tree, calls = _first_chain(target, head, 2 * k, 75)
  assert int(calls[0]) == 2  # two forwards for 2k tokens

  @jax.jit
  def block_out(feats, nxt):
    n = feats.shape[1]
    l, _ = head.lstm(params, head.pairs(params, shared, feats, nxt))
    g, _ = head.layer(params, l, jnp.arange(n)[None], falcon.relaxed(n, k, (k - n) % k))
    return g[:, -k:]

  feats, nxt = f[:, :len(prompt) - 1], jnp.asarray([prompt[1:]])
  g = block_out(feats, nxt)
  first = models.lm_head(cfg, shared, g).argmax(-1)
  g2 = block_out(jnp.concatenate([feats, g], 1), jnp.concatenate([nxt, first], 1))
  second = models.lm_head(cfg, shared, g2).argmax(-1)
  assert np.asarray(tree.tokens)[0].tolist() == first[0].tolist() + second[0].tolist()


def test_dflash_block_equals_a_cache_free_recomputation():
  """DFlash's block inside the loop (context keys/values cached at `init` from the
  prompt's features, appended at `commit` from a verification's root and accepted
  nodes) equals the training path's recomputation from one teacher-forced forward of
  the whole sequence (`DFlashHead.blocks`): the same distributions for every slot."""
  target = models.load("tiny-random")
  cfg = target.config
  head = registry.HEADS.build("dflash", cfg, num_layers=2, taps=(1,), block_size=5)
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape),
                        head.init(jax.random.key(0)))
  shared = shared_params(cfg, target.params)
  drafter = head.drafter(params, shared, depth=4)
  seq = jnp.asarray(np.random.default_rng(2).integers(0, 512, (1, 60)), jnp.int32)
  p, accepted, max_len = 40, 2, 64
  feats = causal_forward(cfg, target.params, seq, features=head.features).features
  hist = lambda n: jnp.zeros((1, max_len), jnp.int32).at[:, :n].set(seq[:, :n])
  pad = lambda f: jnp.pad(f, ((0, 0), (0, max_len - f.shape[1]), (0, 0)))

  @jax.jit
  def cached(drafter):
    s = Sampling.create(1.0)  # the tree then carries each slot's distribution
    ctx = Context(hist(p), jnp.asarray([p], jnp.int32))
    state = drafter.init(ctx, max_len, tuple(pad(f[:, :p - 1]) for f in feats))
    # A verification that accepted the first 2 of 4 nodes (the sequence's own tokens):
    # the features of [root, node_0..node_3] are the teacher-forced ones at p - 1...
    verdict = Verdict(jnp.arange(4)[None], jnp.asarray([accepted]), seq[:, p + accepted])
    state = drafter.commit(state, ctx, verdict, tuple(f[:, p - 1:p + 4] for f in feats))
    ctx = Context(hist(p + accepted + 1), jnp.asarray([p + accepted + 1], jnp.int32))
    return drafter.propose(state, ctx, get_stop(None), s, jax.random.key(0))[0].probs

  @jax.jit
  def reference(params):
    n = p + accepted + 1
    ctx_kv = dflash.context_kv(head.layer, params, head.fuse(params, feats)[:, :n],
                               jnp.arange(n)[None])
    g = head.blocks(params, shared, ctx_kv, seq[:, :n], jnp.asarray([[n - 1]]), 4)
    return jax.nn.softmax(models.lm_head(cfg, shared, g[:, 0]), -1)

  # float32 sums in another order: a few 1e-6 apart; a stale or shifted cache is far off
  np.testing.assert_allclose(cached(drafter), reference(params), atol=1e-5)


def test_dflash_and_dspark_refuse_bad_knobs_by_name():
  """Before anything compiles: taps that are not features of the target, a mask token
  outside its vocabulary, a draft deeper than the block, a DSpark tree, a DFlash cut."""
  cfg = models.load("tiny-random").config
  build = lambda kind="dflash", **kw: registry.HEADS.build(kind, cfg, **kw)
  with pytest.raises(ValueError, match=r"taps \[5\] must be target features"):
    build(taps=(5,))
  with pytest.raises(ValueError, match="mask_token 512 is not a token id"):
    build(mask_token=512)
  with pytest.raises(ValueError, match="num_anchors must be an integer >= 1"):
    build(num_anchors=0)
  with pytest.raises(ValueError, match="needs markov_rank >= 1"):
    build("dspark", markov_rank=0)
  head, dspark = build(block_size=4), build("dspark", block_size=4, markov_rank=2)
  params = jax.eval_shape(lambda: head.init(jax.random.key(0)))
  with pytest.raises(ValueError, match="depth 4 needs a DFlash block of 5"):
    head.drafter(params, None, depth=4).validate(cfg)
  with pytest.raises(ValueError, match="threshold cuts DSpark's chains"):
    head.drafter(params, None, threshold=0.5)
  with pytest.raises(ValueError, match="DSpark drafts chains"):
    dspark.drafter(params, None, top_k=2, depth=2).validate(cfg)


def test_dspark_markov_truncation_is_the_best_low_rank_map(tmp_path):
  """`truncate_markov` keeps what a full-rank cut computes and, at a lower rank, errs by
  exactly the dropped singular values (Eckart-Young) where naively keeping the first
  columns errs more; the CLI writes a loadable head folder with the new rank."""
  from specjax.training import truncate  # pylint: disable=g-import-not-at-top
  cfg = models.load("tiny-random").config
  head = registry.HEADS.build("dspark", cfg, num_layers=1, block_size=4, markov_rank=8)
  params = head.init(jax.random.key(0))
  k = jax.random.split(jax.random.key(1), 2)
  params["markov"]["w2"] = jax.random.normal(k[0], params["markov"]["w2"].shape)
  params["confidence"]["kernel"] = jax.random.normal(k[1], params["confidence"]["kernel"].shape)
  prev = jnp.arange(cfg.vocab_size)
  g = jax.random.normal(jax.random.key(2), (cfg.vocab_size, cfg.hidden_size))
  zeros = jnp.zeros((cfg.vocab_size, cfg.vocab_size))

  def maps(h, p):
    bias, e = h.markov(p, zeros, prev)
    return np.asarray(bias), np.asarray(h.confidence(p, g, e))

  full = maps(head, params)
  same = maps(*head.truncate_markov(params, 8))
  np.testing.assert_allclose(same[0], full[0], atol=1e-4)
  np.testing.assert_allclose(same[1], full[1], atol=1e-4)
  cut_head, cut = head.truncate_markov(params, 3)
  assert cut_head.markov_rank == 3 and cut["markov"]["w1"].shape == (cfg.vocab_size, 3)
  bias3 = maps(cut_head, cut)[0]
  s = np.linalg.svd(full[0], compute_uv=False)  # the bias's share of the joint map
  err = np.linalg.norm(bias3 - full[0])
  naive = np.asarray(params["markov"]["w1"][:, :3] @ params["markov"]["w2"][:3])
  assert err <= 1.05 * np.sqrt(np.sum(s[3:] ** 2)) + 1e-3
  assert err < np.linalg.norm(naive - full[0])
  with pytest.raises(ValueError, match="rank 9 must be in 1..8"):
    head.truncate_markov(params, 9)
  src = str(tmp_path / "head")
  io.save(src, "dspark", dict(num_layers=1, block_size=4, markov_rank=8), params, cfg,
          {"depth": 3}, target_name="tiny-random", sim_accept=[0.5], sim_tau=1.5)
  meta = truncate.main([src, "--rank", "3", "--out", str(tmp_path / "r3")])
  assert meta["head_kwargs"]["markov_rank"] == 3 and meta["truncated_from"] == 8
  assert "sim_accept" not in meta and meta["decode"] == {"depth": 3}
  _, loaded_head, loaded, _ = io.load(str(tmp_path / "r3"), cfg)
  np.testing.assert_allclose(maps(loaded_head, loaded)[0], bias3, atol=1e-4)
  with pytest.raises(ValueError, match="--out must be a new folder"):
    truncate.truncate(src, 3, src)


def test_tvdpp_gradient_is_tvds_scaled_and_descends():
  """TVD++'s surrogate has TV's gradient divided by the reward's std under q (the
  baseline drops out of an exact sum), and descending it, like TV and soft CE, brings q
  to p; descending the flipped reward drives q away."""
  from specjax.drafters.base import distill_loss  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  p_logits = jnp.asarray(rng.normal(size=(4, 16)) * 2, jnp.float32)
  q0 = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
  tv = lambda q: distill_loss("tvd", p_logits, q)
  g_tv = jax.grad(lambda q: tv(q).sum())(q0)
  g_pp = jax.grad(lambda q: distill_loss("tvdpp", p_logits, q).sum())(q0)
  pq, qq = jax.nn.softmax(p_logits), jax.nn.softmax(q0)
  r = (pq > qq).astype(jnp.float32)
  std = jnp.sqrt(jnp.sum(qq * (r - jnp.sum(qq * r, -1, keepdims=True)) ** 2, -1, keepdims=True))
  np.testing.assert_allclose(g_pp * (std + 1e-6), g_tv, atol=1e-6)

  @functools.partial(jax.jit, static_argnums=0)
  def descend(kind, sign=1.0):
    step = lambda q, _: (q - 0.5 * sign * jax.grad(
        lambda q: distill_loss(kind, p_logits, q).sum())(q), None)
    return tv(jax.lax.scan(step, q0, None, 300)[0]).mean()

  start = float(tv(q0).mean())
  for kind in ("soft_ce", "tvd", "tvdpp"):
    assert float(descend(kind)) < 0.2 * start, kind
  assert float(descend("tvdpp", -1.0)) > start


def test_a_head_trains_with_tvdpp(tmp_path):
  """`loss="tvdpp"` reaches a head's distribution terms: a tiny EAGLE-1 run learns, and a
  loss the registry does not know is refused before anything loads."""
  trainer.train(tiny_config("eagle", loss="tvdpp"), str(tmp_path / "run"))
  evals = [r for r in metrics.read(str(tmp_path / "run" / metrics.METRICS))
           if r["split"] == "eval"]
  assert evals[-1]["top1/1"] > evals[0]["top1/1"] + 0.05, evals
  with pytest.raises(ValueError, match="loss='tv' is not a distillation loss"):
    trainer.train(tiny_config("eagle", loss="tv"), str(tmp_path / "bad"))


def test_keep_best_exports_the_best_held_out_tau(tmp_path):
  """keep_best: a run whose held-out simulated tau peaks before its end (a high constant
  rate) exports the head of the peak, with that eval's acceptance, not the last one."""
  c = tiny_config("eagle", keep_best=True, eval_every=5)
  c.optim.lr, c.optim.end_lr = 0.03, 1.0
  trainer.train(c, str(tmp_path))
  evals = [r for r in metrics.read(str(tmp_path / metrics.METRICS)) if r["split"] == "eval"]
  best = max(evals, key=lambda r: r["sim_tau"])
  assert best["step"] < evals[-1]["step"] and best["sim_tau"] > evals[-1]["sim_tau"], evals
  meta = io.read_meta(str(tmp_path / trainer.HEAD_DIR))
  assert (meta["step"], meta["sim_tau"]) == (best["step"], best["sim_tau"])
  assert meta["sim_accept"] == [best[f"sim_accept/{k}"] for k in range(1, c.sim_depth + 1)]


def test_draft_lm_aligns_from_its_pretrained_weights(tmp_path):
  """FastDraft's second stage: `init_from` starts the alignment run (distillation on the
  target's outputs, TVD++) from the pretrained draft LM, which the fresh one does not
  match at step 0; a head of another kind is refused by name."""
  pretrained = os.path.join(run_dir("draft_lm"), trainer.HEAD_DIR)
  c = tiny_config("draft_lm")
  c.head_kwargs.stage = "align"
  c.loss = "tvdpp"
  trainer.train(c.copy_and_resolve_references(), str(tmp_path / "fresh"))
  c.init_from = pretrained
  trainer.train(c, str(tmp_path / "aligned"))
  first = lambda w: [r for r in metrics.read(str(tmp_path / w / metrics.METRICS))
                     if r["split"] == "eval"][0]
  assert first("aligned")["top1/1"] > first("fresh")["top1/1"] + 0.1
  c.init_from = os.path.join(run_dir("eagle"), trainer.HEAD_DIR)
  with pytest.raises(ValueError, match="holds a eagle head, not draft_lm"):
    trainer.train(c, str(tmp_path / "wrong"))


def test_falcon_glancing_share_decays_with_progress():
  """Pass 2 reads the head's own guesses; ceil(lambda x mismatches) of them glance at the
  truth, lambda = 0.4 (1 - progress): some early, none at the end."""
  target = models.load("tiny-random")
  head = FalconHead(target.config)
  params = head.init(jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 512, (2, 24)), jnp.int32)
  batch = trainer.target_batch(target, target.params, head, tokens, jnp.ones((2, 24)))
  glance = jax.jit(lambda p: head.loss(params, batch.replace(progress=p), jax.random.key(1))[1][
      "glance_share"])
  share = lambda p: float(glance(jnp.float32(p)))
  assert 0.3 <= share(0.0) <= 0.45  # an untrained head misses nearly every guess
  assert 0.0 < share(0.5) < share(0.0)
  assert share(1.0) == 0.0


def test_falcon_7b_head_shapes_without_allocating():
  cfg = ModelConfig("llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                    num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
  shapes = jax.eval_shape(lambda: FalconHead(cfg).init(jax.random.key(0), jnp.bfloat16))
  h = 4096
  lstm = 2 * h * h + h + 2 * 4 * (h * h + h * h + h)  # fc 2H -> H; 2 layers x 4 gates
  layer = 4 * h * h + 3 * h * 11008 + 2 * h
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == lstm + layer
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(shapes))


def test_hydrapp_7b_head_shapes_without_allocating():
  cfg = ModelConfig("llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                    num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
  head = HydraHead(cfg, num_heads=4, mlp_layers=4, prefix_layer=True, teacher=True)
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.bfloat16))
  h = 4096
  assert shapes["head_4"]["w"].shape == (5 * h, h) and shapes["head_4"]["u"].shape == (3, h, h)
  layer = 4 * h * h + 3 * h * 11008 + 2 * h
  heads = sum(2 * (k + 1) * h * h + h + 3 * (h * h + h) for k in range(1, 5))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == layer + heads
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_7b_head_shapes_without_allocating(kind):
  cfg = ModelConfig("llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                    num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
  head = EagleHead(cfg) if kind == "eagle" else MedusaHead(cfg, num_heads=5)
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.bfloat16))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  if kind == "eagle":
    assert shapes["fc"]["kernel"].shape == (8192, 4096)
    assert shapes["mlp"]["gate_proj"]["kernel"].shape == (4096, 11008)
    assert n == 8192 * 4096 + 4096 + 4 * 4096 * 4096 + 3 * 4096 * 11008 + 4096
  else:
    assert shapes["w"].shape == (5, 4096, 4096) and n == 5 * (4096 * 4096 + 4096)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(shapes))


def test_head_for_another_target_is_refused(trained):
  _, workdir = trained
  other = models.Model(models.RANDOM["tiny-random"].replace(hidden_size=32, head_dim=8),
                       None)
  with pytest.raises(ValueError, match="hidden_size=64"):
    io.load(os.path.join(workdir, trainer.HEAD_DIR), other.config)
  with pytest.raises(ValueError, match="vocab_size=512"):
    io.load(os.path.join(workdir, trainer.HEAD_DIR),
            models.RANDOM["tiny-random"].replace(vocab_size=600))


def test_missing_and_corrupt_head(tmp_path, trained):
  _, workdir = trained
  cfg = models.RANDOM["tiny-random"]
  with pytest.raises(FileNotFoundError, match="No head folder"):
    io.load(str(tmp_path / "nothing"), cfg)
  bad = tmp_path / "bad"
  bad.mkdir()
  for name in (io.META, io.PARAMS):
    (bad / name).write_bytes(open(os.path.join(workdir, trainer.HEAD_DIR, name), "rb").read())
  with open(bad / io.PARAMS, "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match="Could not read"):
    io.load(str(bad), cfg)


def test_corrupt_checkpoint_is_reported(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train(tiny_config("eagle", steps=10), workdir)
  ckpt = os.path.join(workdir, "checkpoints", "10")
  for root, _, files in os.walk(ckpt):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  c = tiny_config("eagle", steps=10)
  with pytest.raises(ValueError, match="Could not restore the checkpoint at step 10"):
    trainer.train(c, workdir)


def test_bad_data_is_reported_before_training(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="empty"):
    data_lib.load(str(empty), seq_len=16, vocab=512)
  wrong = tmp_path / "wrong.jsonl"
  wrong.write_text("\n".join(json.dumps({"question": "hi"}) for _ in range(4)))
  with pytest.raises(ValueError, match="no 'input_ids'"):
    data_lib.load(str(wrong), seq_len=16, vocab=512)
  big = tmp_path / "big.jsonl"
  big.write_text("\n".join(json.dumps({"input_ids": [1, 2, 900]}) for _ in range(4)))
  with pytest.raises(ValueError, match="outside the target's vocabulary"):
    data_lib.load(str(big), seq_len=16, vocab=512)
  with pytest.raises(FileNotFoundError, match="not a file"):
    data_lib.load(str(tmp_path / "missing.jsonl"), seq_len=16, vocab=512)


def test_a_data_fraction_keeps_the_held_out_rows(tmp_path):
  """data.fraction (tau-vs-data curves) trains on a share of the rows and holds out the
  very same rows as the whole set; the stdlib source gives text rows in a fixed order."""
  path = tmp_path / "rows.jsonl"
  path.write_text("\n".join(json.dumps({"input_ids": list(range(i, i + 8))}) for i in range(40)))
  whole = data_lib.load(str(path), seq_len=16, vocab=512, eval_rows=4)
  part = data_lib.load(str(path), seq_len=16, vocab=512, eval_rows=4, fraction=0.25)
  assert len(whole.tokens) == 36 and len(part.tokens) == 9
  np.testing.assert_array_equal(part.eval_tokens, whole.eval_tokens)
  np.testing.assert_array_equal(part.tokens, whole.tokens[:9])
  with pytest.raises(ValueError, match="data.fraction must be in"):
    data_lib.load(str(path), seq_len=16, vocab=512, fraction=0.0)
  text = data_lib.stdlib_text(5, 300)
  assert len(text) == 5 and all(0 < len(r["text"]) <= 300 for r in text)
  assert text == data_lib.stdlib_text(5, 300)
  # The configs' data=F: the same steps per token and feature store.
  for module in (eagle3_config, dflash_config):
    whole_c, quarter = module.get_config(), module.get_config("data=0.25")
    assert quarter.data.fraction == 0.25 and quarter.steps == round(whole_c.steps / 4)
    assert quarter.offline_features == whole_c.offline_features
  with pytest.raises(ValueError, match="use data=F"):
    eagle3_config.get_config("data=half")


def test_config_key_typo_fails_before_loading(tmp_path):
  out = subprocess.run([BIN, "--config", "configs/eagle.py:tiny", "--workdir",
                        str(tmp_path / "w"), "--config.optim.lrr=1"],
                       capture_output=True, text=True)
  assert out.returncode != 0 and "lrr" in out.stderr
  assert not os.path.exists(tmp_path / "w")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  make_steps = trainer.make_steps

  def poisoned(*args):
    train_step, eval_step = make_steps(*args)

    def step(state, *rest):
      state, m = train_step(state, *rest)
      return state, {**m, "loss": jnp.where(state.step > 15, jnp.nan, m["loss"])}
    return step, eval_step

  monkeypatch.setattr(trainer, "make_steps", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(trainer.NonFiniteLoss, match="last good checkpoint is step 10"):
    trainer.train(tiny_config("eagle", steps=30), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]
  assert not os.path.exists(os.path.join(workdir, trainer.HEAD_DIR))


def test_data_order_is_a_function_of_step():
  d = data_lib.load("random:20:8", seq_len=8, vocab=512, eval_rows=4, seed=3)
  again = data_lib.load("random:20:8", seq_len=8, vocab=512, eval_rows=4, seed=3)
  for step in (0, 3, 7):  # 16 training rows, batch 5: steps cross epochs
    np.testing.assert_array_equal(d.batch(step, 5)[0], again.batch(step, 5)[0])
  seen = np.concatenate([d.batch(s, 4)[0] for s in range(4)])  # one epoch: every row once
  assert len({tuple(r) for r in seen}) == 16


def test_medusa_accept_matches_its_drafter():
  """Medusa's simulated chain acceptance reads the same heads the drafter proposes from."""
  target = models.load("tiny-random")
  head = MedusaHead(target.config, num_heads=3)
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(5), x.shape),
                        head.init(jax.random.key(0)))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 512, (1, 12)), jnp.int32)
  out = causal_forward(target.config, target.params, tokens, features=(models.FINAL,))
  batch = TargetBatch(tokens, jnp.ones((1, 12)), out.features, out.logits,
                      shared_params(target.config, target.params))
  t = 4  # the chain drafted after position t (root = token t + 1)
  drafter = head.drafter(params, batch.shared, depth=3)
  state = drafter.init(Context(tokens, jnp.asarray([t + 2])), 12, out.features)
  tree, _, _ = drafter.propose(state, None, None, None, None)
  acc, _ = head.accept(params, batch, 3)
  want = np.asarray(tree.tokens)[0] == np.asarray(out.logits.argmax(-1))[0, t + 1:t + 4]
  np.testing.assert_array_equal(np.asarray(acc)[0, t], want)


def test_offline_features_train_like_online(tmp_path, tmp_path_factory):
  """Features stored once (and a build killed half-way and finished) give the online
  (shared) run's losses."""
  c = tiny_config("eagle")
  online = run_dir("eagle", tmp_path_factory)
  target = models.load("tiny-random")
  d = trainer.load_data(c, target)
  folder = str(tmp_path / "feats")
  from specjax.training import features  # pylint: disable=g-import-not-at-top
  features.build(target, d, (models.FINAL,), folder, batch_size=8, progress=False)
  with open(os.path.join(folder, features.PROGRESS)) as f:  # as if killed after 16 rows
    info = json.load(f)
  with open(os.path.join(folder, features.PROGRESS), "w") as f:
    json.dump({**info, "done": 16}, f)
  c.offline_features = folder
  trainer.train(c, str(tmp_path / "offline"))
  a = metrics.read(os.path.join(online, metrics.METRICS))
  b = metrics.read(str(tmp_path / "offline" / metrics.METRICS))
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(ra["loss"], rb["loss"], rtol=1e-4)
    if ra["split"] == "eval":
      assert rb["sim_tau"] == pytest.approx(ra["sim_tau"], abs=1e-3)
  # A fraction of the data reads the whole set's store: its rows (training, then held
  # out) are the whole set's rows of the same tokens; nothing new is written.
  c.data.fraction = 0.25
  part = trainer.load_data(c, target)
  store = features.build(target, part, (models.FINAL,), folder, progress=False)
  assert part.whole is not None and len(part.tokens) < len(d.tokens)
  for rows in (np.arange(len(part.tokens)), len(part.tokens) + np.arange(4)):
    full_rows = part.origin[rows]
    tokens = np.concatenate([d.tokens, d.eval_tokens])[full_rows]
    np.testing.assert_array_equal(tokens, np.concatenate([part.tokens, part.eval_tokens])[rows])
    np.testing.assert_array_equal(store.get(rows, 16)[0],
                                  features.build(target, d, (models.FINAL,), folder,
                                                 progress=False).get(full_rows, 16)[0])


def test_data_curve_measures_runs_on_shares_of_the_data(tmp_path):
  """`data_curve` over a whole-data run and a half-data run of one recipe: its rows, the
  plot, and a mix of recipes refused before anything runs; `wallclock` recomputes the
  half run's train seconds from its metrics."""
  from specjax.training import data_curve  # pylint: disable=g-import-not-at-top
  whole = run_dir("eagle")
  c = tiny_config("eagle", steps=20, eval_every=10)
  c.data.fraction = 0.5
  half = str(tmp_path / "half")
  start = time.perf_counter()
  trainer.train(c, half)
  elapsed = time.perf_counter() - start
  # Its train seconds, recomputed from the metrics (evals and setup excluded).
  from specjax.training import wallclock  # pylint: disable=g-import-not-at-top
  at = wallclock.seconds_at_evals(half)
  assert [r["step"] for r in at] == [0, 10, 20] and at[0]["train_s"] == 0
  assert 0 < at[1]["train_s"] < at[2]["train_s"] < elapsed
  assert at[2]["train_s"] > 0.2 * elapsed
  png, out = str(tmp_path / "curve.png"), str(tmp_path / "curve.json")
  rows = data_curve.main([half, whole, "--png", png, "--json", out, "--max_new_tokens", "12"])
  assert [r["fraction"] for r in rows] == [0.5, 1.0]
  assert rows[0]["rows"] == round(rows[1]["rows"] / 2)
  assert 0.3 < rows[0]["distinct_tokens"] / rows[1]["distinct_tokens"] < 0.7
  assert all(1.0 <= r["measured_tau"] <= 1 + r["depth"] and r["sim_tau"] >= 1.0 for r in rows)
  assert os.path.getsize(png) > 0 and json.load(open(out)) == rows
  with pytest.raises(SystemExit, match="different heads"):
    data_curve.main([whole, run_dir("medusa")])


def test_medusa2_lora_trains_jointly_and_decodes_with_merged_target(tmp_path):
  c = tiny_config("medusa", steps=20)
  c.head_kwargs.lora_rank = 4
  c.head_kwargs.lora_alpha = 4.0
  c.optim.lr = 1e-3
  workdir = str(tmp_path / "m2")
  trainer.train(c, workdir)
  rows = metrics.read(os.path.join(workdir, metrics.METRICS))
  evals = [r for r in rows if r["split"] == "eval"]
  assert evals[-1]["loss"] < evals[0]["loss"]
  # The adapted target stays close to the original (self-distillation).
  assert evals[-1]["lm_distill"] < 1.05 * evals[0]["lm_distill"]
  target = models.load("tiny-random")
  path = os.path.join(workdir, trainer.HEAD_DIR)
  _, _, params, _ = io.load(path, target.config)
  assert float(jnp.abs(params["lora"]["layers_0"]["self_attn"]["q_proj"]["b"]).max()) > 0
  with pytest.raises(ValueError, match="merged_target"):
    load_drafter(path, target)
  merged = medusa.merged_target(path, target)
  assert "+lora:" in merged.name
  prompts = [[1, 2, 3, 4, 5], list(range(30, 60))]
  ar = decode.generate(merged, prompts, max_new_tokens=16, eos=None)
  spec = decode.generate(merged, prompts, max_new_tokens=16, eos=None,
                         drafter=load_drafter(path, merged))
  assert spec.token_lists() == ar.token_lists()  # lossless relative to the merged target
  moved = merged.params["layers_0"]["self_attn"]["q_proj"]["kernel"] - target.params[
      "layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert float(jnp.abs(moved).max()) > 0  # ... which is another model than the base


def test_unreachable_hub_and_unprepared_tfds_are_clear_errors():
  with pytest.raises(ValueError, match="Could not load hub dataset 'no/such_set'.*local file"):
    data_lib.load("hf:no/such_set", seq_len=8, vocab=512)
  with pytest.raises(ValueError, match="Could not load tensorflow-datasets 'mnist'.*Prepare it"):
    data_lib.load("tfds:mnist", seq_len=8, vocab=512)


@pytest.mark.parametrize("kind", SOME_KINDS)
def test_simulated_tau_predicts_measured_tau(kind, tmp_path_factory):
  """On rows that are the target's own greedy output, the simulated tau (the head's
  teacher-forced acceptance walked like a decode) equals what `generate` measures: no
  train/serve mismatch (features, positions, cache)."""
  target = models.load("tiny-random")
  _, head, params, _ = io.load(os.path.join(run_dir(kind, tmp_path_factory),
                                            trainer.HEAD_DIR), target.config)
  prompts = np.random.default_rng(5).integers(0, 512, (8, 20)).tolist()
  ar = decode.generate(target, prompts, max_new_tokens=40, eos=None)
  tokens = jnp.asarray([p + r for p, r in zip(prompts, ar.token_lists())])
  mask = jnp.asarray([[0] * 20 + [1] * 40] * 8, jnp.float32)
  @jax.jit
  def teacher_forced():
    batch = trainer.target_batch(target, target.params, head, tokens, mask)
    return (batch, *head.accept(params, batch, 3))

  batch, acc, rows = teacher_forced()
  accepted = np.asarray(jnp.cumprod(acc, -1).sum(-1))
  done = np.sum([trainer.walk(accepted[b], np.asarray(rows[b])) for b in range(8)], 0)
  simulated = done[0] / done[1]
  drafter = head.drafter(params, batch.shared, depth=3)
  out = decode.generate(target, prompts, max_new_tokens=40, eos=None, drafter=drafter)
  measured = float(np.sum(out.lengths) / np.sum(out.stats.target_calls))
  assert simulated > 1.05  # the head accepts something: the comparison means something
  assert abs(simulated - measured) < 0.03 * measured, (simulated, measured)  # budget ends


def test_eagle_identity_init_starts_as_g_equals_f():
  """init_identity: the fresh head passes the feature through (fc = [0 | I] + 1% noise,
  the layer's output projections zero), so its first predictions are on the target's
  scale instead of random."""
  target = models.load("tiny-random")
  cfg = target.config
  head = EagleHead(cfg, init_identity=True)
  params = head.init(jax.random.key(0))
  shared = models.shared_params(cfg, target.params)
  f = jax.random.normal(jax.random.key(1), (2, 5, cfg.hidden_size))
  tokens = jax.random.randint(jax.random.key(2), (2, 5), 0, cfg.vocab_size)
  cache = models.KVCache.create(1, 2, 8, cfg.num_kv_heads, cfg.head_dim)
  net = jax.jit(lambda p: head.net(p, shared, f, tokens, jnp.broadcast_to(jnp.arange(5), (2, 5)),
                                    models.causal(5), cache)[0])
  g = net(params)
  assert float(jnp.linalg.norm(g - f) / jnp.linalg.norm(f)) < 0.1
  g0 = net(EagleHead(cfg).init(jax.random.key(0)))
  assert float(jnp.linalg.norm(g0 - f) / jnp.linalg.norm(f)) > 0.5  # a random init is not
