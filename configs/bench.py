"""The README's speculative-decoding benchmark on SmolLM2-135M (issue [2 of 3]).

Greedy, batch 1, MT-Bench (both turns) + HumanEval, 128 new tokens: AR, prompt lookup and
the layer-truncated self-drafter, with transformers' AR and assisted generation (prompt
lookup) as peers on the same weights and prompts. About 10 minutes on a 2-core CPU.
"""

import importlib.util
import os

# Config files are loaded by path, not as a package: load the shared pieces the same way.
_spec = importlib.util.spec_from_file_location(
    "specjax_configs_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg: str | None = None):
  del arg
  c = common.base()
  c.self_draft_layers = 24
  layers = c.get_ref("self_draft_layers")
  c.methods = [
      common.method("ar"),
      common.method("prompt_lookup_k4", drafter="prompt_lookup", num_draft=4),
      common.method("prompt_lookup_k10", drafter="prompt_lookup", num_draft=10),
      common.method("self_draft_svip", drafter="self_draft", num_draft=3, layers=layers,
                    stop="svip"),
  ]
  c.datasets = ("mt_bench", "humaneval")
  c.num_prompts = 3
  c.temperatures = (0.0,)
  c.max_new_tokens = 128
  c.warmup = 1
  c.pad_to = 256
  c.peers = ("hf_ar", "hf_prompt_lookup")
  return c
