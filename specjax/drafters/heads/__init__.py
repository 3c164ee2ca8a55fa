"""Trained heads that read the target's features (EAGLE-1/2, EAGLE-3, Hydra/Hydra++, Falcon,
Medusa-1/2), one module each; `runtime` holds what they share."""
