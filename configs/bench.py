"""The README's speculative-decoding benchmark on SmolLM2-135M.

Batch 1, 2 MT-Bench questions (both turns) + 2 HumanEval prompts, 128 new tokens, greedy
and sampled (T=1): AR, prompt lookup, the committed EAGLE head as a chain and as an
EAGLE-2 dynamic tree and the committed Medusa-1 heads, their draft sizes chosen from
`costs` (`drafters.budget`). About 25 minutes on a 2-core CPU; `:heads` leaves out
prompt lookup (AR and the heads only). `configs/sweep.py` adds the self-drafters and
transformers' peers (`peers=("hf_ar", "hf_prompt_lookup")`).
"""

from specjax.configs import common


def get_config(arg: str | None = None):
  if arg not in (None, "", "heads"):
    raise ValueError(f"Unknown argument {arg!r}: use nothing or 'heads'.")
  c = common.base()
  c.costs = common.CPU_COSTS  # what the heads' draft sizes are chosen from
  lookup = [] if arg == "heads" else [
      common.method("prompt_lookup_k4", drafter="prompt_lookup", depth=4),
      common.method("prompt_lookup_k10", drafter="prompt_lookup", depth=10)]
  c.methods = [common.method("ar")] + lookup + common.trained_heads(c.get_ref("costs"))
  return common.table_protocol(c)
