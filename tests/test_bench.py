"""`make bench`'s train-throughput table (eval/bench.py), at a tiny shape."""

import importlib

import pytest

from specjax import models, registry
from specjax.evaluation import bench


def test_every_train_recipe_names_a_config_of_a_registered_head():
  for recipe, (module, arg) in bench.TRAIN_RECIPES.items():
    c = importlib.import_module(f"specjax.configs.{module}").get_config(arg)
    assert c.head in registry.HEADS.names(), recipe
    assert recipe in (c.head, "fspad")  # FSPAD is EAGLE-1 with options


def test_train_tokens_per_s_runs_a_recipe_step():
  model = models.load("tiny-random")
  tps = bench.train_tokens_per_s(model, "eagle", batch=2, seq=32, runs=2)
  assert 0 < tps < 1e9


def test_unknown_train_recipe_is_refused_before_loading():
  with pytest.raises(SystemExit, match="unknown recipe.*'eagel'"):
    bench.main(["--model", "no-such-model", "--train", "eagle,eagel"])
