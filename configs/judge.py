"""Judge Decoding's judge for SmolLM2-135M, judging the committed EAGLE-1 head's tokens.

  specjax-train --config configs/judge.py --workdir workdir/judge
  specjax-train --config configs/judge.py:tiny=1 --workdir /tmp/judge_tiny  # seconds

Labels by resynchronisation on the self-distilled training rows (train/judge.py says how
and why); held-out rows give precision and recall. The run writes workdir/judge (decode
with `acceptance="judge", acceptance_kwargs={"checkpoint": ...}`) and metrics.json; a
rerun reuses the examples.
"""

from specjax.configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, tiny=False)
  c = common.rule_trainer(a.tiny)
  c.judge = "linear"  # one linear layer on the target's final hidden state (the paper's)
  c.head = common.EAGLE_SMOLLM2  # whose draft tokens are judged ("" = self-draft)
  c.draft_layers = 20  # self-draft's layers when head is ""
  c.horizon = 16  # greedy tokens the target writes after the draft token
  c.anchor = 6  # its last tokens that must appear in the target's own text
  c.slack = 8  # how far past the horizon the target's own text is searched
  c.per_row = 8  # examples per training row, at random mismatch positions
  if a.tiny:
    c.head, c.draft_layers = "", 1
    c.horizon, c.anchor, c.slack, c.per_row = 4, 2, 4, 6
  return c
