"""Shared config pieces: the sweep defaults every config starts from and `method()`."""

from __future__ import annotations

from typing import Any

import ml_collections


def method(name: str, drafter: str = "ar", *, num_draft: int = 4, layers: Any = None,
           stop: str | None = None, stop_kwargs: dict | None = None,
           acceptance: str | None = None, acceptance_kwargs: dict | None = None,
           checkpoint: str | None = None) -> ml_collections.ConfigDict:
  """One decoding method of a sweep.

  Args:
    name: the row label (unique within a sweep; results are keyed by it).
    drafter: "ar" (the baseline), "prompt_lookup", "self_draft" (the target's first
      `layers` layers) or "draft_model" (the model at `checkpoint`, sharing the vocab).
    num_draft: draft tokens per step (the tree budget); ignored by "ar".
    layers: layers kept by "self_draft" (an int or a FieldReference to one).
    stop: stop policy of model drafters ("fixed", "confidence", "svip"); None = fixed.
    stop_kwargs: the policy's knobs, e.g. {"threshold": 0.4}.
    acceptance: "greedy", "speculative", or the LOSSY "typical" / "fuzzy"; None picks
      greedy at temperature 0 and speculative when sampling.
    acceptance_kwargs: the rule's knobs, e.g. {"threshold": 0.3} for fuzzy.
    checkpoint: the draft model of "draft_model": a preset, a HF folder or a .gguf file.
  """
  return ml_collections.ConfigDict({
      "name": name, "drafter": drafter, "num_draft": num_draft, "layers": layers,
      "stop": stop, "stop_kwargs": dict(stop_kwargs or {}), "acceptance": acceptance,
      "acceptance_kwargs": dict(acceptance_kwargs or {}), "checkpoint": checkpoint,
  })


def base() -> ml_collections.ConfigDict:
  """Every field a sweep reads, with defaults; configs override what they need."""
  c = ml_collections.ConfigDict()
  c.target = "smollm2-135m"  # a preset, a HF folder, a .gguf file, or "random:tiny" (tests)
  c.dtype = "float32"
  c.methods = [method("ar")]  # exactly one method with drafter "ar": the baseline
  c.datasets = ("mt_bench",)  # built-in names (mt_bench, humaneval, gsm8k) or .json/.jsonl
  c.num_prompts = 3  # the first N prompts of each dataset
  c.temperatures = (0.0,)
  c.seeds = (0,)
  c.max_new_tokens = 64
  c.warmup = 0  # untimed runs per compiled shape beyond the compiling call
  c.pad_to = 64  # prompt widths round up to this, so prompts share compiled shapes
  c.peers = ()  # "hf_ar", "hf_prompt_lookup": transformers on the same weights
  c.progress = True  # tqdm progress bar
  return c
