"""Training a draft head against a frozen target: one jitted step, orbax checkpoints that
resume exactly, held-out metrics with a simulated tau, and the exported head.

Data flow of a step (`train_step`):

  tokens, mask [B, T]  --target forward (stop_gradient)-->  features, logits
  head.loss(params, TargetBatch, key)  --grad w.r.t. head params only-->  optax update

Only the head's params reach the optimizer; the target's params are an argument of the
step, never differentiated, and its outputs pass through `stop_gradient`. The batch of
micro-step s is a pure function of (seed, s) and the step's key is fold_in(seed, s), so a
run restored from the checkpoint at step s continues exactly as the uninterrupted run.
A non-finite loss leaves the params unchanged and stops the run (the last checkpoint
stays the last good one).

Sharding (`c.mesh`, `c.sharding_rules`; see `specjax.sharding`): the target is placed on
its shards as it is read; the train state is built by shape (`jax.eval_shape`), given its
shardings by the rules and created on them (`jax.jit(init, out_shardings=...)`); the step
donates it. Each process feeds only its own rows of a batch
(`jax.make_array_from_process_local_data`), and a checkpoint restores onto whatever mesh
the resumed run has. Without a mesh everything sits on one device (a 1-device mesh), through
the same code. Only process 0 writes logs, plots and the exported head.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from specjax import models, registry, sharding
from specjax.drafters import io as head_io
from specjax.drafters.base import DISTILL_LOSSES, TargetBatch
from specjax.models.model import causal, forward

from . import data as data_lib
from . import features as features_lib
from . import metrics as metrics_lib

CONFIG_FILE = "config.json"
HEAD_DIR = "head"
BEST_DIR = "best"  # keep_best: the head of the best held-out simulated tau so far
# Config keys a resumed run may change: they do not alter the trajectory.
RESUME_FREE = ("progress", "log_every", "eval_every", "checkpoint_every", "keep_best",
               "keep_checkpoints", "mesh", "sharding_rules", "distributed")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # micro-steps done
  params: Any
  opt_state: Any


class NonFiniteLoss(RuntimeError):
  pass


def schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate per optimizer step: linear warm-up, then cosine down to lr * end_lr."""
  o = c.optim
  return optax.warmup_cosine_decay_schedule(
      0.0, o.lr, o.warmup_steps, max(c.steps, o.warmup_steps + 1), end_value=o.lr * o.end_lr)


