"""SpecEE's exit predictors for SmolLM2-135M, candidates from the committed EAGLE-1 head.

  specjax-train --config configs/specee.py --workdir workdir/specee
  specjax-train --config configs/specee.py:tiny=1 --workdir /tmp/specee_tiny  # seconds

Examples come from teacher-forced forwards over the self-distilled training rows (never
an evaluation set); the held-out rows give the reported precision, recall and simulated
exits. The run writes workdir/predictor (decode with `drafter="specee",
checkpoint=workdir/predictor`) and workdir/metrics.json; a rerun reuses the examples.
"""

import ml_collections

from specjax.configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.exit_predictor = "specee"
  c.target = "smollm2-135m"
  c.dtype = "float32"
  c.head = common.EAGLE_SMOLLM2  # an EAGLE-1 head: the candidates
  c.candidates = 4  # the paper's
  c.static_layers = 8  # the reference's static set on a 32-layer target has 8 layers
  c.threshold = 0.5  # the reference's
  c.data = ml_collections.ConfigDict({
      "source": "assets/distill/smollm2-135m", "seq_len": 512, "eval_rows": 16})
  c.num_rows = 96  # training rows (about 13k response positions x 29 exit layers)
  c.batch_size = 2  # rows per forward (every layer's full LM head is materialised)
  c.examples = ""  # "" = workdir/examples
  c.fit = ml_collections.ConfigDict({"steps": 3000, "batch_size": 1024, "lr": 1e-3})
  c.seed = 0
  c.progress = True
  if a.tiny:
    c.target = "tiny-random"
    c.head = ""  # the caller passes a head folder made for tiny-random
    c.static_layers = 1
    c.data.source, c.data.seq_len, c.data.eval_rows = "self:64:32", 32, 16
    c.num_rows, c.batch_size = 48, 16
    c.fit.steps = 300
    c.progress = False
  return c
