"""specjax.training: optax training of draft heads and stop predictors against frozen targets."""
