"""Bad input (issue 22): each case fails with a message that names the problem, before
anything compiles or loads weights, or works as documented. Fast: the tiny random target,
small files, no real model."""

import dataclasses
import json
import os
import stat

import numpy as np
import pytest

from specjax import decode, models
from specjax.sampling import Sampling


class ByteTokenizer:
  """Text as its UTF-8 bytes: enough of a tokenizer for `generate`'s string prompts."""

  eos_ids = ()

  def encode(self, text):
    return list(text.encode())


@pytest.fixture(scope="module")
def tiny():
  """The tiny random target (no weights read) with a byte tokenizer."""
  return dataclasses.replace(models.load("tiny-random"), tokenizer=ByteTokenizer())


def _never_compile(monkeypatch):
  """Fails the test if `generate` reaches its compiled decode."""
  monkeypatch.setattr(decode, "_generate", lambda *a, **k: pytest.fail("compiled"))


# ------------------------------------------------------------------------------------------
# generate()


def test_list_of_strings_is_a_batch_of_prompts(tiny):
  assert decode.encode_prompts(tiny, ["a", "bc"]) == [[97], [98, 99]]
  assert decode.encode_prompts(tiny, ("a", [5, 6])) == [[97], [5, 6]]
  assert decode.encode_prompts(tiny, "ab") == [[97, 98]]
  assert decode.encode_prompts(tiny, [1, 2]) == [[1, 2]]
  out = decode.generate(tiny, ["a", "bc"], max_new_tokens=1, eos=None)
  assert np.asarray(out.lengths).tolist() == [1, 1]


@pytest.mark.parametrize("prompts", [[["a", "b"]], [[[1, 2]]], [np.zeros((2, 2), int)]])
def test_a_list_of_lists_of_prompts_is_refused(tiny, prompts, monkeypatch):
  _never_compile(monkeypatch)
  with pytest.raises(ValueError, match="Prompt 0 is itself a list of prompts"):
    decode.generate(tiny, prompts, max_new_tokens=1)


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=2.5), "max_new_tokens must be >= 1 and an integer; got 2.5"),
    (dict(max_new_tokens=2, eos="foo"), "eos must be \"default\".*got 'foo'"),
    (dict(max_new_tokens=2, eos=[2, 2.5]), "eos must be .*got \\[2, 2.5\\]"),
    (dict(max_new_tokens=2, temperature=1.0, top_k=2.7),
     "top_k must be an integer >= 1 .*got 2.7"),
])
def test_bad_generate_numbers_are_refused(tiny, kw, match, monkeypatch):
  _never_compile(monkeypatch)
  with pytest.raises(ValueError, match=match):
    decode.generate(tiny, [[1, 2]], **kw)


def test_top_k_must_be_an_integer():
  with pytest.raises(ValueError, match="top_k must be an integer"):
    Sampling.create(1.0, top_k=2.7)
  assert Sampling.create(1.0, top_k=np.int64(3)).top_k == 3


# ------------------------------------------------------------------------------------------
# Prompt files and sweeps.


def sweep_config(tmp_path, prompts_file, **overrides):
  """configs/tiny.py on `prompts_file`; the target is an empty folder: plan() only checks
  that it exists, so any load would fail."""
  from specjax.configs import tiny as tiny_config  # pylint: disable=g-import-not-at-top

  target = tmp_path / "target"
  target.mkdir(exist_ok=True)
  c = tiny_config.get_config(f"target={target},prompts={prompts_file}")
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_repeated_prompt_id_is_refused(tmp_path):
  from specjax.evaluation import prompts, sweep  # pylint: disable=g-import-not-at-top

  path = tmp_path / "dup.jsonl"
  path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n'
                  '{"id": "a", "prompt": "z"}\n')
  with pytest.raises(ValueError, match=f"{path}: line 3 repeats the id 'a' of line 1"):
    prompts.load(str(path))
  with pytest.raises(ValueError, match="repeats the id 'a'"):  # in plan(): before weights
    sweep.plan(sweep_config(tmp_path, str(path)))


@pytest.mark.parametrize("text,match", [
    ("", "Prompt file '.*empty.jsonl' is empty"),
    ("  \n", "Prompt file '.*empty.jsonl' is empty"),
    ('{"prompt": "x"}\n{"prompt": "y", oops}\n', "empty.jsonl: line 2 is not valid JSON"),
    ('{"prompt": "x"}\n["y"]\n', "empty.jsonl: line 2 is a JSON list, not an object"),
])
def test_empty_or_malformed_prompt_file_names_file_and_line(tmp_path, text, match):
  from specjax.evaluation import prompts, sweep  # pylint: disable=g-import-not-at-top

  path = tmp_path / "empty.jsonl"
  path.write_text(text)
  with pytest.raises(ValueError, match=match):
    prompts.load(str(path))
  with pytest.raises(ValueError, match=match):
    sweep.plan(sweep_config(tmp_path, str(path)))


