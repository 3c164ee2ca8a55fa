"""Falcon head against SmolLM2-135M, on its self-distilled answers.

  specjax-train --config configs/falcon.py --workdir workdir/falcon
  specjax-train --config configs/falcon.py:tiny --workdir /tmp/falcon_tiny   # ~1 minute

Two LSTM layers and one relaxed-mask decoder layer draft k = 2 tokens a forward (Falcon's
k); glancing distillation starts at a 0.4 share and decays to 0 over the run.
"""

from specjax.configs import train_common


def get_config(arg: str | None = None):
  c = train_common.base()
  c.head = "falcon"
  c.head_kwargs.block = 2
  c.head_kwargs.glance = 0.4
  c.head_kwargs.noise = 0.2
  c.head_kwargs.ce_weight = 0.1
  c.decode.depth = 2  # one forward
  c.decode.top_k = 1
  c.sim_depth = 2  # the simulated tau covers a chain's first forward
  c.batch_size = 8
  c.steps = 160
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.data.eval_rows = 16  # the same held-out rows as configs/eagle.py
  c.eval_every = 80
  c.checkpoint_every = 20
  c.offline_features = "workdir/features/smollm2-135m"  # shared with configs/eagle.py
  if arg == "tiny":
    c = train_common.tiny(c)
    c.head_kwargs.block = 3  # the tests' depth-3 chains are one forward
    c.decode.depth = 3
    c.sim_depth = 3
  elif arg:
    raise ValueError(f"Unknown argument {arg!r}: use nothing or 'tiny'.")
  return c
