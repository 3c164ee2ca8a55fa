"""Shared config pieces: the sweep defaults every config starts from, `method()`, and the
argument parser of `get_config(arg)` ("key=value,key=value")."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

# Trained heads committed with the repo (see the README: what they were trained on).
HEADS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "assets", "heads"))
EAGLE_SMOLLM2 = os.path.join(HEADS, "eagle-smollm2-135m")
MEDUSA_SMOLLM2 = os.path.join(HEADS, "medusa-smollm2-135m")
EAGLE3_SMOLLM2 = os.path.join(HEADS, "eagle3-smollm2-135m")
HYDRA_SMOLLM2 = os.path.join(HEADS, "hydra-smollm2-135m")
FALCON_SMOLLM2 = os.path.join(HEADS, "falcon-smollm2-135m")
DFLASH_SMOLLM2 = os.path.join(HEADS, "dflash-smollm2-135m")
DSPARK_SMOLLM2 = os.path.join(HEADS, "dspark-smollm2-135m")
LONGSPEC_SMOLLM2 = os.path.join(HEADS, "longspec-smollm2-135m")
# SpecEE's exit predictors for SmolLM2-135M (configs/specee.py; candidates from EAGLE_SMOLLM2).
SPECEE_SMOLLM2 = os.path.normpath(os.path.join(HEADS, "..", "specee", "smollm2-135m"))
# Judge Decoding's judge and Arbitrage's router for SmolLM2-135M (configs/judge.py,
# configs/arbitrage.py; both read the EAGLE-1 head's drafts).
JUDGE_SMOLLM2 = os.path.normpath(os.path.join(HEADS, "..", "judge", "smollm2-135m"))
ROUTER_SMOLLM2 = os.path.normpath(os.path.join(HEADS, "..", "arbitrage", "smollm2-135m"))
# Verify and draft costs measured on this project's 2-core CPU (`python -m
# specjax.evaluation.bench --costs-only`): what `budget=` sizes drafts from. On another
# device, measure its own and pass --config.costs=workdir/bench/costs.json.
CPU_COSTS = os.path.normpath(os.path.join(HEADS, "..", "costs", "cpu-2core.json"))


def method(name: str, drafter: str = "ar", *, stop: str | None = None,
           stop_kwargs: dict | None = None, acceptance: str | None = None,
           acceptance_kwargs: dict | None = None, hot_start: bool = True,
           **drafter_kwargs: Any) -> ml_collections.ConfigDict:
  """One decoding method of a sweep.

  Args:
    name: the row label (unique within a sweep; results are keyed by it).
    drafter: "ar" (the baseline) or a name in `specjax.registry.DRAFTERS`: "prompt_lookup",
      "self_draft" (the target's first `layers` layers, a chain of `depth` or a `tree`
      of choice paths), "draft_model" (the model at `checkpoint`, sharing the vocab),
      "eagle" / "eagle3" / "falcon" / "hydra" / "medusa" / "dflash" / "dspark" (a trained
      head folder at
      `checkpoint`; `depth`, `top_k`, `num_nodes`, `tree`, or `budget=COSTS_JSON` to size
      the draft from the device's measured costs and the head's simulated acceptance).
    stop: a name in `registry.STOP_POLICIES` ("fixed", "confidence", "svip"); None = fixed.
    stop_kwargs: the policy's knobs, e.g. {"threshold": 0.4}.
    acceptance: "greedy", "speculative", "rsd", or the LOSSY "typical" / "fuzzy" /
      "easd" / "judge" / "arbitrage"; None picks greedy at temperature 0 and speculative
      when sampling.
    acceptance_kwargs: the rule's knobs, e.g. {"threshold": 0.3} for fuzzy, or
      {"checkpoint": JUDGE_SMOLLM2, "threshold": 0.9} for judge.
    hot_start: for drafters that learn across calls ("token_recycling", "suffix"): carry
      what one prompt taught them to the next (per temperature and seed); False starts
      every prompt cold.
    **drafter_kwargs: the drafter's knobs (depth, top_k, tree, num_nodes, layers, checkpoint, ...); values
      may be FieldReferences.
  """
  return ml_collections.ConfigDict({
      "name": name, "drafter": drafter, "drafter_kwargs": dict(drafter_kwargs),
      "stop": stop, "stop_kwargs": dict(stop_kwargs or {}), "acceptance": acceptance,
      "acceptance_kwargs": dict(acceptance_kwargs or {}), "hot_start": hot_start,
  })


def trained_heads(costs) -> list[ml_collections.ConfigDict]:
  """The committed SmolLM2 heads as sweep methods: EAGLE-1, EAGLE-3, Medusa-1 and Hydra chains
  sized from the cost file `costs`, Falcon's chain of one forward (its block of 2 tokens:
  the budget's model charges a draft forward per token, which a semi-autoregressive head
  does not spend), and EAGLE-1 and EAGLE-3 drafting an EAGLE-2 dynamic tree of 7 nodes
  (top-3 expansions, 3 deep). On this CPU the budget gives trees a single
  node (verifying 2 tokens already costs 1.4x one), so the tree's size is fixed here to
  measure what a tree does; on an accelerator pass budget=costs with top_k=3 instead."""
  return [
      method("eagle_chain", drafter="eagle", checkpoint=EAGLE_SMOLLM2, top_k=1, budget=costs),
      method("eagle2_tree", drafter="eagle", checkpoint=EAGLE_SMOLLM2, top_k=3, depth=3,
             num_nodes=7),
      method("eagle3_chain", drafter="eagle3", checkpoint=EAGLE3_SMOLLM2, top_k=1,
             budget=costs),
      method("eagle3_tree", drafter="eagle3", checkpoint=EAGLE3_SMOLLM2, top_k=3, depth=3,
             num_nodes=7),
      method("medusa_chain", drafter="medusa", checkpoint=MEDUSA_SMOLLM2, budget=costs),
      method("hydra_chain", drafter="hydra", checkpoint=HYDRA_SMOLLM2, budget=costs),
      method("falcon_chain", drafter="falcon", checkpoint=FALCON_SMOLLM2, top_k=1, depth=2),
  ]


def table_protocol(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The README tables' protocol: MT-Bench and HumanEval (2 prompts each), greedy and
  T=1, batch 1, 128 new tokens, one warm-up call, caches of 512 slots."""
  c.datasets = ("mt_bench", "humaneval")
  c.num_prompts = 2
  c.temperatures = (0.0, 1.0)
  c.max_new_tokens = 128
  c.warmup = 1
  c.cache_bucket = 512
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """`get_config` arguments "a=1,b=x" over typed defaults; an unknown key is an error."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"Bad config argument {item!r}; expected key=value with a key in "
                       f"{sorted(defaults)}.")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"Bad config argument {item!r}: {key} is true or false (1/0, "
                         "yes/no).")
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None or kind is str:
      out[key] = value
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ValueError(f"Bad config argument {item!r}: {key} is a {kind.__name__}."
                         ) from None
  return out


def base() -> ml_collections.ConfigDict:
  """Every field a sweep reads, with defaults; configs override what they need."""
  c = ml_collections.ConfigDict()
  c.target = "smollm2-135m"  # a preset, a HF folder or a .gguf file
  # A Medusa-2 head folder: every method decodes the target with its LoRA merged in
  # (lossless relative to that merged model, not to `target`; rows say so).
  c.target_lora = ""
  c.dtype = "float32"
  c.methods = [method("ar")]  # exactly one method with drafter "ar": the baseline
  c.datasets = ("mt_bench",)  # built-in names (mt_bench, humaneval, gsm8k) or .json/.jsonl
  c.num_prompts = 3  # the first N prompts of each dataset
  c.temperatures = (0.0,)
  c.seeds = (0,)
  c.max_new_tokens = 64
  c.warmup = 0  # untimed runs per compiled shape beyond the compiling call
  c.cache_bucket = 512  # cache sizes round up to this: one compiled program per bucket
  c.peers = ()  # "hf_ar", "hf_prompt_lookup": transformers on the same weights
  c.progress = True  # tqdm progress bar
  # Sharding (specjax.sharding): every method decodes on a mesh such as "tensor=8" or
  # "data=2,tensor=4" over all devices ("": one device); rules as (logical axis, mesh
  # axes) pairs, () = sharding.DEFAULT_RULES.
  c.mesh = ""
  c.sharding_rules = ()
  # The target's attention: "xla" or a Pallas tree-attention kernel ("pallas": the
  # backend's; `specjax.kernels`). On CPU the kernels only run interpreted (slow).
  c.attention = "xla"
  # Several processes (multi-host, `sharding.initialize`): each runs the same sweep and
  # process 0 writes the results. Empty: from the environment if set, else one process.
  c.distributed = ml_collections.ConfigDict({
      "coordinator": "", "num_processes": 0, "process_id": -1, "auto": False})
  return c


def rule_trainer(tiny: bool) -> ml_collections.ConfigDict:
  """What the trained rules' configs (judge.py, arbitrage.py) share: the target, examples
  from the first 256 tokens of the self-distilled training rows (24 held out), stored per
  batch of rows (a rerun resumes), and a class-balanced logistic fit. `tiny`: seconds on
  `tiny-random`."""
  c = ml_collections.ConfigDict()
  c.target = "smollm2-135m"
  c.dtype = "float32"
  # Every example costs a forward of its prefix and a decode: the rows' first 256 tokens.
  c.data = ml_collections.ConfigDict({
      "source": "assets/distill/smollm2-135m", "seq_len": 256, "eval_rows": 24})
  c.num_rows = 48
  c.rows_per_batch = 8  # rows per example file
  c.examples_per_call = 32  # continuations decoded together
  c.examples = ""  # "" = workdir/examples
  # L2 on standardised inputs: held-out AUC peaks near 0.1 for both (training.md).
  c.fit = ml_collections.ConfigDict({"steps": 2000, "batch_size": 256, "lr": 1e-3,
                                     "l2": 0.1})
  c.seed = 0
  c.progress = True
  if tiny:
    c.target = "tiny-random"
    c.data.source, c.data.seq_len, c.data.eval_rows = "self:64:32", 32, 8
    c.num_rows, c.rows_per_batch, c.examples_per_call = 24, 12, 16
    c.fit.steps = 200
    c.progress = False
  return c