@pytest.mark.parametrize("field,value", [("max_new_tokens", 2.5), ("num_prompts", 0),
                                         ("warmup", -1)])
def test_sweep_sizes_must_be_integers_in_range(tmp_path, field, value):
  from specjax.evaluation import sweep  # pylint: disable=g-import-not-at-top

  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "x"}\n')
  c = sweep_config(tmp_path, str(path)).to_dict()
  c[field] = value
  with pytest.raises(ValueError, match=f"{field} must be an integer >= .*got {value}"):
    sweep.plan(c)


def _row(method, prompt, **kw):
  """A results.jsonl row, as the summary reads it."""
  return {"method": method, "drafter": method, "num_nodes": 0, "dataset": "d",
          "prompt_id": prompt, "temperature": 0.0, "seed": 0, "new_tokens": 8,
          "target_calls": 8, "draft_calls": 0, "tokens_per_s": 10.0, "equal_to_ar": True,
          "lossy": False, **kw}


def test_last_results_row_without_its_newline_is_kept(tmp_path, capsys):
  from specjax.evaluation import report  # pylint: disable=g-import-not-at-top

  path = tmp_path / report.RESULTS
  rows = [_row("ar", "a"), _row("ar", "b")]
  path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]))  # no final newline
  assert report.read_rows(str(path)) == rows
  assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows)  # newline added
  assert capsys.readouterr().err == ""
  # A torn last line is dropped, and said so on stderr.
  path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:30])
  assert report.read_rows(str(path)) == rows[:1]
  assert path.read_text() == json.dumps(rows[0]) + "\n"
  assert "dropped its torn last line" in capsys.readouterr().err


def _read_only(monkeypatch, module):
  """Every open for writing in `module` fails as in a read-only folder (tests run as
  root, whom chmod does not stop)."""
  import builtins  # pylint: disable=g-import-not-at-top
  import errno  # pylint: disable=g-import-not-at-top

  def guarded(file, mode="r", *args, **kwargs):
    if set(mode) & set("wax+"):
      raise PermissionError(errno.EACCES, "Permission denied", str(file))
    return builtins.open(file, mode, *args, **kwargs)
  monkeypatch.setattr(module, "open", guarded, raising=False)


def test_finished_read_only_workdir_prints_its_summary(tmp_path, monkeypatch, capsys):
  from specjax.evaluation import report  # pylint: disable=g-import-not-at-top

  (tmp_path / report.RESULTS).write_text(
      "".join(json.dumps(_row(m, p)) + "\n" for m in ("ar", "pl") for p in "ab"))
  _read_only(monkeypatch, report)
  summary = report.write(str(tmp_path))
  assert [s["method"] for s in summary] == ["ar", "pl"]
  assert "is not writable" in capsys.readouterr().err
  assert not (tmp_path / "summary.md").exists()


def test_rows_of_methods_the_sweep_does_not_run_are_refused(tmp_path, monkeypatch):
  from specjax.evaluation import report, sweep  # pylint: disable=g-import-not-at-top

  prompts_file = tmp_path / "p.jsonl"
  prompts_file.write_text('{"id": "a", "prompt": "x"}\n')
  p = sweep.plan(sweep_config(tmp_path, str(prompts_file)))
  workdir = tmp_path / "work"
  workdir.mkdir()
  stored = {"target": p.target_name, "max_new_tokens": p.max_new_tokens, "mesh": "",
            "attention": "xla"}
  (workdir / report.RESULTS).write_text("".join(
      json.dumps(_row(m, "a", dataset="p", **stored)) + "\n" for m in ("ar", "eagle_old")))
  monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded weights"))
  with pytest.raises(ValueError, match="holds rows of methods \\['eagle_old'\\] that this "
                                       "sweep does not run"):
    sweep.run(p, str(workdir))


# ------------------------------------------------------------------------------------------
# Config files.


def _config_modules():
  import importlib  # pylint: disable=g-import-not-at-top
  import pkgutil  # pylint: disable=g-import-not-at-top
  from specjax import configs  # pylint: disable=g-import-not-at-top

  mods = [importlib.import_module(f"specjax.configs.{m.name}")
          for m in pkgutil.iter_modules(configs.__path__)]
  return [m for m in mods if hasattr(m, "get_config")]


@pytest.mark.parametrize("module", _config_modules(), ids=lambda m: m.__name__.split(".")[-1])
def test_every_config_refuses_an_unknown_argument(module):
  with pytest.raises(ValueError, match="ANYTHING.*(use|expected|key in)"):
    module.get_config("ANYTHING")


def test_config_argument_values_are_checked():
  from specjax.configs import stop  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="'tiny=maybe': tiny is true or false"):
    stop.get_config("pacer,tiny=maybe")
  assert stop.get_config("pacer,tiny=0").target == "smollm2-135m"


