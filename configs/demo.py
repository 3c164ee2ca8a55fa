"""Demo sweep on SmolLM2-135M: AR, prompt lookup and a layer-truncated self-draft on
2 MT-Bench questions (both turns) + 2 HumanEval prompts, greedy, 64 new tokens
(about 4 minutes on a 2-core CPU, most of it compiling).

Try another self-draft depth with --config.self_draft_layers=N.
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
  c.self_draft_layers = 24  # of SmolLM2-135M's 30: fewer layers accept almost nothing
  c.methods = [
      common.method("ar"),
      common.method("prompt_lookup", drafter="prompt_lookup", num_draft=4),
      common.method("self_draft", drafter="self_draft", num_draft=3, stop="svip",
                    layers=c.get_ref("self_draft_layers")),
  ]
  c.datasets = ("mt_bench", "humaneval")
  c.num_prompts = 2
  c.pad_to = 256  # one compiled shape per method
  c.temperatures = (0.0,)
  c.max_new_tokens = 64
  return c
