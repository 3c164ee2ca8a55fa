"""Language models that draft: an independent draft model, or the target's own first layers
(self-speculation)."""
