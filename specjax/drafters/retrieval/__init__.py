"""Drafters that copy from text already seen (prompt lookup): no model, no training."""
