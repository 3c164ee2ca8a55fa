"""Drafting with no training, side by side on SmolLM2-135M: AR, prompt lookup, Token
Recycling (the paper's 80-node template and a cut sized for this CPU), SuffixDecoding (as
the paper drafts, and cut by this CPU's measured step costs), SWIFT and DEL (the target's
own layers, skipped or exited early, with the papers' knobs), SpecEE (LOSSY, greedy only:
the target's forward exits early where trained predictors and the committed EAGLE-1 head's
candidates agree), a hybrid tree of Token Recycling's and SuffixDecoding's candidates,
and one of the committed EAGLE-3 head's chain with both.

  (no argument)  the README tables' protocol (`common.table_protocol`: MT-Bench and
                 HumanEval, 2 prompts each, 128 new tokens, greedy and T=1)
  greedy         the same at temperature 0 only
  repeat         a workload with repetition: 2 HumanEval problems each asked 4 times with
                 the function renamed (`humaneval_renamed`), greedy; learning drafters
                 hot-started from prompt to prompt, and SuffixDecoding cold for contrast
  specee         AR, the EAGLE-1 head's chain of 3 and SpecEE at thresholds 0.5 (the
                 reference's) and 0.9, greedy (the protocol above)

`make bench` runs the greedy and repeat sweeps. Learning drafters carry what each prompt
taught them to the next one (`method(hot_start=...)`).
"""

from specjax.configs import common

# Token Recycling's template cut to this many nodes for the CPU rows: on this CPU
# verifying 81 tokens costs ~10 AR steps, 9 tokens ~2.5 (assets/costs/cpu-2core.json).
RECYCLING_NODES = 8


def methods(costs=common.CPU_COSTS):
  """The training-free rows (configs/sweep.py shares them)."""
  return [
      common.method("prompt_lookup", drafter="prompt_lookup", depth=10),
      common.method("token_recycling", drafter="token_recycling"),
      common.method(f"token_recycling_n{RECYCLING_NODES}", drafter="token_recycling",
                    num_nodes=RECYCLING_NODES),
      common.method("suffix", drafter="suffix"),
      common.method("suffix_costed", drafter="suffix", budget=costs),
      common.method("swift", drafter="swift"),
      common.method("del", drafter="del"),
      # LOSSY and greedy-only: sweeps run it at temperature 0 and report its agreement
      # with AR. Its candidates come from the committed EAGLE-1 head (trained predictors);
      # the reference's threshold 0.5, and 0.9, which keeps SmolLM2's text fluent.
      common.method("specee", drafter="specee", checkpoint=common.SPECEE_SMOLLM2),
      common.method("specee_t0.9", drafter="specee", checkpoint=common.SPECEE_SMOLLM2,
                    threshold=0.9),
      # The training-free parts alone: Token Recycling's 80-node tree and SuffixDecoding's
      # chain, merged.
      common.method("hybrid_free", drafter="hybrid", parts=[
          {"drafter": "token_recycling"}, {"drafter": "suffix", "depth": 8}]),
      common.method("hybrid_eagle3", drafter="hybrid", parts=[
          {"drafter": "eagle3", "checkpoint": common.EAGLE3_SMOLLM2, "depth": 3},
          {"drafter": "token_recycling", "num_nodes": RECYCLING_NODES},
          {"drafter": "suffix", "depth": 8}]),
  ]


def get_config(arg: str | None = None):
  if arg not in (None, "", "greedy", "repeat", "specee"):
    raise ValueError(f"Unknown argument {arg!r}: use nothing, 'greedy', 'repeat' or "
                     "'specee'.")
  c = common.table_protocol(common.base())
  c.methods = [common.method("ar")] + methods()
  if arg in ("greedy", "repeat", "specee"):
    c.temperatures = (0.0,)
  if arg == "specee":  # SpecEE beside AR and its own candidate head drafting a chain
    c.methods = [common.method("ar"),
                 common.method("eagle_chain", drafter="eagle", checkpoint=common.EAGLE_SMOLLM2,
                               top_k=1, depth=3),
                 common.method("specee", drafter="specee", checkpoint=common.SPECEE_SMOLLM2),
                 common.method("specee_t0.9", drafter="specee",
                               checkpoint=common.SPECEE_SMOLLM2, threshold=0.9)]
  if arg == "repeat":
    c.datasets = ("humaneval_renamed",)
    c.num_prompts = 8
    c.methods = [common.method("ar"),
                 common.method("prompt_lookup", drafter="prompt_lookup", depth=10),
                 common.method("suffix", drafter="suffix"),
                 common.method("suffix_cold", drafter="suffix", hot_start=False),
                 common.method("suffix_costed", drafter="suffix", budget=common.CPU_COSTS),
                 common.method(f"token_recycling_n{RECYCLING_NODES}",
                               drafter="token_recycling", num_nodes=RECYCLING_NODES)]
  return c
