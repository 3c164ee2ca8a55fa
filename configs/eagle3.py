"""EAGLE-3 head against SmolLM2-135M, on its self-distilled answers to the training mix.

  specjax-train --config configs/eagle3.py --workdir workdir/eagle3
  specjax-train --config configs/eagle3.py:tiny --workdir /tmp/eagle3_tiny   # ~1 minute
  specjax-train --config configs/eagle3.py:data=0.25 --workdir workdir/eagle3_f0.25

The head fuses the inputs of layers 2, 15 and 27 (of 30) through fc 3H -> H, runs one
decoder layer over concat(norm(embedding), norm(fused)) and its own LM head over the 8,192
most frequent response tokens (of 49,152); training unrolls 3 draft steps (speculators'
default; EAGLE-3 uses 7) with weights 0.8^j. `data=F` trains on that share of the rows for
that share of the steps (`train_common.data_fraction`): the tau-vs-data curve. Export for
vLLM:
  specjax-export --to-speculators workdir/eagle3/head OUT --verifier HuggingFaceTB/SmolLM2-135M
"""

from specjax.configs import train_common
from specjax.models import FINAL


def get_config(arg: str | None = None):
  c = train_common.base()
  c.head = "eagle3"
  c.head_kwargs.aux_layers = (2, 15, 27)  # EAGLE-3's (2, L//2, L-3) for L = 30
  c.head_kwargs.draft_vocab = 8192
  c.head_kwargs.ttt_steps = 3
  c.head_kwargs.decay = 0.8
  c.head_kwargs.noise = 0.0
  c.decode.depth = 3
  c.decode.top_k = 1
  c.batch_size = 8
  c.steps = 240
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.data.eval_rows = 16  # the same held-out rows as configs/eagle.py
  c.eval_every = 80
  c.checkpoint_every = 20
  c.keep_best = True  # the head of the best held-out simulated tau
  c.offline_features = "workdir/features/smollm2-135m-eagle3"
  if arg and arg.startswith("data="):
    c = train_common.data_fraction(c, arg)
  elif arg == "tiny":
    c = train_common.tiny(c)
    c.keep_best = False  # the smoke run exports its last head
    c.head_kwargs.aux_layers = (0, 1, FINAL)  # the tiny target has 2 layers
    c.head_kwargs.draft_vocab = 128  # of 512: the reduced-vocabulary path
    c.decode.depth = 3
  elif arg:
    raise ValueError(f"Unknown argument {arg!r}: use nothing, 'tiny' or 'data=F'.")
  return c