def test_mistyped_config_key_is_one_plain_sentence(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  train = os.path.join(os.path.dirname(sys.executable), "specjax-train")
  out = subprocess.run([train, "--config=configs/eagle.py:tiny",
                        f"--workdir={tmp_path / 'w'}", "--config.optim.lrr=1"],
                       capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 2
  # One sentence: no traceback, no escaped repr.
  assert out.stderr.strip() == ("error: --config.optim.lrr: the config has no key "
                                "'optim.lrr'. Did you mean 'optim.lr'?")
  assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------
# Training.


def tiny_train_config(**overrides):
  from specjax.configs import eagle  # pylint: disable=g-import-not-at-top

  c = eagle.get_config("tiny")
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for part in path:
      node = node[part]
    node[last] = v
  return c


class Reached(Exception):
  """Raised by a stub: the run got this far."""


def _reached(*args, **kwargs):
  raise Reached


def test_failed_run_does_not_block_its_corrected_rerun(tmp_path, monkeypatch):
  from specjax.training import trainer  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")
  with pytest.raises(FileNotFoundError, match="'slef:96:48' is not a file"):  # before loading
    trainer.train(tiny_train_config(**{"data.source": "slef:96:48"}), workdir)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="empty"):  # once the target has loaded
    trainer.train(tiny_train_config(**{"data.source": str(empty)}), workdir)
  assert not os.path.exists(os.path.join(workdir, trainer.CONFIG_FILE))
  # The corrected rerun passes the config check (and goes on to load its target).
  monkeypatch.setattr(trainer.models, "load", _reached)
  with pytest.raises(Reached):
    trainer.train(tiny_train_config(), workdir)
  # A workdir an older version left a config in, with no checkpoint or metrics, likewise.
  with open(os.path.join(workdir, trainer.CONFIG_FILE), "w") as f:
    f.write(tiny_train_config(**{"data.source": "slef:96:48"}).to_json())
  with pytest.raises(Reached):
    trainer.train(tiny_train_config(), workdir)
  # Once a run has metrics, its config holds.
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write('{"step": 0, "split": "eval", "loss": 1.0}\n')
  with pytest.raises(ValueError, match="keys \\['data'\\] differ"):
    trainer.train(tiny_train_config(), workdir)


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("log_every", 0),
                                       ("data.seq_len", 0), ("grad_accum", -1)])
def test_zero_sizes_are_refused_before_loading(tmp_path, monkeypatch, key, value):
  from specjax.training import trainer  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(trainer.models, "load", lambda *a, **k: pytest.fail("loaded"))
  with pytest.raises(ValueError, match=f"Config key {key} must be an integer >= .*got "
                                       f"{value}"):
    trainer.train(tiny_train_config(**{key: value}), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_float_token_ids_are_refused(tmp_path):
  from specjax.training import data  # pylint: disable=g-import-not-at-top

  path = tmp_path / "rows.jsonl"
  path.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5.7, 6]}\n')
  with pytest.raises(ValueError, match="rows.jsonl: row 1 has input_ids that are not a list "
                                       "of integer token ids \\(e.g. \\[5.7\\]\\)"):
    data.load(str(path), seq_len=8, vocab=512, eval_rows=0)
  # Whole numbers read as floats (the column of a file with one float) are exact ids.
  path.write_text("".join('{"input_ids": [1, 2.0, 3]}\n' for _ in range(3)))
  assert data.load(str(path), seq_len=8, vocab=512, eval_rows=1).tokens[0, :3].tolist() == [
      1, 2, 3]


def test_data_source_error_lists_what_is_accepted(tmp_path):
  from specjax.training import data  # pylint: disable=g-import-not-at-top

  with pytest.raises(FileNotFoundError) as e:
    data.load("rnd:10:8", seq_len=8, vocab=512)
  assert "self:ROWS:LEN" in str(e.value) and "random:ROWS:LEN" in str(e.value)
  # What the message lists is accepted.
  assert len(data.load("random:12:8", seq_len=8, vocab=512, eval_rows=2).tokens) == 10


def test_torn_metrics_line_is_dropped_and_a_corrupt_one_named(tmp_path, capsys):
  from specjax.training import metrics  # pylint: disable=g-import-not-at-top

  path = tmp_path / metrics.METRICS
  rows = [{"step": s, "split": "train", "loss": 1.0} for s in (1, 2, 3)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "spl')
  metrics.Log(str(tmp_path), resume_step=2)  # resuming from the checkpoint at step 2
  assert [json.loads(l) for l in path.read_text().splitlines()] == rows[:2]
  err = capsys.readouterr().err
  assert f"{path}: dropped its torn last line 4" in err and "dropped 1 rows past" in err
  path.write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[1]) + "\n")
  with pytest.raises(ValueError, match=f"{path}: line 2 is not JSON"):
    metrics.Log(str(tmp_path), resume_step=2)
  assert path.read_text().count("\n") == 3  # left as it was


