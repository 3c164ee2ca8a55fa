"""The LOSSY acceptance rules beside the lossless one, for quality and speed, on
SmolLM2-135M with the committed EAGLE-1 head drafting a chain of 4.

  (no argument)  AR, the lossless rule, and typical (Medusa), FSD, EASD, Judge Decoding and
                 Arbitrage at two settings each; HumanEval and GSM8K (6 prompts each, so
                 every row has a task score: pass@1 by running the unit tests, exact final
                 answer), greedy and T=1 (the rules that read sampling distributions run at
                 T=1 only), 128 new tokens. The report's quality_vs_speed.png is the
                 frontier: tokens/s and tau against the task score.
  rsd            Recursive SD against today's tree verification on the same drafter and
                 node budget at T=1: the EAGLE-3 head's EAGLE-2 tree (7 nodes; stochastic
                 beam search under rsd) and a self-draft tree (the target's first 20
                 layers, 5 nodes), MT-Bench and HumanEval, 4 prompts each, 64 new tokens.

  specjax-eval --config configs/lossy.py --workdir workdir/lossy
  specjax-eval --config configs/lossy.py:rsd --workdir workdir/rsd
"""

from specjax.configs import common

SELF_TREE = [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]


def _eagle(name, acceptance=None, **acceptance_kwargs):
  return common.method(name, drafter="eagle", checkpoint=common.EAGLE_SMOLLM2, top_k=1,
                       depth=4, acceptance=acceptance, acceptance_kwargs=acceptance_kwargs)


def methods():
  """AR, the lossless EAGLE chain, and each LOSSY rule at two settings."""
  return [
      common.method("ar"),
      _eagle("eagle_lossless"),
      _eagle("typical", "typical"),  # Medusa's defaults: eps 0.09, delta 0.3
      _eagle("typical_lenient", "typical", eps=0.3, delta=0.6),
      _eagle("fsd_js0.3", "fuzzy", divergence="js", threshold=0.3),
      _eagle("fsd_js0.6", "fuzzy", divergence="js", threshold=0.6),
      _eagle("easd_h1", "easd", entropy=1.0),
      _eagle("easd_h2", "easd", entropy=2.0),
      _eagle("judge_0.7", "judge", checkpoint=common.JUDGE_SMOLLM2, threshold=0.7),
      _eagle("judge_0.5", "judge", checkpoint=common.JUDGE_SMOLLM2, threshold=0.5),
      _eagle("arbitrage_0.3", "arbitrage", checkpoint=common.ROUTER_SMOLLM2, threshold=0.3),
      _eagle("arbitrage_0.7", "arbitrage", checkpoint=common.ROUTER_SMOLLM2, threshold=0.7),
  ]


def get_config(arg: str | None = None):
  if arg not in (None, "", "rsd"):
    raise ValueError(f"Unknown argument {arg!r}: use nothing or 'rsd'.")
  c = common.base()
  if arg == "rsd":
    c.methods = [common.method("ar")]
    for name, kw in (
        ("eagle3_tree", dict(drafter="eagle3", checkpoint=common.EAGLE3_SMOLLM2, top_k=3,
                             depth=3, num_nodes=7)),
        ("self_draft_tree", dict(drafter="self_draft", layers=20, tree=SELF_TREE))):
      c.methods += [common.method(name, **kw),
                    common.method(f"{name}_rsd", acceptance="rsd", **kw)]
    c.datasets = ("mt_bench", "humaneval")
    c.num_prompts = 4
    c.temperatures = (1.0,)
    c.max_new_tokens = 64
    return c
  c.methods = methods()
  c.datasets = ("humaneval", "gsm8k")
  c.num_prompts = 6
  c.temperatures = (0.0, 1.0)
  c.max_new_tokens = 128
  return c