def optimizer(c: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """AdamW (decay on matrices only) under warm-up + cosine, global-norm clipping, and
  gradient accumulation over `grad_accum` micro-steps."""
  o = c.optim
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(optax.clip_by_global_norm(o.clip),
                   optax.adamw(schedule(c), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                               mask=decay_mask))
  return optax.MultiSteps(tx, every_k_schedule=c.grad_accum)


def target_batch(target: models.Model, params, head, tokens, mask, stored=None,
                 loss: str = "soft_ce") -> TargetBatch:
  """The frozen target's outputs on a batch: the very `forward` decoding uses (online), or
  the features of a `features.Store` (offline; logits from the final features)."""
  b, t = tokens.shape
  params = jax.lax.stop_gradient(params)
  shared = models.shared_params(target.config, params)
  if not getattr(head, "reads_target", True):  # a draft LM pretraining on text
    return TargetBatch(tokens, mask, (), None, shared, params, loss=loss)
  if stored is not None:
    names = features_lib.stored_features(head.features)
    feats = tuple(stored[names.index(f)] for f in head.features)
    logits = models.lm_head(target.config, shared, stored[0])
    return TargetBatch(tokens, mask, feats, logits, shared, params, loss=loss)
  out = forward(target.config, params, tokens, jnp.broadcast_to(jnp.arange(t), (b, t)),
                causal(t), features=tuple(head.features))
  out = jax.lax.stop_gradient(out)
  return TargetBatch(tokens, mask, out.features, out.logits, shared, params, loss=loss)


def make_steps(target: models.Model, head, tx, seed: int, sim_depth: int,
               total_steps: int | None = None, state_shardings: Any = None,
               plan: sharding.Plan | None = None, loss: str = "soft_ce"):
  """(train_step, eval_step), jitted; the target's params are an argument. The batch's
  `progress` is micro-step / `total_steps` (1 when not given); `loss` is its
  distillation loss (`base.DISTILL_LOSSES`). With a plan, the state
  keeps `state_shardings` and metrics come back replicated (every process reads them)."""
  replicated = None if plan is None else plan.replicated()

  @functools.partial(jax.jit, donate_argnums=(0,),
                     out_shardings=None if plan is None else (state_shardings, replicated))
  def train_step(state: TrainState, target_params, tokens, mask, stored=None):
    batch = target_batch(target, target_params, head, tokens, mask, stored, loss)
    if total_steps:
      batch = batch.replace(progress=state.step / total_steps)
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    (value, metrics), grads = jax.value_and_grad(
        lambda p: head.loss(p, batch, key), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(value)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params = keep(optax.apply_updates(state.params, updates), state.params)
    opt_state = keep(opt_state, state.opt_state)
    metrics = {**metrics, "loss": value, "grad_norm": optax.global_norm(grads)}
    return TrainState(state.step + 1, params, opt_state), metrics

  @functools.partial(jax.jit, out_shardings=replicated)
  def eval_step(params, target_params, tokens, mask, stored=None):
    batch = target_batch(target, target_params, head, tokens, mask, stored, loss)
    value, metrics = head.loss(params, batch, jax.random.key(0))
    acc, rows = head.accept(params, batch, sim_depth)
    prefix = jnp.cumprod(acc, axis=-1)  # leading accepted drafts
    return {**metrics, "loss": value}, {"accepted_BxT": prefix.sum(-1), "rows_BxT": rows,
                                       "per_depth": jnp.sum(rows[..., None] * prefix, (0, 1))}

  return train_step, eval_step


def walk(accepted_T: np.ndarray, rows_T: np.ndarray) -> tuple[int, int]:
  """(tokens, steps) of greedy decoding over one held-out row: start where the response
  starts, gain the accepted drafts + 1 per step, jump past them. Averaging the accepted
  length over every position instead would overweight runs of easy tokens, which a real
  decode crosses in few steps."""
  t = int(np.argmax(rows_T > 0)) if rows_T.any() else len(rows_T)
  tokens = steps = 0
  while t < len(rows_T) and rows_T[t] > 0:
    gained = int(accepted_T[t]) + 1
    tokens, steps, t = tokens + gained, steps + 1, t + gained
  return tokens, steps


def evaluate(eval_step, params, target_params, data: data_lib.Data, batch_size: int,
             store=None, plan: sharding.Plan | None = None) -> dict[str, float]:
  """Held-out loss and metrics (row-weighted means) and the simulated tau (a greedy
  decode walked over the held-out rows with the head's teacher-forced acceptance)."""
  sums, n, tokens_steps, rows, per_depth = {}, 0, np.zeros(2), 0.0, 0.0
  for tokens, mask, idx, width in data.eval_batches(batch_size):
    m, a = eval_step(params, target_params, *feed(plan, len(tokens), lambda r: (
        tokens[r], mask[r], None if store is None else store.get(idx[r], width))))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v) * len(tokens)
    n += len(tokens)
    accepted, row_w = np.asarray(a["accepted_BxT"]), np.asarray(a["rows_BxT"])
    for b in range(len(tokens)):
      tokens_steps += walk(accepted[b], row_w[b])
    rows += float(row_w.sum())
    per_depth = per_depth + np.asarray(a["per_depth"])
  out = {k: v / n for k, v in sums.items()}
  out["sim_tau"] = float(tokens_steps[0] / max(tokens_steps[1], 1))
  for k, v in enumerate(np.atleast_1d(per_depth)):
    out[f"sim_accept/{k + 1}"] = float(v) / max(rows, 1.0)  # P(first k + 1 drafts accepted)
  return out


def feed(plan: sharding.Plan | None, n: int, read) -> tuple:
  """A global batch of n rows: `read(positions)` gives the arrays (tokens, mask, stored
  features or None) of the batch's rows at those positions; each process reads only its
  own share (all of them without a plan or on one process)."""
  if plan is None:
    return read(np.arange(n))
  return jax.tree.map(plan.global_batch, read(np.arange(n)[plan.local_rows(n)]))


def load_data(c: ml_collections.ConfigDict, target: models.Model) -> data_lib.Data:
  """The run's data, split and shaped as `c` says (the same rows on every call)."""
  encode = None if target.tokenizer is None else target.tokenizer.encode
  return data_lib.load(c.data.source, seq_len=c.data.seq_len, vocab=target.config.vocab_size,
                       encode=encode, eval_rows=c.data.eval_rows, seed=c.seed, target=target,
                       bucket=c.data.bucket, fraction=c.data.get("fraction", 1.0))


def _check_config(workdir: str, c: ml_collections.ConfigDict) -> None:
  """A rerun must use the config saved beside the checkpoints, except for keys that do
  not change the trajectory (`RESUME_FREE`). A workdir with neither a checkpoint nor
  metrics holds no run yet (one that failed before training): its config may change."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path) or not _has_run(workdir):
    return
  mine = json.loads(c.to_json())
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  # A key newer than the saved run counts as the default it had then.
  from specjax.configs import train_common  # pylint: disable=g-import-not-at-top
  defaults = json.loads(train_common.base().to_json())

  def then(k):  # the saved value, with fields added since at their defaults
    value = saved.get(k, defaults.get(k))
    return {**defaults[k], **value} if isinstance(value, dict) and isinstance(
        defaults.get(k), dict) else value

  diff = sorted(k for k in set(saved) | set(mine)
                if k not in RESUME_FREE and then(k) != mine.get(k))
  if diff:
    raise ValueError(f"{workdir} holds a run with another config (keys {diff} differ); "
                     "use a new workdir or the saved config.")


def _has_run(workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint or metrics (training started there)."""
  ckpts = os.path.join(workdir, "checkpoints")
  metrics = os.path.join(workdir, metrics_lib.METRICS)
  return (os.path.isdir(ckpts) and bool(os.listdir(ckpts))) or (
      os.path.exists(metrics) and os.path.getsize(metrics) > 0)


def _save_config(workdir: str, c: ml_collections.ConfigDict) -> None:
  """Saves the config beside the checkpoints (once its target and data have loaded)."""
  with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(json.loads(c.to_json()), f, indent=1)


# Config keys that are counts or sizes -> their smallest value.
SIZES = {"batch_size": 1, "grad_accum": 1, "steps": 0, "log_every": 1, "eval_every": 1,
         "checkpoint_every": 1, "keep_checkpoints": 1, "sim_depth": 1, "data.seq_len": 2,
         "data.bucket": 1, "data.eval_rows": 0}


def check_numbers(c: ml_collections.ConfigDict, at_least: dict[str, int] = SIZES) -> None:
  """Counts and sizes are integers in range (checked before anything loads)."""
  for key, low in at_least.items():
    value = c
    for part in key.split("."):
      value = value.get(part) if hasattr(value, "get") else None
    if value is None:
      continue  # a key this config does not have: whatever reads it says so
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"Config key {key} must be an integer >= {low}; got {value!r}.")


