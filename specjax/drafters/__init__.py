"""Drafters, one module each, grouped by family and registered by name in
`registry.DRAFTERS` (imported on first use):

  heads/       trained heads that read the target's features: EAGLE-1/2 (`eagle`),
               EAGLE-3 (`eagle3`), Hydra/Hydra++ (`hydra`), Falcon (`falcon`), Medusa-1/2
               (`medusa`), DFlash and DSpark (`dflash`), PPD's prompt tokens (`ppd`), and
               what they share (`runtime`)
  retrieval/   drafters that copy from text already seen or from the target's past
               predictions: prompt lookup, Token Recycling, SuffixDecoding
  selfdraft/   language models that draft: an independent draft model, the target's own
               first layers, or the target skipping sub-layers it searches for (SWIFT)
               or exiting at a layer it picks as it goes (DEL)

`hybrid` merges the trees of several of them into one; `goodput` (SmartSpec) picks a chain
drafter's length each step for the batch's goodput. Shared modules beside them: `base`
(the interface the decode loop calls), `static_tree` /
`dynamic_tree` (tree drafting), `budget` (draft sizes from measured costs), `io` (head
folders: save, load, foreign layouts), `export` (to the speculators format).
"""

from __future__ import annotations

import importlib

from specjax.drafters.base import Context, Drafter, TargetBatch, TrainableHead

# Public names -> the module that defines them (imported on first access).
_LAZY = {
    "DraftModel": "selfdraft.draft_model", "PromptLookup": "retrieval.prompt_lookup",
    "TokenRecycling": "retrieval.token_recycling",
    "SuffixDecoding": "retrieval.suffix", "Hybrid": "hybrid", "Goodput": "goodput", "Swift": "selfdraft.swift",
    "DynamicExit": "selfdraft.dynamic_exit", "FeatureDrafter": "heads.runtime", "EagleHead": "heads.eagle",
    "Eagle3Head": "heads.eagle3", "Falcon": "heads.falcon", "FalconHead": "heads.falcon",
    "Hydra": "heads.hydra", "HydraHead": "heads.hydra", "Medusa": "heads.medusa",
    "MedusaHead": "heads.medusa", "DFlash": "heads.dflash", "DFlashHead": "heads.dflash",
    "load_drafter": "io",
}


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(f"specjax.drafters.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'specjax.drafters' has no attribute {name!r}")


__all__ = ["Context", "Drafter", "TargetBatch", "TrainableHead", *sorted(_LAZY)]