def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from specjax.training import trainer  # pylint: disable=g-import-not-at-top

  def manager():
    return ocp.CheckpointManager(str(tmp_path / "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(
                                     max_to_keep=3, enable_async_checkpointing=False))
  mngr = manager()
  for step in (10, 20):
    mngr.save(step, args=ocp.args.StandardSave({"w": np.full(3, step, np.float32)}))
  mngr.wait_until_finished()
  for root, _, files in os.walk(tmp_path / "checkpoints" / "20"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
  mngr = manager()
  state = trainer._restore(mngr, abstract, str(tmp_path))
  assert np.asarray(state["w"]).tolist() == [10, 10, 10]
  assert "checkpoint at step 20" in capsys.readouterr().err
  assert mngr.all_steps() == [10]  # step 20 can be written again
  assert os.path.isdir(tmp_path / "corrupt_checkpoints" / "20")  # kept, not deleted
  # No checkpoint restores: the error names the newest.
  for root, _, files in os.walk(tmp_path / "checkpoints" / "10"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(ValueError, match="Could not restore the checkpoint at step 10"):
    trainer._restore(manager(), abstract, str(tmp_path))


def test_stop_predictor_batch_size_zero_is_refused_before_loading(tmp_path, monkeypatch):
  from specjax.configs import stop as stop_config  # pylint: disable=g-import-not-at-top
  from specjax.training import stop  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded"))
  c = stop_config.get_config("pacer,tiny=1")
  c.batch_size = 0
  with pytest.raises(ValueError, match="Config key batch_size must be an integer >= 1; got 0"):
    stop.train(c, str(tmp_path))


# ------------------------------------------------------------------------------------------
# Checkpoint folders and exported files.


def test_hf_folder_missing_a_config_key_names_folder_and_key(tmp_path):
  cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 1}  # no num_attention_heads
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} lacks the key "
                                       "'num_attention_heads'"):
    models.load(str(tmp_path))
  (tmp_path / "config.json").write_text('{"model_type": "llama",')
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    models.load(str(tmp_path))


def test_written_params_files_get_the_usual_mode(tmp_path):
  from specjax import assets  # pylint: disable=g-import-not-at-top

  old = os.umask(0o022)
  try:
    assets.save_arrays(str(tmp_path / "params.safetensors"), {"w": np.zeros(3, np.float32)})
    assets.save_json(str(tmp_path / "meta.json"), {"a": 1})
    os.umask(0o027)
    assets.save_arrays(str(tmp_path / "group.safetensors"), {"w": np.zeros(3, np.float32)})
  finally:
    os.umask(old)
  mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)
  assert mode("params.safetensors") == mode("meta.json") == 0o644
  assert mode("group.safetensors") == 0o640  # the umask decides, as for any new file


# ------------------------------------------------------------------------------------------
# Head folders


def _eagle3_folder(path, target):
  """A specjax EAGLE-3 head folder with a reduced (100-token) draft vocabulary."""
  import jax  # pylint: disable=g-import-not-at-top
  from specjax import registry  # pylint: disable=g-import-not-at-top
  from specjax.drafters import io  # pylint: disable=g-import-not-at-top

  kwargs = {"aux_layers": [0, 1], "draft_vocab": 100}
  head = registry.HEADS.build("eagle3", target.config, **kwargs)
  tokens = np.random.default_rng(0).integers(0, target.config.vocab_size, (4, 64))
  head, params = head.fit(head.init(jax.random.key(0)), tokens,
                          np.ones(tokens.shape, np.float32),
                          models.shared_params(target.config, target.params))
  io.save(path, "eagle3", kwargs, params, target.config, buffers=head.buffers())
  return path


def test_eagle3_folder_without_its_vocabulary_map_is_refused_at_load(tmp_path, capsys):
  from specjax.drafters import export, io  # pylint: disable=g-import-not-at-top

  target = models.load("tiny-random")
  path = _eagle3_folder(str(tmp_path / "head"), target)
  assert io.load(path, target.config)[1].draft_ids.shape == (100,)  # whole, it loads
  os.remove(os.path.join(path, io.BUFFERS))
  with pytest.raises(ValueError, match="100-token draft vocabulary but no draft-to-target "
                                       "map .*buffers.safetensors is missing"):
    io.load(path, target.config)
  # specjax-export says the same in one line (exit 2), not a TypeError later on.
  with pytest.raises(SystemExit) as e:
    export.main(["--to-speculators", path, str(tmp_path / "out"), "--target", "tiny-random"])
  assert e.value.code == 2
  assert "no draft-to-target map" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")