def _restore(mngr: ocp.CheckpointManager, target_state, workdir: str):
  """The newest checkpoint that restores. Newer ones that do not (corrupt: the run died
  while writing one) are moved to workdir/corrupt_checkpoints/STEP, with a warning, so
  the run resumes from the one before and rewrites them; if none restores, the error
  names the newest."""
  steps = sorted(mngr.all_steps(), reverse=True)
  errors = {}
  for step in steps:
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore(target_state))
    except Exception as e:  # pylint: disable=broad-except
      errors[step] = e
      continue
    if errors:
      aside = os.path.join(workdir, "corrupt_checkpoints")
      os.makedirs(aside, exist_ok=True)
      for bad, e in errors.items():
        src = os.path.join(mngr.directory, str(bad))
        dst = os.path.join(aside, str(bad))
        while os.path.exists(dst):
          dst += "_"
        os.rename(src, dst)
        print(f"warning: the checkpoint at step {bad} in {workdir} does not restore "
              f"({type(e).__name__}: {str(e)[:200]}); moved to {dst}, resuming from step "
              f"{step}.", file=sys.stderr)
      mngr.reload()
    return state
  e = errors[steps[0]]
  raise ValueError(f"Could not restore the checkpoint at step {steps[0]} in {workdir}: "
                   f"{type(e).__name__}: {e}") from e


