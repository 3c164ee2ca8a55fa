"""specjax.evaluation: prompt sets, metrics and sweeps."""
