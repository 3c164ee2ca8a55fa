"""The README's speculative-decoding benchmark on SmolLM2-135M.

Batch 1, MT-Bench (both turns) + HumanEval, 128 new tokens, greedy and sampled (T=1):
AR, prompt lookup, the layer-truncated self-drafter (SVIP), the committed EAGLE head as a
chain and as an EAGLE-2 dynamic tree and the committed Medusa-1 heads, their draft sizes
chosen from `costs` (`drafters.budget`); transformers' AR and assisted generation (prompt
lookup) as peers on the same weights and prompts. About 40 minutes on a 2-core CPU.
"""

from specjax.configs import common


def get_config(arg: str | None = None):
  del arg
  c = common.base()
  c.self_draft_layers = 24
  layers = c.get_ref("self_draft_layers")
  c.costs = common.CPU_COSTS  # what the heads' draft sizes are chosen from
  c.methods = [
      common.method("ar"),
      common.method("prompt_lookup_k4", drafter="prompt_lookup", num_draft=4),
      common.method("prompt_lookup_k10", drafter="prompt_lookup", num_draft=10),
      common.method("self_draft_svip", drafter="self_draft", num_draft=3, layers=layers,
                    stop="svip"),
  ] + common.trained_heads(c.get_ref("costs"))
  c.datasets = ("mt_bench", "humaneval")
  c.num_prompts = 3
  c.temperatures = (0.0, 1.0)
  c.max_new_tokens = 128
  c.warmup = 1
  c.cache_bucket = 512
  c.peers = ("hf_ar", "hf_prompt_lookup")
  return c
