"""Block-parallel drafters beside EAGLE-3, and DSpark's draft length beside the learned
stop policies, on SmolLM2-135M (the committed heads).

  specjax-eval --config configs/block_drafters.py --workdir workdir/block_drafters
  specjax-eval --config configs/block_drafters.py:mt_bench --workdir workdir/block_mt

Methods: AR; EAGLE-3 as a chain of 3 (its trained depth) and of 7; DFlash as a chain of 7
(one block) and as a tree of each slot's top candidates (the chain plus second choices
at slots 1 and 2, 9 nodes); DSpark's chain of up to 7 cut by its confidences at
thresholds 0 (never), 0.1, 0.2, 0.3, 0.5 and 0.7; EAGLE-3's chain of 8 cut by SpecDec++, PACER, SVIP
and confidence (configs/stop_sweep.py's predictors). The summary's `drafted/step` column
is each policy's length decision. Default: MT-Bench and HumanEval, 2 prompts each,
greedy, 128 new tokens; `:mt_bench` is the tau check on 10 MT-Bench questions (both
turns), greedy.
"""

from specjax.configs import common
from specjax.configs import stop_sweep

DFLASH_TREE = [(0,), (1,), (0, 0), (0, 1)] + [(0,) * d for d in range(3, 8)]


def get_config(arg: str | None = None):
  if arg not in (None, "", "mt_bench"):
    raise ValueError(f"Unknown argument {arg!r}: use nothing or 'mt_bench'.")
  c = common.base()
  eagle3 = lambda name, depth, **kw: common.method(
      name, drafter="eagle3", checkpoint=common.EAGLE3_SMOLLM2, top_k=1, depth=depth, **kw)
  c.methods = [
      common.method("ar"),
      eagle3("eagle3_k3", 3), eagle3("eagle3_k7", 7),
      common.method("dflash_k7", drafter="dflash", checkpoint=common.DFLASH_SMOLLM2, depth=7),
      common.method("dflash_tree", drafter="dflash", checkpoint=common.DFLASH_SMOLLM2,
                    tree=DFLASH_TREE),
  ] + [common.method(f"dspark_c{t:g}", drafter="dspark", checkpoint=common.DSPARK_SMOLLM2,
                     depth=7, threshold=t) for t in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)] + [
      eagle3("eagle3_k8_specdecpp", 8, stop="specdecpp",
             stop_kwargs={"checkpoint": stop_sweep.predictor("specdecpp", "eagle3")}),
      eagle3("eagle3_k8_pacer", 8, stop="pacer",
             stop_kwargs={"checkpoint": stop_sweep.predictor("pacer", "eagle3")}),
      eagle3("eagle3_k8_svip", 8, stop="svip"),
      eagle3("eagle3_k8_confidence", 8, stop="confidence", stop_kwargs={"threshold": 0.4}),
  ]
  c = common.table_protocol(c)
  c.temperatures = (0.0,)
  if arg == "mt_bench":
    c.methods = [m for m in c.methods if m.name in ("ar", "eagle3_k3", "dflash_k7",
                                                    "dflash_tree", "dspark_c0")]
    c.datasets = ("mt_bench",)
    c.num_prompts = 10
  return c
