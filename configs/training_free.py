"""Drafting with no training, side by side on SmolLM2-135M: AR, prompt lookup, Token
Recycling (the paper's 80-node template and a cut sized for this CPU), SuffixDecoding.

The README tables' protocol (`common.table_protocol`: MT-Bench and HumanEval, 2 prompts
each, 128 new tokens, greedy and T=1). Learning drafters are hot-started from prompt to
prompt (`method(hot_start=...)`). `:greedy` runs temperature 0 only.
"""

from specjax.configs import common

# Token Recycling's template cut to this many nodes for the CPU table (`make bench`'s
# verify costs: 81 tokens cost ~10 AR steps here; see docs/methods.md for the measured
# choice).
RECYCLING_NODES = 8


def methods():
  """The training-free rows (configs/sweep.py shares them)."""
  return [
      common.method("prompt_lookup", drafter="prompt_lookup", depth=10),
      common.method("token_recycling", drafter="token_recycling"),
      common.method(f"token_recycling_n{RECYCLING_NODES}", drafter="token_recycling",
                    num_nodes=RECYCLING_NODES),
      common.method("suffix", drafter="suffix"),
  ]


def get_config(arg: str | None = None):
  if arg not in (None, "", "greedy"):
    raise ValueError(f"Unknown argument {arg!r}: use nothing or 'greedy'.")
  c = common.table_protocol(common.base())
  c.methods = [common.method("ar")] + methods()
  if arg == "greedy":
    c.temperatures = (0.0,)
  return c
