"""Config files (`get_config(arg)`), installed as `specjax.configs` so that each file
imports the shared pieces as `from specjax.configs import common`."""
