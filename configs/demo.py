"""The demo: SmolLM2-135M with the committed EAGLE head (`assets/heads`), beside AR and
prompt lookup, on 2 MT-Bench questions (both turns) + 2 HumanEval prompts, greedy, 64 new
tokens. Prints tau, tokens/s and speedup over AR, and writes the plots.

Try another draft depth with --config.eagle_depth=N.
"""

from specjax.configs import common


def get_config(arg: str | None = None):
  del arg
  c = common.base()
  c.eagle_depth = 3
  c.methods = [
      common.method("ar"),
      common.method("prompt_lookup", drafter="prompt_lookup", num_draft=4),
      common.method("eagle_chain", drafter="eagle", checkpoint=common.EAGLE_SMOLLM2,
                    depth=c.get_ref("eagle_depth"), top_k=1),
      # EAGLE-2: the same head growing a dynamic tree (the best 7 of top-3 expansions).
      common.method("eagle2_tree", drafter="eagle", checkpoint=common.EAGLE_SMOLLM2,
                    depth=4, top_k=3, num_nodes=7),
  ]
  c.datasets = ("mt_bench", "humaneval")
  c.num_prompts = 2
  c.cache_bucket = 512  # one compiled program per method
  c.temperatures = (0.0,)
  c.max_new_tokens = 64
  return c
