"""Medusa-1 heads against SmolLM2-135M, on its self-distilled answers to the training mix.

  specjax-train --config configs/medusa.py --workdir workdir/medusa
  specjax-train --config configs/medusa.py:tiny --workdir /tmp/medusa_tiny   # ~1 minute

Three residual-block heads sharing the target's frozen LM head; soft CE against the target,
head k weighted 0.8^k. Medusa-2 (the target fine-tuned jointly through LoRA; decoding then
uses the merged target, lossless relative to it only): --config.head_kwargs.lora_rank=8.
"""

from specjax.configs import train_common


def get_config(arg: str | None = None):
  c = train_common.base()
  c.head = "medusa"
  c.head_kwargs.num_heads = 3  # each head's LM-head pass costs ~1/5 of the target's forward
  c.head_kwargs.decay = 0.8
  c.head_kwargs.lora_rank = 0  # > 0: Medusa-2
  c.head_kwargs.lora_alpha = 16.0
  c.head_kwargs.lm_weight = 1.0
  c.head_kwargs.head_weight = 0.2
  c.decode.depth = 3
  c.batch_size = 8
  c.steps = 72
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 10
  c.data.eval_rows = 16  # the same held-out rows as configs/eagle.py
  c.eval_every = 36
  c.checkpoint_every = 12
  c.offline_features = "workdir/features/smollm2-135m"  # shared with configs/eagle.py
  if arg == "tiny":
    c = train_common.tiny(c)
  elif arg:
    raise ValueError(f"Unknown argument {arg!r}: use nothing or 'tiny'.")
  return c
