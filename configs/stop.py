"""Learned stop policies (SpecDec++, PACER) for a chain drafter of SmolLM2-135M.

  specjax-train --config configs/stop.py:specdecpp --workdir workdir/specdecpp_eagle3
  specjax-train --config configs/stop.py:pacer --workdir workdir/pacer_eagle3
  specjax-train --config configs/stop.py:specdecpp,drafter=self_draft --workdir ...
  specjax-train --config configs/stop.py:pacer,tiny=1 --workdir /tmp/pacer_tiny  # a minute

Labels come from decoding the self-distilled training rows' prompts (never the evaluation
sets) with the drafter at its full length, greedy and sampled; the held-out rows' prompts
give the reported AUC and the simulated speedups at the threshold calibrated to
`calibrate.costs`. The run writes workdir/predictor and workdir/metrics.json; the
labels (the expensive part, resumable) go to workdir/stop_labels/DRAFTER, which the
SpecDec++ and PACER runs of one drafter share.
"""

import ml_collections

from specjax.configs import common


def get_config(arg: str | None = None):
  kind, _, rest = (arg or "").partition(",")
  if kind not in ("specdecpp", "pacer"):
    raise ValueError(f"Unknown predictor {kind!r}: use 'specdecpp' or 'pacer' (then "
                     "',drafter=eagle3|self_draft', ',tiny=1').")
  a = common.parse_arg(rest, drafter="eagle3", tiny=False)
  c = ml_collections.ConfigDict()
  c.stop_predictor = kind
  c.target = "smollm2-135m"
  c.dtype = "float32"
  if a.drafter == "eagle3":
    c.drafter, c.drafter_kwargs = "eagle3", {"checkpoint": common.EAGLE3_SMOLLM2, "depth": 8}
  elif a.drafter == "self_draft":
    c.drafter, c.drafter_kwargs = "self_draft", {"layers": 20, "depth": 8}
  else:
    raise ValueError(f"Unknown drafter {a.drafter!r}: use 'eagle3' or 'self_draft'.")
  # Where the collected labels go: shared by the SpecDec++ and PACER runs of one drafter
  # (collecting is the expensive part); "" = the run's own workdir/labels.
  c.labels = f"workdir/stop_labels/{a.drafter}"
  c.data = ml_collections.ConfigDict({
      "source": "assets/distill/smollm2-135m", "seq_len": 512, "eval_rows": 16})
  c.num_prompts = 64  # training prompts decoded for labels
  c.temperatures = (0.0, 1.0)
  c.max_new_tokens = 128
  c.batch_size = 8
  # PACER's block: 2, since on a CPU the best fixed length is 1-2 drafts (verification
  # cost grows with its tokens) and a block verifier can only stop at multiples of it.
  c.block = 2
  # Thresholds are picked by simulating each on the training prompts' chains under a cost
  # file (`make bench`'s costs.json; "" = keep the defaults). draft_ms: one draft forward
  # (0 = the file's, an EAGLE head's).
  c.calibrate = ml_collections.ConfigDict({"costs": "assets/costs/cpu-2core.json",
                                           "draft_ms": 0.0})
  c.fit = ml_collections.ConfigDict({
      "steps": 1000, "batch_size": 256, "lr": 1e-3, "reject_weight": 6.0})
  c.seed = 0
  c.progress = True
  if a.drafter == "self_draft":
    # A draft forward here costs 73% of a verification (20 of 30 layers + the LM head, by
    # weights: ~0.73 x the cost file's one-token 40.0 ms), so this CPU wants short chains:
    # a cap of 4, and half the prompts and tokens (collecting at 8 x 128 took ~2 h here).
    c.drafter_kwargs["depth"] = 4
    c.num_prompts, c.max_new_tokens = 32, 64
    c.calibrate.draft_ms = 0.73 * 40.0
  if a.tiny:
    c.target = "tiny-random"
    c.labels = ""
    c.drafter, c.drafter_kwargs = "self_draft", {"layers": 1, "depth": 6}
    c.data.source, c.data.seq_len, c.data.eval_rows = "self:96:48", 48, 32
    c.max_new_tokens = 40
    c.batch_size = 32
    c.block = 2
    c.fit.steps = 1000
    c.fit.lr = 3e-3
    c.progress = False
  return c
