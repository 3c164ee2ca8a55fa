"""Evaluation sweeps on a tiny random checkpoint folder: metrics, outputs, resumption,
validation, CLI."""

import csv
import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from specjax import decode, models, sharding
from specjax.configs import common
from specjax.evaluation import cli, metrics, report, sweep

import doubles

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
ROW_FIELDS = {"method", "dataset", "prompt_id", "temperature", "seed", "new_tokens",
              "target_calls", "draft_calls", "tau", "seconds", "tokens_per_s", "equal_to_ar",
              "lossy", "accepted_hist", "tokens", "prompt_tokens", "logprob", "score"}
# One two-turn prompt (rows "chat/t1", "chat/t2") and two with repeats for prompt lookup.
PROMPTS = [{"id": "chat", "turns": ["hi there", "and again"]},
           {"id": "rep", "prompt": "ab ab ab ab"},
           {"id": "num", "prompt": "1 2 3 1 2 3"}]
MAX_NEW = 8


def get_config(name, arg=None):
  return importlib.import_module(f"specjax.configs.{name}").get_config(arg)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return doubles.write_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


TINY_DIR = []  # set by the prompt_file fixture, which every sweep test takes


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory, tiny_dir):
  TINY_DIR[:] = [tiny_dir]
  path = tmp_path_factory.mktemp("data") / "mini.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
  return str(path)


def tiny_config(prompt_file, **overrides):
  c = get_config("tiny", f"target={TINY_DIR[0]},prompts={prompt_file}")
  c.num_prompts = len(PROMPTS)
  c.max_new_tokens = MAX_NEW
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


