"""Judge Decoding's judge for SmolLM2-135M, judging the committed EAGLE-1 head's tokens.

  specjax-train --config configs/judge.py --workdir workdir/judge
  specjax-train --config configs/judge.py:tiny=1 --workdir /tmp/judge_tiny  # seconds

Labels by resynchronisation on the self-distilled training rows (train/judge.py says how
and why); held-out rows give precision and recall. The run writes workdir/judge (decode
with `acceptance="judge", acceptance_kwargs={"checkpoint": ...}`) and metrics.json; a
rerun reuses the examples.
"""

import ml_collections

from specjax.configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.judge = "linear"  # one linear layer on the target's final hidden state (the paper's)
  c.target = "smollm2-135m"
  c.dtype = "float32"
  c.head = common.EAGLE_SMOLLM2  # whose draft tokens are judged ("" = self-draft)
  c.draft_layers = 20  # self-draft's layers when head is ""
  c.horizon = 16  # greedy tokens the target writes after the draft token
  c.anchor = 6  # its last tokens that must appear in the target's own text
  c.slack = 8  # how far past the horizon the target's own text is searched
  c.per_row = 8  # examples per training row, at random mismatch positions
  # The rows' first 256 tokens: every example costs a forward of its prefix and a decode.
  c.data = ml_collections.ConfigDict({
      "source": "assets/distill/smollm2-135m", "seq_len": 256, "eval_rows": 24})
  c.num_rows = 48
  c.rows_per_batch = 8  # rows per example file
  c.examples_per_call = 32  # continuations decoded together
  c.examples = ""  # "" = workdir/examples
  c.fit = ml_collections.ConfigDict({"steps": 2000, "batch_size": 256, "lr": 1e-3,
                                  "l2": 0.1})  # held-out AUC peaks near 0.1 (training.md)
  c.seed = 0
  c.progress = True
  if a.tiny:
    c.target = "tiny-random"
    c.head, c.draft_layers = "", 1
    c.horizon, c.anchor, c.slack, c.per_row = 4, 2, 4, 6
    c.data.source, c.data.seq_len, c.data.eval_rows = "self:64:32", 32, 8
    c.num_rows, c.rows_per_batch, c.examples_per_call = 24, 12, 16
    c.fit.steps = 200
    c.progress = False
  return c
