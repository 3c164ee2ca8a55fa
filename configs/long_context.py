"""Speculation against context length on SmolLM2-135M: the long-context prompt sets
(`long_2k`, `long_4k`, `long_7k`: package documentation with a task, about 2k, 4k and 7k
tokens) with AR, prompt lookup, the committed short-context heads, partial-KV
self-drafting (the target drafting over 4 sinks and a 256-token window; lossless), the
LongSpec head (a bounded draft cache, cross-attention into the target's last layer;
lossless) and SpecPV (EAGLE-3 drafts, verification against sinks + 8 retrieved blocks of
32 + a 256-token window, in full every 4th step; LOSSY: its agreement with AR is in the
summary).

  specjax-eval --config configs/long_context.py --workdir workdir/long_context

The summary gives tau and speedup per dataset, that is per length. The heads were trained
on rows of at most 512 tokens; what happens to their tau as the context grows is the
question this sweep asks. Greedy, 2 prompts per length, 64 new tokens.
"""

from specjax.configs import common


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"Unknown argument {arg!r}: configs/long_context.py takes none (use "
                     "nothing).")
  c = common.base()
  c.methods = [
      common.method("ar"),
      common.method("prompt_lookup", drafter="prompt_lookup", depth=4),
      common.method("eagle3_k3", drafter="eagle3", checkpoint=common.EAGLE3_SMOLLM2,
                    top_k=1, depth=3),
      common.method("eagle_k3", drafter="eagle", checkpoint=common.EAGLE_SMOLLM2, top_k=1,
                    depth=3),
      common.method("partial_kv_k4", drafter="partial_kv", depth=4, sinks=4, window=256),
      common.method("longspec_k4", drafter="longspec", checkpoint=common.LONGSPEC_SMOLLM2,
                    depth=4),
      common.method("specpv_k3", drafter="specpv", checkpoint=common.EAGLE3_SMOLLM2, top_k=1,
                    depth=3, sinks=16, block=32, retrieve=8, window=256, period=4),
  ]
  c.datasets = ("long_2k", "long_4k", "long_7k")
  c.num_prompts = 2
  c.temperatures = (0.0,)
  c.seeds = (0,)
  c.max_new_tokens = 64
  c.warmup = 0
  c.peers = ()
  return c