@pytest.fixture(scope="module")
def swept(prompt_file, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  rows = sweep.run(sweep.plan(tiny_config(prompt_file)), workdir)
  return workdir, rows, report.write(workdir)


# ------------------------------------------------------------------------------------------
# Metrics.


def test_metric_functions():
  assert metrics.tau(12, 4) == 3.0 and metrics.tau(5, 0) is None
  assert metrics.tokens_per_s(10, 2.0) == 5.0
  assert metrics.per_token(3, 12) == 0.25 and metrics.per_token(None, 12) is None
  assert metrics.accepted_histogram([1, 3, 5, 1, 0, 0], 4) == [2, 0, 1, 0, 1]
  assert metrics.speedup([4.0, 8.0], [2.0, 4.0]) == 2.0
  assert metrics.speedup([], [1.0]) is None


def _row(method, prompt, tps, temperature=0.0, drafter=None, equal=True, new=8, calls=4):
  return {"method": method, "drafter": drafter or method, "num_nodes": 4, "dataset": "d",
          "prompt_id": prompt, "temperature": temperature, "seed": 0, "new_tokens": new,
          "target_calls": calls, "draft_calls": 0, "tokens_per_s": tps,
          "equal_to_ar": equal if temperature == 0 else None, "lossy": method == "typ"}


def test_summarize_pairs_prompts_and_flags():
  rows = [_row("ar", "a", 10.0, calls=8), _row("ar", "b", 30.0, calls=8),
          _row("pl", "a", 30.0), _row("pl", "b", 50.0, equal=False),
          _row("typ", "a", 40.0, temperature=1.0), _row("ar", "a", 20.0, 1.0, "ar", calls=8)]
  by = {(s["method"], s["temperature"]): s for s in metrics.summarize(rows)}
  assert [k[0] for k in by] == ["ar", "ar", "pl", "typ"]
  assert by["ar", 0.0]["speedup"] == 1.0 and by["ar", 0.0]["tau"] == 1.0
  assert by["pl", 0.0]["speedup"] == 2.0 and by["pl", 0.0]["tau"] == 2.0
  assert by["pl", 0.0]["target_per_token"] == 0.5
  # 16 new tokens over 8 target calls: 8 accepted drafts, none of them from a draft forward
  assert by["pl", 0.0]["draft_per_accepted"] == 0.0 and by["ar", 0.0]["draft_per_accepted"] is None
  assert by["pl", 0.0]["all_equal"] is False and by["ar", 0.0]["all_equal"] is True
  assert by["typ", 1.0]["speedup"] == 2.0 and by["typ", 1.0]["all_equal"] is None
  assert by["typ", 1.0]["lossy"] and not by["pl", 0.0]["lossy"]


def test_report_from_results_file(tmp_path):
  """Summary files and all three plots, tau vs budget included, from a results file."""
  extra = {"layers": 2, "stop": None, "acceptance": None, "checkpoint": None,
           "accepted_hist": [1, 2, 1]}
  rows = [{**_row("ar", p, 10.0, calls=8), **extra, "num_nodes": 0, "accepted_hist": [8]}
          for p in "ab"]
  rows += [{**_row(f"k{k}", p, 15.0, drafter="self_draft", calls=8 // k), **extra,
            "num_nodes": k} for k in (2, 4) for p in "ab"]
  with open(tmp_path / report.RESULTS, "w") as f:
    for r in rows:
      report.append_row(f, r)
  summary = report.write(str(tmp_path))
  assert [s["speedup"] for s in summary] == [1.0, 1.5, 1.5]
  for name in ("summary.csv", "summary.md", "speedup.png", "accepted_hist.png",
               "tau_vs_budget.png"):
    assert os.path.getsize(tmp_path / name) > 0


def test_budget_curves_need_two_budgets():
  rows = [{**_row("k2", "a", 1.0, drafter="self_draft", new=8, calls=4), "num_nodes": 2},
          {**_row("k4", "a", 1.0, drafter="self_draft", new=8, calls=2), "num_nodes": 4},
          {**_row("pl", "a", 1.0, drafter="prompt_lookup"), "num_nodes": 10}]
  assert report.budget_curves(rows) == {"self_draft T=0": {2: 2.0, 4: 4.0}}


# ------------------------------------------------------------------------------------------
# A sweep end to end.


def test_sweep_rows_and_outputs(swept):
  workdir, rows, summary = swept
  assert len(rows) == 2 * (len(PROMPTS) + 1)  # 2 methods x 4 prompt turns
  assert {r["prompt_id"] for r in rows} == {"chat/t1", "chat/t2", "rep", "num"}
  for r in rows:
    assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
    assert r["tau"] * r["target_calls"] == pytest.approx(r["new_tokens"])
    assert 1 <= r["new_tokens"] <= MAX_NEW and len(r["tokens"]) == r["new_tokens"]
    assert sum(r["accepted_hist"]) == r["target_calls"]
    assert r["tokens_per_s"] == pytest.approx(r["new_tokens"] / r["seconds"])
    assert r["equal_to_ar"] is True and r["lossy"] is False
    if r["method"] == "ar":
      assert r["tau"] == 1.0 and r["draft_calls"] == 0
    else:  # prompt lookup verifies the narrowest width holding its drafts: 0..depth
      assert 0 <= r["drafted_per_step"] <= 4
      assert r["drafted_per_step"] >= r["tau"] - 1  # it accepted no more than it drafted
    assert r["score"] is None  # a local file without references: nothing to check
  # The quality column: the target's mean log-prob of the generated tokens, recomputed
  # here from a plain forward of prompt + output (a lossless method's equals AR's).
  target = models.load(TINY_DIR[0])
  for r in rows:
    if r["prompt_id"] == "rep":
      ids = target.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[1]["prompt"]}])
      lp = jax.nn.log_softmax(target.logits([ids + r["tokens"]])[0, len(ids) - 1:-1], -1)
      want = float(jnp.mean(jnp.take_along_axis(lp, jnp.asarray(r["tokens"])[:, None], 1)))
      assert r["logprob"] == pytest.approx(want, abs=1e-4)
  assert any(r["tau"] > 1 for r in rows if r["method"] == "prompt_lookup")
  with open(os.path.join(workdir, "summary.csv")) as f:
    table = list(csv.DictReader(f))
  assert [(t["method"], t["dataset"]) for t in table] == [("ar", "mini"),
                                                          ("prompt_lookup", "mini")]
  assert [s["all_equal"] for s in summary] == [True, True]
  assert summary[0]["speedup"] == 1.0 and summary[1]["speedup"] > 0
  with open(os.path.join(workdir, "summary.md")) as f:
    assert "| prompt_lookup | mini |" in f.read()
  for png in ("speedup.png", "accepted_hist.png", "quality_vs_speed.png"):
    assert os.path.getsize(os.path.join(workdir, png)) > 0


