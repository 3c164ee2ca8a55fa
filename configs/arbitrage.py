"""Arbitrage's router for SmolLM2-135M, routing the committed EAGLE-1 head's draft steps.

  specjax-train --config configs/arbitrage.py --workdir workdir/arbitrage
  specjax-train --config configs/arbitrage.py:tiny=1 --workdir /tmp/arbitrage_tiny  # seconds

Draft/target step pairs from the self-distilled training rows, scored by the target's own
mean log-probability per token (train/arbitrage.py says how and where this departs from
the paper); held-out rows give precision and recall. The run writes workdir/router (decode
with `acceptance="arbitrage", acceptance_kwargs={"checkpoint": ...}`) and metrics.json; a
rerun reuses the pairs.
"""

import ml_collections

from specjax.configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.router = "linear"  # a logistic layer on the target's view of the draft step
  c.target = "smollm2-135m"
  c.dtype = "float32"
  c.drafter = "eagle"
  c.drafter_kwargs = {"checkpoint": common.EAGLE_SMOLLM2}
  c.depth = 8  # the longest step one verification covers
  c.delta = 8.0  # nats per token: about the median gap of this drafter's steps (training.md)
  c.per_row = 8
  c.data = ml_collections.ConfigDict({
      "source": "assets/distill/smollm2-135m", "seq_len": 256, "eval_rows": 24})
  c.num_rows = 48
  c.rows_per_batch = 8
  c.examples_per_call = 32
  c.examples = ""  # "" = workdir/examples
  c.fit = ml_collections.ConfigDict({"steps": 2000, "batch_size": 256, "lr": 1e-3,
                                  "l2": 0.1})  # held-out AUC peaks near 0.1 (training.md)
  c.seed = 0
  c.progress = True
  if a.tiny:
    c.target = "tiny-random"
    c.drafter, c.drafter_kwargs = "self_draft", {"layers": 1}
    c.depth, c.delta, c.per_row = 3, 0.0, 6
    c.data.source, c.data.seq_len, c.data.eval_rows = "self:64:32", 32, 8
    c.num_rows, c.rows_per_batch, c.examples_per_call = 24, 12, 16
    c.fit.steps = 200
    c.progress = False
  return c
