"""DFlash head against SmolLM2-135M, on its self-distilled answers to the training mix.

  specjax-train --config configs/dflash.py --workdir workdir/dflash
  specjax-train --config configs/dflash.py:tiny --workdir /tmp/dflash_tiny   # ~1 minute
  specjax-train --config configs/dflash.py:data=0.25 --workdir workdir/dflash_f0.25

`data=F` trains on that share of the training rows for that share of the steps (the same
steps per token; the same held-out rows and feature store): the tau-vs-data curve.

Two draft layers shaped like the target's read the inputs of target layers 2, 15 and 27
(of 30: EAGLE-3's layers, near z-lab's spacing from layer 1 to L - 3, so both heads train
from one feature store), fused by fc + norm and injected as context keys/values into both
layers; a block of 8 drafts 7 tokens in one forward. Trained on 16 random anchors per
row, slot j weighted exp(-(j - 1) / 4) (speculators' gamma for block 8), against the
target's distribution; the head of the best held-out simulated tau is kept; decoded as a
chain of 7 (`c.decode`).
"""

from specjax.configs import train_common


def get_config(arg: str | None = None):
  c = train_common.base()
  c.head = "dflash"
  c.head_kwargs.num_layers = 2
  c.head_kwargs.taps = (2, 15, 27)
  c.head_kwargs.block_size = 8
  c.head_kwargs.gamma = 4.0
  c.head_kwargs.num_anchors = 16
  c.head_kwargs.loss = "soft"
  c.decode.depth = 7
  c.decode.top_k = 1
  c.sim_depth = 7
  c.batch_size = 8
  c.steps = 300
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.data.eval_rows = 16  # the same held-out rows as configs/eagle.py
  c.eval_every = 100
  c.checkpoint_every = 20
  c.keep_best = True
  c.offline_features = "workdir/features/smollm2-135m-eagle3"  # shared with configs/eagle3.py
  if arg and arg.startswith("data="):
    c = train_common.data_fraction(c, arg)
  elif arg == "tiny":
    c = train_common.tiny(c)
    c.head_kwargs.taps = (1,)  # the tiny target has 2 layers
    c.keep_best = False  # the smoke run exports its last head
    c.head_kwargs.block_size = 4
    c.head_kwargs.num_anchors = 8
    c.decode.depth = 3
    c.sim_depth = 3
  elif arg:
    raise ValueError(f"Unknown argument {arg!r}: use nothing or 'tiny'.")
  return c
