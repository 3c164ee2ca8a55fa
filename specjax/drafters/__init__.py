"""Drafters: one module each, registered by name in `registry.DRAFTERS`. See `base.py` for
the interface the decode loop calls."""

from specjax.drafters.base import Context, Drafter
from specjax.drafters.draft_model import DraftModel
from specjax.drafters.prompt_lookup import PromptLookup

__all__ = ["Context", "DraftModel", "Drafter", "PromptLookup"]
