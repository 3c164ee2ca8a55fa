"""Parallel prompt decoding (PPD) for SmolLM2-135M: 3 trainable prompt tokens let the
frozen target guess 3 tokens ahead, riding on each verification forward.

  specjax-train --config configs/ppd.py --workdir workdir/ppd
  specjax-train --config configs/ppd.py:tiny --workdir /tmp/ppd_tiny   # ~1 minute

Only the 3 x 576 embeddings train (PPD's defaults: 3 prompt tokens, lr 1e-2, levels
weighted 0.8^(i-1)), by distillation against the target on its self-distilled answers;
every step runs the whole target forward and backward (the gradient reaches the prompt
embeddings through it), so rows are cut to 256 tokens.
"""

from specjax.configs import train_common


def get_config(arg: str | None = None):
  c = train_common.base()
  c.head = "ppd"
  c.head_kwargs.num_prompts = 3
  c.head_kwargs.decay = 0.8
  c.head_kwargs.num_anchors = 8
  c.decode.depth = 3
  c.decode.top_k = 1
  c.sim_depth = 3
  c.batch_size = 4
  c.data.seq_len = 256
  c.data.eval_rows = 8
  c.steps = 200
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.eval_every = 100
  c.checkpoint_every = 20
  c.keep_best = True
  if arg == "tiny":
    c = train_common.tiny(c)
    c.optim.lr = 3e-2
    c.keep_best = False
  elif arg:
    raise ValueError(f"Unknown argument {arg!r}: use nothing or 'tiny'.")
  return c
