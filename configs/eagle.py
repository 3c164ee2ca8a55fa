"""EAGLE-1 head against SmolLM2-135M, on its self-distilled answers to the training mix.

  specjax-train --config configs/eagle.py --workdir workdir/eagle
  specjax-train --config configs/eagle.py:tiny --workdir /tmp/eagle_tiny   # ~1 minute
  specjax-train --config configs/eagle.py:fspad --workdir workdir/fspad   # FSPAD's options

The head: fc(concat(embed, feature)) + one decoder layer + the target's frozen LM head.
EAGLE-1 trains with lr 3e-5 on ShareGPT for days of GPU time; the committed head
(assets/heads/eagle-smollm2-135m) is this config as is: about an hour on a 2-core CPU,
a larger rate for a short schedule.
"""

from specjax.configs import train_common


def get_config(arg: str | None = None):
  c = train_common.base()
  c.head = "eagle"
  c.head_kwargs.noise = 0.2  # uniform feature noise, U(-0.1, 0.1)
  c.head_kwargs.ce_weight = 0.1
  c.head_kwargs.init_identity = True  # start as g = f (a random init wastes its first steps)
  c.decode.depth = 3
  c.decode.top_k = 1
  c.batch_size = 8
  c.steps = 240
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.data.eval_rows = 16
  c.eval_every = 80
  c.checkpoint_every = 20
  c.offline_features = "workdir/features/smollm2-135m"  # shared with configs/medusa.py
  if arg in ("fspad", "fspad_tiny"):  # feature sampling + partial alignment distillation
    c.head_kwargs.feature_sampling = True
    c.head_kwargs.partial_alignment = True
    arg = arg.removeprefix("fspad").removeprefix("_") or None
  if arg == "tiny":
    c = train_common.tiny(c)
    c.decode.depth = 3
    # The tiny random target nearly repeats its features: an identity head would start
    # near its best and leave the smoke run nothing to learn.
    c.head_kwargs.init_identity = False
  elif arg:
    raise ValueError(f"Unknown argument {arg!r}: use nothing, 'tiny', 'fspad' or "
                     "'fspad_tiny'.")
  return c
