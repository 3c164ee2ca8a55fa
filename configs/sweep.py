"""The full sweep on SmolLM2-135M: three datasets, greedy and sampled decoding, the
training-free drafters, draft budgets, stop policies, a lossy acceptance rule, and the
transformers peers.

Hours on a CPU; on an accelerator drop the peers (--config.peers="()").
"""

from specjax.configs import common, training_free

BUDGETS = (2, 4, 8)


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"Unknown argument {arg!r}: configs/sweep.py takes none (use nothing).")
  c = common.base()
  c.self_draft_layers = 20
  layers = c.get_ref("self_draft_layers")
  c.methods = [
      common.method("ar"),
      *training_free.methods(),  # prompt lookup, Token Recycling, SuffixDecoding, hybrid
      *[common.method(f"self_draft_k{k}", drafter="self_draft", depth=k, layers=layers)
        for k in BUDGETS],
      common.method("self_draft_confidence", drafter="self_draft", depth=8,
                    layers=layers, stop="confidence", stop_kwargs={"threshold": 0.4}),
      common.method("self_draft_svip", drafter="self_draft", depth=8, layers=layers,
                    stop="svip"),
      common.method("self_draft_typical", drafter="self_draft", depth=4, layers=layers,
                    acceptance="typical"),
  ]
  c.datasets = ("mt_bench", "humaneval", "gsm8k")
  c.num_prompts = 10
  c.temperatures = (0.0, 1.0)
  c.seeds = (0,)
  c.max_new_tokens = 128
  c.warmup = 1
  c.peers = ("hf_ar", "hf_prompt_lookup")
  return c