def test_sweep_carries_learning_drafters_from_prompt_to_prompt(prompt_file, tmp_path):
  """Two prompts with the same text: SuffixDecoding hot-started from the first prompt's
  output drafts the second from it (a higher tau than cold), and both equal AR."""
  path = tmp_path / "twice.jsonl"
  path.write_text("".join(json.dumps({"id": i, "prompt": "the same words"}) + "\n"
                          for i in ("a", "b")))
  c = tiny_config(str(path), num_prompts=2, max_new_tokens=16, temperatures=(0.0,))
  c.methods = [common.method("ar"),
               common.method("hot", drafter="suffix", depth=8, corpus_size=512),
               common.method("cold", drafter="suffix", depth=8, corpus_size=512,
                             hot_start=False)]
  rows = sweep.run(sweep.plan(c), str(tmp_path / "w"))
  tau = {(r["method"], r["prompt_id"]): r["tau"] for r in rows}
  assert all(r["equal_to_ar"] for r in rows)
  assert tau["hot", "a"] == tau["cold", "a"]  # nothing to carry yet
  assert tau["hot", "b"] > tau["cold", "b"]
  assert {r["hot_start"] for r in rows if r["method"] != "ar"} == {True, False}


def test_sweep_holds_one_cache_size_of_programs_at_a_time(prompt_file, tmp_path, monkeypatch):
  """Prompts of three cache sizes: they run in order of size (each program compiles once),
  every turn of a prompt at one size, and no more than one size's programs (2 methods) are
  ever compiled at once."""
  import jax  # pylint: disable=g-import-not-at-top
  path = tmp_path / "sizes.jsonl"
  rows = [{"id": "long", "prompt": "x" * 150}, {"id": "short", "prompt": "hi"},
          {"id": "chat", "turns": ["hey", "again"]}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = tiny_config(str(path), cache_bucket=64, num_prompts=3)
  held, sizes, by_length, generate = [], [], {}, decode.generate

  def counting(*args, **kw):
    out = generate(*args, **kw)
    held.append(decode._generate._cache_size())  # pylint: disable=protected-access
    sizes.append(kw["max_len"])
    by_length.setdefault(len(args[1][0]), set()).add(kw["max_len"])
    return out

  monkeypatch.setattr(decode, "generate", counting)
  jax.clear_caches()  # what earlier tests compiled
  done = sweep.run(sweep.plan(c), str(tmp_path / "w"))
  assert len(done) == 2 * 4  # methods x prompt turns
  assert sizes == sorted(sizes) and len(set(sizes)) == 3, sizes
  size_of = {}
  for row in done:
    size_of.setdefault(row["prompt_id"].split("/")[0], set()).update(
        by_length[row["prompt_tokens"]])
  assert all(len(v) == 1 for v in size_of.values()), size_of  # both chat turns at one size
  assert size_of["short"] == {sizes[0]} and size_of["long"] == {sizes[-1]}, size_of
  assert max(held) <= 2 and held[-1] == 2, held


def test_second_turn_follows_the_ar_answer(swept):
  _, rows, _ = swept
  ar = {r["prompt_id"]: r["tokens"] for r in rows if r["method"] == "ar"}
  target = models.load(TINY_DIR[0])
  tok = target.tokenizer
  answer = [i for i in ar["chat/t1"] if i not in tok.eos_ids]
  turn2 = tok.encode_chat([{"role": "user", "content": "hi there"},
                           {"role": "assistant", "content": tok.decode(answer)},
                           {"role": "user", "content": "and again"}])
  out = decode.generate(target, [turn2], max_new_tokens=MAX_NEW)
  assert out.token_lists()[0] == ar["chat/t2"]


def test_restart_reruns_only_missing_rows(swept, prompt_file, tmp_path):
  workdir, rows, _ = swept
  results = os.path.join(workdir, report.RESULTS)
  with open(results) as f:
    lines = f.readlines()
  cut = tmp_path / "resumed"
  cut.mkdir()
  # Interrupted: the last two rows are missing and a third was torn mid-write.
  (cut / report.RESULTS).write_text("".join(lines[:-2]) + lines[-2][:25])
  new = sweep.run(sweep.plan(tiny_config(prompt_file)), str(cut))
  assert [report.row_key(r) for r in new] == [report.row_key(json.loads(l)) for l in lines[-2:]]
  assert all(r["equal_to_ar"] for r in new)
  after = report.read_rows(str(cut / report.RESULTS))
  keys = [report.row_key(r) for r in after]
  assert len(keys) == len(set(keys)) == len(rows)
  assert set(keys) == {report.row_key(r) for r in rows}
  assert sweep.run(sweep.plan(tiny_config(prompt_file)), str(cut)) == []


def test_results_of_another_sweep_are_refused(swept, prompt_file):
  workdir, _, _ = swept
  with pytest.raises(ValueError, match="max_new_tokens=8"):
    sweep.run(sweep.plan(tiny_config(prompt_file, max_new_tokens=4)), workdir)


# ------------------------------------------------------------------------------------------
# Validation: bad configs fail in plan(), before weights load or anything compiles.


def _method(**kw):
  return ml_collections.ConfigDict({"name": "m", **kw})


@pytest.mark.parametrize("method,error,match", [
    ({"drafter": "no_such_drafter"}, ValueError, "Unknown drafter 'no_such_drafter'"),
    ({"drafter": "draft_model"}, ValueError, "missing a required argument: 'checkpoint'"),
    ({"drafter": "draft_model", "drafter_kwargs": {"checkpoint": "/nope/draft.gguf"}},
     FileNotFoundError, "/nope/draft.gguf"),
    ({"drafter": "self_draft", "drafter_kwargs": {"layers": 1}, "stop": "sometimes"},
     ValueError, "Unknown stop policy 'sometimes'"),
    ({"drafter": "self_draft", "drafter_kwargs": {"layers": 1, "nmu_draft": 3}}, ValueError,
     "Bad arguments for drafter 'self_draft': unknown knobs \\['nmu_draft'\\]"),
    ({"drafter": "self_draft", "drafter_kwargs": {"layers": 1}, "stop": "svip",
      "stop_kwargs": {"treshold": 1}}, ValueError, "treshold"),
    ({"drafter": "prompt_lookup", "acceptance": "lenient"}, ValueError,
     "Unknown acceptance rule 'lenient'"),
    ({"drafter": "prompt_lookup", "stop": "svip"}, ValueError, "stop policies do not apply"),
    ({"drafter": "self_draft"}, ValueError, "missing a required argument: 'layers'"),
    ({"drafter": "ar", "typo": 1}, ValueError, "unknown fields \\['typo'\\]"),
])
def test_bad_method(prompt_file, monkeypatch, method, error, match):
  monkeypatch.setattr(models, "load", lambda *a: pytest.fail("loaded weights"))
  c = tiny_config(prompt_file)
  c.methods = list(c.methods) + [_method(**method)]
  with pytest.raises(error, match=match):
    sweep.plan(c)


@pytest.mark.parametrize("field,value,error,match", [
    ("datasets", ("mt_bench", "no_such_set"), ValueError, "Unknown dataset 'no_such_set'"),
    ("datasets", ("/nope/prompts.jsonl",), FileNotFoundError, "/nope/prompts.jsonl"),
    ("target", "no-such-preset", ValueError, "neither a preset"),
    ("target", "/nope/model.gguf", FileNotFoundError, "/nope/model.gguf"),
    ("peers", ("hf_medusa",), ValueError, "Unknown peers \\['hf_medusa'\\]"),
    ("temperatures", (-1.0,), ValueError, "temperatures"),
])
def test_bad_sweep_fields(prompt_file, field, value, error, match):
  with pytest.raises(error, match=match):
    sweep.plan(tiny_config(prompt_file, **{field: value}))


def test_baseline_and_names_are_checked(prompt_file):
  c = tiny_config(prompt_file)
  c.methods = c.methods[1:]
  with pytest.raises(ValueError, match="exactly one method with drafter 'ar'"):
    sweep.plan(c)
  c = tiny_config(prompt_file)
  c.methods = [c.methods[0], c.methods[0]]
  with pytest.raises(ValueError, match="unique"):
    sweep.plan(c)


def test_greedy_rule_with_sampling_is_refused(prompt_file):
  c = tiny_config(prompt_file, temperatures=(0.0, 1.0))
  c.methods = list(c.methods) + [_method(drafter="prompt_lookup", acceptance="greedy")]
  with pytest.raises(ValueError, match="'greedy' needs temperature=0"):
    sweep.plan(c)


@pytest.mark.parametrize("name", ["demo", "bench", "sweep", "tiny", "training_free",
                                  "training_free:repeat", "training_free:specee", "lossy",
                                  "lossy:rsd", "block_drafters", "block_drafters:mt_bench",
                                  "long_context"])
def test_shipped_configs_are_valid(name):
  p = sweep.plan(get_config(*name.split(":")))
  assert p.baseline.name == "ar"
  if name.startswith(("sweep", "training_free")):  # every training-free drafter has a row
    drafters = {m.drafter for m in p.methods}
    assert drafters >= ({"suffix", "token_recycling"} if "repeat" in name
                        else {"specee"} if "specee" in name
                        else {"prompt_lookup", "token_recycling", "suffix", "swift", "del",
                              "hybrid", "specee"})
    # SpecEE is greedy only: a sweep with sampled temperatures leaves its sampled cells out
    assert all(m.greedy_only and m.lossy for m in p.methods if m.drafter == "specee")
  if name == "lossy":  # every lossy rule beside the lossless one, labelled, at T > 0
    rules = {m.acceptance for m in p.methods if m.lossy}
    assert rules == {"typical", "fuzzy", "easd", "judge", "arbitrage"}
    assert all(m.runs_at(1.0) for m in p.methods)
    assert not any(m.runs_at(0.0) for m in p.methods if m.acceptance in ("typical", "easd"))
  if name == "lossy:rsd":  # each drafter under both tree rules, same tree
    assert [m.acceptance for m in p.methods].count("rsd") >= 2
    assert not any(m.lossy for m in p.methods)
  if name == "block_drafters":  # DSpark's thresholds beside the learned stop policies
    assert sorted(m.drafter_kwargs["threshold"] for m in p.methods
                  if m.drafter == "dspark") == [0.0, 0.1, 0.2, 0.3, 0.5, 0.7]
    assert {m.stop for m in p.methods if m.drafter == "eagle3"} >= {"specdecpp", "pacer",
                                                                     "svip", "confidence"}
  if name == "sweep":
    budgets = {m.drafter_kwargs.get("depth") for m in p.methods if m.drafter == "self_draft"}
    assert p.peers and budgets >= {2, 4, 8}


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match="Bad config argument 'tagret=x'"):
    get_config("tiny", "tagret=x")


