"""A request stream on SmolLM2-135M through `specjax.serve`: static batches against
continuous batching, AR against speculation.

  python -m specjax.evaluation.stream --config configs/stream.py --workdir workdir/stream
  python -m specjax.evaluation.stream --config configs/stream.py:tiny --workdir /tmp/s

64 requests (MT-Bench first turns, HumanEval and GSM8K prompts of at most 300 tokens,
budgets 16-128 tokens) arriving at 4 per second, more than 8 slots serve, so a queue
forms and throughput is the engine's. `:tiny` is the random tiny target, 12 requests
(seconds; what the test runs).
"""

import ml_collections

from specjax.configs import common


def get_config(arg: str | None = None):
  if arg not in (None, "", "tiny"):
    raise ValueError(f"Unknown argument {arg!r}: use nothing or 'tiny'.")
  c = ml_collections.ConfigDict()
  c.target = "smollm2-135m"
  c.dtype = "float32"
  c.datasets = ("mt_bench", "humaneval", "gsm8k")
  c.num_requests = 64
  c.max_prompt_tokens = 300
  c.min_new_tokens = 16
  c.max_new_tokens = 128
  c.rate = 4.0  # requests per second (0: all at once)
  c.arrivals_file = ""  # a JSON list of arrival seconds, in place of the Poisson process
  c.slots = 8
  c.max_len = 0  # cache slots per row; 0: the longest prompt + budget + draft room
  c.temperature = 0.0
  c.seed = 0
  c.policies = ("static", "fifo", "exspec")
  c.exspec_pool = 48  # EXSPEC's pool of waiting sequences it groups from
  c.progress = True
  c.methods = [
      common.method("ar"),
      common.method("prompt_lookup", drafter="prompt_lookup", depth=4),
      common.method("eagle3_k3", drafter="eagle3", checkpoint=common.EAGLE3_SMOLLM2,
                    top_k=1, depth=3),
  ]
  if arg == "tiny":
    c.target = "tiny-random"
    c.datasets = ("mt_bench",)
    c.num_requests, c.max_prompt_tokens = 12, 120
    c.min_new_tokens, c.max_new_tokens = 2, 12
    c.rate, c.slots = 0.0, 3
    c.policies = ("static", "fifo")
    c.progress = False
    c.methods = [common.method("ar"),
                 common.method("prompt_lookup", drafter="prompt_lookup", depth=4)]
  return c
