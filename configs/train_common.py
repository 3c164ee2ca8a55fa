"""Shared pieces of training configs: every field `specjax-train` reads, with defaults."""

from __future__ import annotations

import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.target = "smollm2-135m"  # a preset, a HF folder, a .gguf file, or "tiny-random"
  c.dtype = "float32"
  c.head = "eagle"  # a name in specjax.registry.HEADS
  c.head_kwargs = ml_collections.ConfigDict()  # the head's knobs (noise, num_heads, ...)
  c.decode = ml_collections.ConfigDict()  # drafter knobs saved with the head (depth, top_k)
  # How the head's distribution terms pull toward the target: "soft_ce" (each head's own
  # recipe), "tvd" or "tvdpp" (TVD++; specjax.drafters.base.distill_loss).
  c.loss = "soft_ce"
  c.data = ml_collections.ConfigDict({
      "source": "assets/distill/smollm2-135m",  # see specjax.training.data
      "seq_len": 512,  # rows are cut to this
      "bucket": 128,  # batch widths round up to this (rows of similar length batch together)
      "eval_rows": 32,
      "fraction": 1.0,  # the share of the training rows kept (data-scaling curves)
  })
  # A folder: run the target over the data once, store its features there, train from
  # them (offline; for large targets or many heads). Empty: features online, every step.
  c.offline_features = ""
  c.offline_dtype = "float32"  # or "float16": half the disk
  c.batch_size = 4
  c.grad_accum = 1  # micro-steps per optimizer step
  c.steps = 1000  # optimizer steps
  c.optim = ml_collections.ConfigDict({
      "lr": 3e-4, "warmup_steps": 50, "end_lr": 0.1, "b1": 0.9, "b2": 0.95,
      "weight_decay": 0.0, "clip": 0.5,
  })
  c.seed = 0
  c.sim_depth = 5  # draft depth of the simulated tau
  c.log_every = 10
  c.eval_every = 100
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  # Export the head of the eval with the best held-out simulated tau (kept in workdir/best
  # as training goes), not the last one.
  c.keep_best = False
  # A head folder of the same kind and shapes to start from (e.g. a pretrained draft LM
  # for its alignment stage); empty: a fresh head.
  c.init_from = ""
  c.progress = True
  # Sharding (specjax.sharding): a mesh such as "data=-1" or "data=2,fsdp=2,tensor=2" over
  # all devices of all processes ("": one device); rules as (logical axis, mesh axes)
  # pairs, () = sharding.DEFAULT_RULES. A resumed run may change both.
  c.mesh = ""
  c.sharding_rules = ()
  # Several processes (multi-host): `sharding.initialize`. Empty: from the environment
  # (JAX_COORDINATOR_ADDRESS, ...) if set, else one process; auto=True lets JAX find the
  # cluster (Cloud TPU pods, SLURM, Open MPI).
  c.distributed = ml_collections.ConfigDict({
      "coordinator": "", "num_processes": 0, "process_id": -1, "auto": False})
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A run of about a minute on the random tiny target (smoke tests)."""
  c.target = "tiny-random"
  c.data.source = "self:96:48"  # the tiny target's own continuations
  c.data.seq_len = 48
  c.data.bucket = 16
  c.data.eval_rows = 8
  c.batch_size = 8
  c.steps = 40
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 5
  c.log_every = 5
  c.eval_every = 20
  c.checkpoint_every = 10
  c.sim_depth = 3
  c.progress = False
  c.offline_features = ""  # online: the tiny target is cheap
  return c


def data_fraction(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """`data=F` (a config argument): train on that share of the training rows for that
  share of the steps (the same steps per token; the same held-out rows, the whole set's
  feature store): one point of a tau-vs-data curve."""
  try:
    fraction = float(arg.split("=", 1)[1])
  except ValueError:
    raise ValueError(f"{arg!r}: use data=F with F in (0, 1], e.g. data=0.25.") from None
  c.data.fraction = fraction
  c.steps = max(1, round(c.steps * fraction))
  c.eval_every = max(1, round(c.eval_every * fraction))
  return c