# ------------------------------------------------------------------------------------------
# The command line.


def test_cli_end_to_end(swept, prompt_file, tmp_path, monkeypatch, capsys):
  """`specjax-eval` in process (the tiny sweep's shapes are compiled by the fixture)."""
  workdir = str(tmp_path / "cli")
  monkeypatch.setattr(sys, "argv", [
      "specjax-eval",
      f"--config={os.path.join(CONFIGS, 'tiny.py')}:target={TINY_DIR[0]},prompts={prompt_file}",
      f"--workdir={workdir}", f"--config.num_prompts={len(PROMPTS)}",
      f"--config.max_new_tokens={MAX_NEW}"])
  with pytest.raises(SystemExit) as exit_:
    cli.run()
  assert exit_.value.code in (0, None)
  assert "| prompt_lookup | mini | 0.0 | 4 |" in capsys.readouterr().out
  rows = report.read_rows(os.path.join(workdir, report.RESULTS))
  assert len(rows) == len(swept[1])
  assert os.path.exists(os.path.join(workdir, "summary.md"))


@pytest.mark.slow
def test_peers_on_a_hf_folder(prompt_file, tmp_path):
  """hf_ar / hf_prompt_lookup rows next to specjax's, on a tiny random HF Llama folder."""
  c = tiny_config(prompt_file, peers=("hf_ar", "hf_prompt_lookup"))
  rows = sweep.run(sweep.plan(c), str(tmp_path / "work"))
  peers = [r for r in rows if r["method"].startswith("hf_")]
  assert len(peers) == 2 * (len(PROMPTS) + 1)
  for r in peers:
    assert r["new_tokens"] == MAX_NEW
    assert r["tau"] * r["target_calls"] == pytest.approx(MAX_NEW)
  assert all(r["tau"] == 1.0 and r["equal_to_ar"] for r in peers if r["method"] == "hf_ar")
  summary = report.write(str(tmp_path / "work"))
  assert {s["method"] for s in summary} == {"ar", "prompt_lookup", "hf_ar", "hf_prompt_lookup"}


