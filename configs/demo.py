"""Demo sweep on SmolLM2-135M: AR, prompt lookup and a layer-truncated self-draft (chain
and tree) on
2 MT-Bench questions (both turns) + 2 HumanEval prompts, greedy, 64 new tokens
(about 4 minutes on a 2-core CPU, most of it compiling).

Try another self-draft depth with --config.self_draft_layers=N.
"""

from specjax.configs import common


def get_config(arg: str | None = None):
  del arg
  c = common.base()
  c.self_draft_layers = 24  # of SmolLM2-135M's 30: fewer layers accept almost nothing
  c.methods = [
      common.method("ar"),
      common.method("prompt_lookup", drafter="prompt_lookup", num_draft=4),
      common.method("self_draft", drafter="self_draft", num_draft=3, stop="svip",
                    layers=c.get_ref("self_draft_layers")),
      # The same self-drafter branching into a small top-k tree (training-free).
      common.method("self_draft_tree", drafter="self_draft", layers=c.get_ref("self_draft_layers"),
                    tree=[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]),
  ]
  c.datasets = ("mt_bench", "humaneval")
  c.num_prompts = 2
  c.cache_bucket = 512  # one compiled program per method
  c.temperatures = (0.0,)
  c.max_new_tokens = 64
  return c
