"""Drafters: one module each, registered by name in `registry.DRAFTERS`. See `base.py` for
the interface the decode loop calls. Trainable heads (EAGLE-1/3, Falcon, Hydra, Medusa) also register in
`registry.HEADS`; `io.load_drafter` loads a trained one from its folder."""

from specjax.drafters.base import Context, Drafter, TargetBatch, TrainableHead
from specjax.drafters.draft_model import DraftModel
from specjax.drafters.eagle import Eagle, EagleHead
from specjax.drafters.eagle3 import Eagle3Head
from specjax.drafters.falcon import Falcon, FalconHead
from specjax.drafters.hydra import Hydra, HydraHead
from specjax.drafters.io import load_drafter
from specjax.drafters.medusa import Medusa, MedusaHead
from specjax.drafters.prompt_lookup import PromptLookup

__all__ = ["Context", "DraftModel", "Drafter", "Eagle", "Eagle3Head", "EagleHead", "Falcon",
           "FalconHead", "Hydra", "HydraHead", "Medusa", "MedusaHead",
           "PromptLookup", "TargetBatch", "TrainableHead", "load_drafter"]
