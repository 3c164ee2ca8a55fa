"""Issue 10's table: draft-length policies on one drafter, same prompts, same run.

For the EAGLE-3 head (a chain of up to 8) and the 20-layer self-drafter (up to 4, the cap
its predictors were trained at): fixed K in (1, 2, 4, 8) up to the cap, confidence, SVIP,
and the trained SpecDec++ and PACER predictors committed in assets/stop (`specjax-train
--config configs/stop.py:KIND,drafter=D`, thresholds calibrated to this CPU's costs).
MT-Bench and HumanEval, greedy and T=1, batch 1, 128 new tokens; one prompt of each (both
turns of MT-Bench's): 16 methods x 3 prompt-turns x 2 temperatures = 96 rows, about an
hour on the 2-core CPU, much of it compiling 16 programs per cache size and temperature.
"""

import os

from specjax.configs import common

STOP = os.path.normpath(os.path.join(common.HEADS, "..", "stop"))
FIXED = (1, 2, 4, 8)


def predictor(kind: str, drafter: str) -> str:
  return os.path.join(STOP, f"{kind}-{drafter}-smollm2-135m")


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"Unknown argument {arg!r}: configs/stop_sweep.py takes none (use nothing).")
  c = common.base()
  c.methods = [common.method("ar")]
  for name, drafter, cap, kw in (
      ("eagle3", "eagle3", 8, {"checkpoint": common.EAGLE3_SMOLLM2, "top_k": 1}),
      ("self_draft", "self_draft", 4, {"layers": 20})):
    one = lambda label, k, **m: common.method(f"{name}_{label}", drafter=drafter, depth=k,
                                              **kw, **m)
    c.methods += [one(f"k{k}", k) for k in FIXED if k <= cap]
    c.methods += [
        one("confidence", cap, stop="confidence", stop_kwargs={"threshold": 0.4}),
        one("svip", cap, stop="svip"),
        one("specdecpp", cap, stop="specdecpp",
            stop_kwargs={"checkpoint": predictor("specdecpp", name)}),
        one("pacer", cap, stop="pacer", stop_kwargs={"checkpoint": predictor("pacer", name)}),
    ]
  c = common.table_protocol(c)
  c.num_prompts = 1
  return c
