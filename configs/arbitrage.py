"""Arbitrage's router for SmolLM2-135M, routing the committed EAGLE-1 head's draft steps.

  specjax-train --config configs/arbitrage.py --workdir workdir/arbitrage
  specjax-train --config configs/arbitrage.py:tiny=1 --workdir /tmp/arbitrage_tiny  # seconds

Draft/target step pairs from the self-distilled training rows, scored by the target's own
mean log-probability per token (train/arbitrage.py says how and where this departs from
the paper); held-out rows give precision and recall. The run writes workdir/router (decode
with `acceptance="arbitrage", acceptance_kwargs={"checkpoint": ...}`) and metrics.json; a
rerun reuses the pairs.
"""

from specjax.configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, tiny=False)
  c = common.rule_trainer(a.tiny)
  c.router = "linear"  # a logistic layer on the target's view of the draft step
  c.drafter = "eagle"
  c.drafter_kwargs = {"checkpoint": common.EAGLE_SMOLLM2}
  c.depth = 8  # the longest step one verification covers
  c.delta = 8.0  # nats per token: about the median gap of this drafter's steps (training.md)
  c.per_row = 8
  if a.tiny:
    c.drafter, c.drafter_kwargs = "self_draft", {"layers": 1}
    c.depth, c.delta, c.per_row = 3, 0.0, 6
  return c
