"""The demo: SmolLM2-135M with the committed heads (`assets/heads`: EAGLE-1, EAGLE-3,
Medusa-1, Hydra and Falcon; `common.trained_heads`), beside AR and prompt lookup, on 2
MT-Bench questions (both turns) + 2 HumanEval prompts, greedy, 64 new tokens.
Prints tau, tokens/s and speedup over AR, and writes the plots.

The heads' draft sizes come from `costs` (this CPU's measured verify and draft costs) and
each head's held-out acceptance (`drafters.budget`); on another device measure its own:
  python -m specjax.evaluation.bench --costs-only --out workdir/bench
  specjax-eval --config configs/demo.py --workdir workdir/demo \
      --config.costs=workdir/bench/costs.json
"""

from specjax.configs import common


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"Unknown argument {arg!r}: configs/demo.py takes none (use nothing).")
  c = common.base()
  c.costs = common.CPU_COSTS
  c.methods = [
      common.method("ar"),
      common.method("prompt_lookup", drafter="prompt_lookup", depth=4),
  ] + common.trained_heads(c.get_ref("costs"))
  c.datasets = ("mt_bench", "humaneval")
  c.num_prompts = 2
  c.cache_bucket = 512  # one compiled program per method
  c.temperatures = (0.0,)
  c.max_new_tokens = 64
  return c
