"""`make bench`'s train-throughput table (eval/bench.py), at a tiny shape."""

import importlib
import json

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


def test_batch_costs_feed_the_goodput_policy(tmp_path):
  """The per-batch cost tables `make bench` writes are what `drafters.goodput` reads."""
  from specjax.drafters import goodput  # pylint: disable=g-import-not-at-top
  model = models.load("tiny-random")
  table = bench.batch_costs(model, 1, batches=(1, 4), widths=(1, 2, 3))
  assert set(table) == {1, 4} and set(table[4]["verify_ms"]) == {1, 2, 3}
  assert all(ms > 0 for b in table.values() for ms in [*b["verify_ms"].values(), b["draft_ms"]])
  res = {"model": "tiny-random", "device": "cpu", "verify_ms": table[1]["verify_ms"],
         "draft_ms": table[1]["draft_ms"], "batches": table}
  bench.write_costs(res, str(tmp_path))
  costs = json.loads((tmp_path / "costs.json").read_text())
  got = goodput.step_costs(costs, 4, 2)  # JSON keys are strings; batch 4 is measured
  want = [table[4]["verify_ms"][t] + max(k, 1) * table[4]["draft_ms"] for k, t in ((0, 1), (1, 2),
                                                                          (2, 3))]
  assert got == pytest.approx(want)


def test_forward_profile_finds_attention_and_the_weight_matmuls():
  """`bench --profile` classes a traced forward's XLA ops: the weight matmuls and the
  score dot over the cache's slots are each found, and the classes sum to about the wall
  time (more when ops overlap on two cores; less by the loop's own overhead, which on this
  tiny model under a loaded suite was 80% of a 0.76 ms forward, never a tenth of it)."""
  model = models.load("tiny-random")
  row = bench.forward_profile(model, batch=4, context=40, runs=2, reps=4)
  assert row["weight matmuls"] > 0 and row["attention q.K (cache)"] > 0
  classes = sum(row[k] for k in ("weight matmuls", "attention q.K (cache)",
                                 "attention p.V (cache)", "other"))
  assert 0.1 * row["forward_ms"] < classes < 3 * row["forward_ms"], row
