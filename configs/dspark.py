"""DSpark head against SmolLM2-135M: configs/dflash.py's backbone and data, plus a rank-256
Markov head and a confidence head that cuts the chain.

  specjax-train --config configs/dspark.py --workdir workdir/dspark
  specjax-train --config configs/dspark.py:tiny --workdir /tmp/dspark_tiny   # ~1 minute

Loss 0.1 x CE + 0.9 x L1(draft, target) + 1.0 x BCE(confidence, 1 - TV) (DeepSpec's
weights); decoded as a chain of up to 7, cut where the cumulative product of confidences
falls under 0.1 (`c.decode.threshold`; the committed head's run saved 0.5, which cuts
almost every draft: docs/benchmarks.md#block-drafters-and-dsparks-draft-length). The
committed head is this run cut to rank 64 afterwards (`python -m specjax.training.truncate`;
docs/heads.md#dspark).
"""

from specjax.configs import dflash


def get_config(arg: str | None = None):
  c = dflash.get_config(arg)
  c.head = "dspark"
  del c.head_kwargs["loss"]  # DSpark's three-term loss
  c.head_kwargs.markov_rank = 256
  c.head_kwargs.ce_weight = 0.1
  c.head_kwargs.tv_weight = 0.9
  c.head_kwargs.conf_weight = 1.0
  c.decode.threshold = 0.1
  del c.decode["top_k"]  # chains only
  if arg == "tiny":
    c.head_kwargs.markov_rank = 16
  return c