def test_prompts_longer_than_the_context_are_skipped_with_a_reason(tmp_path):
  short = doubles.write_tiny_llama(str(tmp_path / "short"), max_position_embeddings=128)
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"id": "long", "turns": ["x" * 200, "y"]}) + "\n"
                     + json.dumps({"id": "ok", "prompt": "hi"}) + "\n")
  c = get_config("tiny", f"target={short},prompts={prompts}")
  c.num_prompts = 2
  workdir = str(tmp_path / "work")
  rows = sweep.run(sweep.plan(c), workdir)
  assert {(r["method"], r["prompt_id"]) for r in rows} == {("ar", "ok"), ("prompt_lookup", "ok")}
  skipped = [r for r in report.read_rows(os.path.join(workdir, report.RESULTS))
             if r.get("skipped")]
  assert {(r["method"], r["prompt_id"]) for r in skipped} == {
      (m, t) for m in ("ar", "prompt_lookup") for t in ("long/t1", "long/t2")}
  assert all("context of 128 positions" in r["skipped"] or "earlier turn" in r["skipped"]
             for r in skipped)
  assert sweep.run(sweep.plan(c), workdir) == []  # resuming does not try them again
  assert [s["rows"] for s in report.write(workdir)] == [1, 1]


def test_medusa2_sweep_decodes_the_lora_merged_target(swept, prompt_file, tmp_path):
  """target_lora: AR and the head both run the merged model; rows say so; peers refused."""
  import jax  # pylint: disable=g-import-not-at-top
  from specjax import registry  # pylint: disable=g-import-not-at-top
  from specjax.configs import common  # pylint: disable=g-import-not-at-top
  from specjax.drafters import io  # pylint: disable=g-import-not-at-top

  base = models.load(TINY_DIR[0])
  head = registry.HEADS.build("medusa", base.config, num_heads=2, lora_rank=2)
  params = head.init(jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)  # a LoRA that changes the model, heads that draft
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  path = str(tmp_path / "medusa2")
  io.save(path, "medusa", {"num_heads": 2, "lora_rank": 2}, params, base.config, {"depth": 2})
  c = tiny_config(prompt_file, target_lora=path)
  c.methods = [common.method("ar"), common.method("medusa2", "medusa", checkpoint=path)]
  plan = sweep.plan(c)
  assert plan.target_name.endswith("+lora:" + os.path.abspath(path))
  rows = sweep.run(plan, str(tmp_path / "work"))
  assert {r["target"] for r in rows} == {plan.target_name}
  assert all(r["equal_to_ar"] for r in rows)  # lossless relative to the merged model
  base_ar = {r["prompt_id"]: r["tokens"] for r in swept[1] if r["method"] == "ar"}
  merged_ar = {r["prompt_id"]: r["tokens"] for r in rows if r["method"] == "ar"}
  assert merged_ar.keys() == base_ar.keys() and merged_ar != base_ar
  # The same folder with retrained weights is another method: no resuming onto its rows.
  io.save(path, "medusa", {"num_heads": 2, "lora_rank": 2},
          jax.tree.map(lambda x: 0.5 * x, params), base.config, {"depth": 2})
  with pytest.raises(ValueError, match="checkpoint_sha"):
    sweep.run(sweep.plan(c), str(tmp_path / "work"))
  with pytest.raises(ValueError, match="Peers run the original target"):
    sweep.plan(tiny_config(prompt_file, target_lora=path, peers=("hf_ar",)))
  with pytest.raises(FileNotFoundError, match="not a head folder"):
    sweep.plan(tiny_config(prompt_file, target_lora=str(tmp_path / "none")))