def train(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the head `c.head` against `c.target`; returns the last eval."""
  check_numbers(c)
  if c.loss not in DISTILL_LOSSES:
    raise ValueError(f"Config key loss={c.loss!r} is not a distillation loss; expected one of "
                     f"{DISTILL_LOSSES}.")
  registry.HEADS.check(c.head, None, **c.head_kwargs)
  data_lib.check_source(c.data.source)
  plan = sharding.from_config(c) or sharding.Plan.create(
      sharding.make_mesh("data=1", jax.local_devices()[:1]))
  _check_batches(c, plan)
  lead = jax.process_index() == 0  # the process that writes files
  os.makedirs(workdir, exist_ok=True)
  if lead:
    _check_config(workdir, c)
  target = models.load(c.target, c.dtype, plan=plan)
  head = registry.HEADS.build(c.head, target.config, **c.head_kwargs)
  data = load_data(c, target)
  if lead:  # only now: a run that failed on its target or data leaves no config behind
    _save_config(workdir, c)
  print(f"data: {data_lib.describe(data)}")
  shared = models.shared_params(target.config, target.params)
  key = jax.random.key(c.seed)
  # A head shaped by its data (EAGLE-3's draft vocabulary) decides its static shape here;
  # params come below.
  head, _ = head.fit(jax.eval_shape(lambda: head.init(key, target.dtype)), data.tokens,
                     data.mask, shared)
  tx = optimizer(c, jax.eval_shape(lambda: head.init(key, target.dtype)))

  start = None
  if c.init_from:  # another run's head (same kind and shapes) as the starting point
    kind, _, start, _ = head_io.load(c.init_from, target.config, target.dtype)
    if kind != c.head:
      raise ValueError(f"init_from={c.init_from!r} holds a {kind} head, not {c.head}.")
    want = jax.eval_shape(lambda: head.init(key, target.dtype))
    if jax.tree.map(lambda a: a.shape, want) != jax.tree.map(lambda a: a.shape, start):
      raise ValueError(f"init_from={c.init_from!r} holds params of other shapes than this "
                       "run's head (check head_kwargs).")

  def init_state(shared, start):
    params = head.init(key, target.dtype) if start is None else start
    params = head.fit(params, data.tokens, data.mask, shared)[1]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  # Built by shape, sharded at creation: no full copy of the state on any one device.
  abstract = jax.eval_shape(init_state, shared, start)
  shardings = plan.param_shardings(abstract)
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  total = c.steps * c.grad_accum  # micro-steps
  mngr = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=c.keep_checkpoints,
                                           enable_async_checkpointing=False))
  if mngr.latest_step() is not None:
    # Onto this run's shardings, whatever mesh wrote it.
    target_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    state = _restore(mngr, target_state, workdir)
    print(f"resumed from micro-step {int(state.step)}")
  else:
    state = jax.jit(init_state, out_shardings=shardings)(shared, start)
  train_step, eval_step = make_steps(target, head, tx, c.seed, c.sim_depth, total,
                                     shardings, plan, c.loss)
  start_step = int(state.step)
  log = metrics_lib.Log(workdir, start_step, write=lead)
  bar = tqdm.tqdm(total=total, initial=start_step, unit="step", desc=f"train {c.head}",
                  disable=not c.progress, dynamic_ncols=True)
  print(f"head {c.head}: {n_params / 1e6:.2f}M trainable params; target {target.name} "
        f"frozen; {total} micro-steps of {c.batch_size} rows x <= {c.data.seq_len} tokens")
  window, window_tokens, t0, last_eval = [], 0, time.perf_counter(), None
  step = start_step
  store = None
  if c.offline_features:
    if jax.process_count() > 1:
      raise ValueError("offline_features is single-process for now: build the store with "
                       "one process first (same config, steps=0), then train on it.")
    store = features_lib.build(target, data, head.features, c.offline_features,
                               dtype=c.offline_dtype, progress=c.progress)
  run_eval = lambda: evaluate(eval_step, state.params, target.params, data, c.batch_size, store,
                              plan)
  trained_tokens = int(total * c.batch_size * data.train_tokens / len(data.tokens))

  def export(path: str, params, row: dict[str, Any]) -> None:
    """The head folder of `params`, with the held-out P(first k drafts accepted) of `row`
    (what `budget.knobs` sizes drafts from). Every process joins; one writes."""
    params = jax.jit(lambda p: p, out_shardings=plan.replicated())(params)
    sim_accept = []  # sim_depth entries, or fewer for heads that draft fewer (Medusa)
    while f"sim_accept/{len(sim_accept) + 1}" in row:
      sim_accept.append(row[f"sim_accept/{len(sim_accept) + 1}"])
    if lead:
      head_io.save(path, c.head, dict(c.head_kwargs), params, target.config, dict(c.decode),
                   target_name=target.name, trained_tokens=trained_tokens,
                   sim_accept=sim_accept, sim_tau=row["sim_tau"], step=row["step"],
                   buffers=head.buffers())

  # keep_best: the held-out simulated tau can peak and fall while the loss keeps dropping
  # (EAGLE-3 trainers report it): the head of the best eval so far lives in workdir/best.
  best_tau = max([r["sim_tau"] for r in metrics_lib.read(log.path) if r["split"] == "eval"
                  and r["step"] <= step] or [-1.0]) if os.path.exists(log.path) else -1.0

  def evaluated(row: dict[str, Any]) -> dict[str, Any]:
    nonlocal best_tau
    log.write(row)
    if c.keep_best and row["sim_tau"] > best_tau:
      best_tau = row["sim_tau"]
      export(os.path.join(workdir, BEST_DIR), state.params, row)
    return row

  if step == 0:  # the fresh head's numbers: where the curves start
    evaluated({"step": 0, "split": "eval", **run_eval()})
  while step < total:
    idx, width = data.batch_rows(step, c.batch_size)
    window_tokens += len(idx) * width
    state, m = train_step(state, target.params, *feed(plan, len(idx), lambda r: (
        data.tokens[idx[r], :width], data.mask[idx[r], :width],
        None if store is None else store.get(idx[r], width))))
    m = {k: float(v) for k, v in m.items()}
    if not np.isfinite(m["loss"]):
      bar.close()
      raise NonFiniteLoss(f"Loss became {m['loss']} at micro-step {step}; stopped. The last "
                          f"good checkpoint is step {mngr.latest_step()} in {workdir}. Lower "
                          "the learning rate or check the data.")
    step += 1
    window.append(m)
    bar.update(1)
    bar.set_postfix_str(f"loss {m['loss']:.3f}")
    if step % c.log_every == 0 or step == total:
      dt = time.perf_counter() - t0
      row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
      row.update(step=step, split="train", lr=float(schedule(c)(step // c.grad_accum)),
                 tokens_per_s=window_tokens / dt)
      log.write(row)
      window, window_tokens, t0 = [], 0, time.perf_counter()
    if step % c.eval_every == 0 or step == total:
      last_eval = evaluated({"step": step, "split": "eval", **run_eval()})
      bar.write(metrics_lib.summary(last_eval))
      log.plot()
      t0 = time.perf_counter()
    if step % c.checkpoint_every == 0 or step == total:
      mngr.save(step, args=ocp.args.StandardSave(state), force=True)
      mngr.wait_until_finished()
  bar.close()
  last_eval = last_eval or {"step": step, "split": "eval", **run_eval()}
  out = os.path.join(workdir, HEAD_DIR)
  best = os.path.join(workdir, BEST_DIR)
  if c.keep_best and os.path.exists(os.path.join(best, head_io.META)):
    if lead:  # the best eval's head is the run's head
      shutil.rmtree(out, ignore_errors=True)
      shutil.copytree(best, out)
    chosen = head_io.read_meta(best)
    print(f"head: the best held-out simulated tau, {chosen['sim_tau']:.3f} at micro-step "
          f"{chosen['step']} (the last eval: {last_eval['sim_tau']:.3f})")
  else:
    export(out, state.params, last_eval)
  return last_eval


def _check_batches(c: ml_collections.ConfigDict, plan: sharding.Plan) -> None:
  """Training and held-out batches must split evenly over the batch axes and processes."""
  m = plan.batch_size_multiple * jax.process_count() // math.gcd(plan.batch_size_multiple,
                                                                  jax.process_count())
  bad = {k: v for k, v in (("batch_size", c.batch_size), ("data.eval_rows", c.data.eval_rows))
         if v % m}
  if bad:
    raise sharding.ShardingError(
        f"{bad} must be multiples of {m}: batches split over the mesh's batch axes "
        f"({plan.batch_size_multiple} shards, mesh {dict(plan.mesh.shape)}) and "
        f"{jax.process_count()} process(es).")

