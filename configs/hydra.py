"""Hydra / Hydra++ heads against SmolLM2-135M, on its self-distilled answers.

  specjax-train --config configs/hydra.py --workdir workdir/hydra         # Hydra
  specjax-train --config configs/hydra.py:plus --workdir workdir/hydrapp  # Hydra++
  specjax-train --config configs/hydra.py:tiny --workdir /tmp/hydra_tiny  # ~1 minute
  (plus_tiny: Hydra++ on the tiny target)

Head k reads the target's last hidden state and the embeddings of the k tokens before the
one it guesses; heads share the target's frozen LM head. Hydra++ adds a decoder layer over
the target's hidden states, 4-block heads and the teacher-distillation loss.
"""

from specjax.configs import train_common


def get_config(arg: str | None = None):
  plus = arg in ("plus", "plus_tiny")
  c = train_common.base()
  c.head = "hydra"
  c.head_kwargs.num_heads = 3
  c.head_kwargs.mlp_layers = 4 if plus else 1
  c.head_kwargs.prefix_layer = plus
  c.head_kwargs.teacher = plus
  c.head_kwargs.decay = 0.8
  c.decode.depth = 3
  c.batch_size = 8
  c.steps = 120
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 10
  c.data.eval_rows = 16  # the same held-out rows as configs/eagle.py
  c.eval_every = 40
  c.checkpoint_every = 20
  c.offline_features = "workdir/features/smollm2-135m"  # shared with configs/eagle.py
  if arg in ("tiny", "plus_tiny"):
    c = train_common.tiny(c)
    c.decode.depth = 3
  elif arg not in (None, "", "plus"):
    raise ValueError(f"Unknown argument {arg!r}: use nothing, 'plus', 'tiny' or 'plus_tiny'.")
  return c
