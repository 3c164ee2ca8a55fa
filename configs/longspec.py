"""LongSpec head against SmolLM2-135M, on its self-distilled answers to the training mix.

  specjax-train --config configs/longspec.py --workdir workdir/longspec
  specjax-train --config configs/longspec.py:tiny --workdir /tmp/longspec_tiny   # ~1 minute

One draft layer over token embeddings: 512-token sliding self-attention, cross-attention
into the target's last-layer keys/values, an MLP, the target's frozen LM head. Rows are at
most 256 tokens (about 40 minutes on the 2-core CPU); anchor-offset positions (0-4 anchors, the rest shifted up to the
context's end) and cross-attention lags of 1-4 tokens teach it the long positions and
the lags it decodes with (`drafters.heads.longspec`). Features are computed online (the
head reads the last layer's input, which no shared feature store holds).
"""

from specjax.configs import train_common


def get_config(arg: str | None = None):
  c = train_common.base()
  c.head = "longspec"
  c.head_kwargs.window = 512
  c.head_kwargs.max_offset = 30000  # capped by the target's context (8,192 - 1,000)
  c.decode.depth = 4
  c.batch_size = 8
  c.steps = 240
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.data.seq_len = 256  # a 2-core CPU's budget; the offsets reach the long positions
  c.data.eval_rows = 16
  c.eval_every = 80
  c.checkpoint_every = 20
  c.keep_best = True
  if arg == "tiny":
    c = train_common.tiny(c)
    c.head_kwargs.window = 16  # rows of 48 tokens: the window binds
    c.decode.depth = 3
    c.keep_best = False
  elif arg:
    raise ValueError(f"Unknown argument {arg!r}: use nothing or 'tiny'.")
  return c