def test_rows_of_a_changed_method_are_refused(swept, prompt_file, tmp_path):
  """A method whose knobs or head weights changed since its rows were stored would mix
  two methods under one name: the sweep refuses to resume onto them."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "work")
  shutil.copytree(swept[0], workdir)
  c = tiny_config(prompt_file)
  c.methods[1].drafter_kwargs.depth += 1
  with pytest.raises(ValueError, match="rows of method 'prompt_lookup' measured with other "
                                       "\\['drafter_kwargs', 'num_nodes'\\]"):
    sweep.run(sweep.plan(c), workdir)


def test_sweep_with_a_trained_stop_predictor(prompt_file, tmp_path):
  """A learned stop policy runs in a sweep from its folder (lossless rows), and a
  retrained predictor in the same folder is another method: no resuming onto its rows."""
  import jax  # pylint: disable=g-import-not-at-top
  from specjax.configs import common  # pylint: disable=g-import-not-at-top
  from specjax.stopping import learned  # pylint: disable=g-import-not-at-top

  path = str(tmp_path / "specdecpp")
  params = learned.specdecpp_init(jax.random.key(0), 32)  # the tiny target's width
  learned.save(path, "specdecpp", params, "DraftModel")
  c = tiny_config(prompt_file)
  c.methods = [common.method("ar"),
               common.method("self_specdecpp", drafter="self_draft", layers=1, depth=4,
                             stop="specdecpp", stop_kwargs={"checkpoint": path,
                                                            "threshold": 0.5})]
  rows = sweep.run(sweep.plan(c), str(tmp_path / "work"))
  assert all(r["equal_to_ar"] for r in rows if r["temperature"] == 0) and rows
  learned.save(path, "specdecpp", jax.tree.map(lambda x: x + 1.0, params), "DraftModel")
  with pytest.raises(ValueError, match="stop_sha"):
    sweep.run(sweep.plan(c), str(tmp_path / "work"))


def test_sweep_on_a_mesh_gives_the_single_device_rows(prompt_file, swept, tmp_path):
  """`mesh=` decodes every method over the devices (8 forced CPU devices): the same tokens
  as the one-device sweep, rows labelled with their mesh, and a workdir of one-device rows
  refuses to resume on a mesh. The tiny checkpoint's 259-token vocabulary does not split,
  so the rules keep it whole."""
  rules = tuple((k, None if k == "vocab" else v) for k, v in sharding.DEFAULT_RULES)
  c = tiny_config(prompt_file, mesh="data=4,tensor=2", sharding_rules=rules)
  rows = sweep.run(sweep.plan(c), str(tmp_path))
  assert rows and all(r["mesh"] == "data=4,tensor=2" for r in rows)
  single = {report.row_key(r): r["tokens"] for r in swept[1]}
  assert {report.row_key(r): r["tokens"] for r in rows} == single
  with pytest.raises(ValueError, match=r"mesh='', .*not of this sweep .*mesh='data=4,tensor=2'"):
    sweep.run(sweep.plan(c), swept[0])
  with pytest.raises(sharding.ShardingError, match="vocab"):
    sweep.run(sweep.plan(tiny_config(prompt_file, mesh="tensor=8")), str(tmp_path / "bad"))


def test_agreement_with_ar_is_measured_for_lossy_methods():
  """A greedy row's share of tokens equal to AR's and the first position that differs;
  summaries average the share and take the median first difference (a row equal to AR
  counts as its length)."""
  assert metrics.agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, None)
  assert metrics.agreement([1, 2, 9, 4], [1, 2, 3, 4]) == (0.75, 2)
  assert metrics.agreement([1, 2], [1, 2, 3, 4]) == (0.5, 2)
  rows = [{**_row("ee", "a", 10.0), "match_ar": 0.5, "diverge_at": 3},
          {**_row("ee", "b", 10.0), "match_ar": 1.0, "diverge_at": None}]
  (s,) = metrics.summarize(rows)
  assert s["match_ar"] == 0.75 and s["first_divergence"] == (3 + 8) / 2
  assert "| 75% | 6 |" in report.markdown([s])
