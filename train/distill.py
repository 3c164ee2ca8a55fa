"""Self-distillation: the frozen target answers a prompt set; its answers are the data.

  specjax-distill --target smollm2-135m --prompts mix --out data/smollm2_distill

Public trainers find that a head's tau depends most on how much *target-generated* text
it sees (Medusa-2 and EAGLE-3 both train on it): the head learns the target's own
distribution, not a human's. Each prompt is rendered with the target's chat template and
answered by the jitted batched `generate`; a row of the dataset is

  {"id", "source", "input_ids": prompt + response, "loss_mask": 0 on the prompt, 1 on the
   response (EOS included)}

Prompts go in order, `shard_size` at a time (sorted by length inside a shard to batch
similar lengths); each finished shard is written atomically as `part-NNNNN.jsonl`, so a
killed run restarted on the same folder skips the shards it has and loses at most one.
`load_shards` / any `datasets.load_dataset("json", ...)` reads the folder.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Sequence

from absl import app, flags
import numpy as np
import tqdm

from specjax import decode, models, runtime

MANIFEST = "manifest.json"


def _rows_for(source: str, limit: int | None) -> list[dict[str, str]]:
  """Prompt rows {"id", "source", "prompt"} from "mix" (the training mix) or a file."""
  from specjax.training import prompt_mix  # pylint: disable=g-import-not-at-top

  if source == "mix":
    rows = prompt_mix.build()
  else:
    from specjax.evaluation import prompts as eval_prompts  # pylint: disable=g-import-not-at-top
    rows = [{"id": p.id, "source": p.dataset, "prompt": p.turns[0]}
            for p in eval_prompts.load(source)]
  rows = rows[:limit] if limit else rows
  prompt_mix.check_disjoint([r["prompt"] for r in rows])
  return rows


def run(target: models.Model, rows: Sequence[dict[str, str]], out: str, *,
        max_new_tokens: int = 256, batch_size: int = 32, shard_size: int = 64,
        temperature: float = 0.0, max_prompt_tokens: int = 1024, seed: int = 0,
        progress: bool = True) -> int:
  """Writes the answers to `rows` as JSONL shards in `out`; returns response tokens added.

  Prompts longer than `max_prompt_tokens` are skipped (counted in the manifest).
  """
  os.makedirs(out, exist_ok=True)
  settings = {"target": target.name, "max_new_tokens": max_new_tokens,
              "temperature": temperature, "seed": seed, "num_prompts": len(rows)}
  manifest = os.path.join(out, MANIFEST)
  if os.path.exists(manifest):
    with open(manifest, encoding="utf-8") as f:
      old = json.load(f)
    if {k: old.get(k) for k in settings} != settings:
      raise ValueError(f"{out} holds a distillation with other settings ({old}); use a new "
                       f"folder or the same settings ({settings}).")
  with open(manifest, "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=1)
  tok = target.tokenizer
  if tok is None:
    raise ValueError(f"Target {target.name!r} has no tokenizer: distillation renders chat "
                     "prompts.")
  shards = [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]
  todo = [i for i in range(len(shards)) if not os.path.exists(_shard_path(out, i))]
  added = 0
  start = time.perf_counter()
  bar = tqdm.tqdm(total=len(rows), initial=(len(shards) - len(todo)) * shard_size,
                  unit="prompt", desc="distill", disable=not progress)
  for i in todo:
    encoded = [(r, tok.encode_chat([{"role": "user", "content": r["prompt"]}]))
               for r in shards[i]]
    encoded = sorted([e for e in encoded if len(e[1]) <= max_prompt_tokens],
                     key=lambda e: len(e[1]))
    lines = []
    for j in range(0, len(encoded), batch_size):
      batch = encoded[j:j + batch_size]
      ids = [e[1] for e in batch]
      o = decode.generate(target, ids, max_new_tokens=max_new_tokens,
                          temperature=temperature, seed=seed + i * 1000 + j)
      for (r, p), resp in zip(batch, o.token_lists()):
        lines.append(json.dumps({"id": r["id"], "source": r["source"],
                                 "input_ids": p + resp,
                                 "loss_mask": [0] * len(p) + [1] * len(resp)}))
        added += len(resp)
      bar.set_postfix_str(f"{added / (time.perf_counter() - start):.0f} tok/s")
    tmp = _shard_path(out, i) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + ("\n" if lines else ""))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, _shard_path(out, i))
    bar.update(len(shards[i]))
  bar.close()
  return added


def _shard_path(out: str, i: int) -> str:
  return os.path.join(out, f"part-{i:05d}.jsonl")


def shard_files(folder: str) -> list[str]:
  """The finished shards of a distillation folder, in order."""
  return sorted(glob.glob(os.path.join(folder, "part-*.jsonl")))


def count_tokens(folder: str) -> tuple[int, int]:
  """(rows, response tokens) in a distillation folder."""
  rows = tokens = 0
  for path in shard_files(folder):
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          rows += 1
          tokens += int(np.sum(json.loads(line)["loss_mask"]))
  return rows, tokens


_TARGET = flags.DEFINE_string("target", models.DEFAULT, "Target: preset, HF folder or .gguf.")
_PROMPTS = flags.DEFINE_string("prompts", "mix", "'mix' (the training mix) or a .jsonl file.")
_OUT = flags.DEFINE_string("out", None, "Output folder; rerunning on it resumes.")
_LIMIT = flags.DEFINE_integer("limit", None, "Use only the first N prompts.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Response budget per prompt.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Prompts per generate() call.")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = the target's greedy answers.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Target dtype.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _OUT.value:
    raise app.UsageError("--out is required.")
  runtime.enable_compilation_cache()
  rows = _rows_for(_PROMPTS.value, _LIMIT.value)
  target = models.load(_TARGET.value, _DTYPE.value)
  added = run(target, rows, _OUT.value, max_new_tokens=_MAX_NEW.value,
              batch_size=_BATCH.value, temperature=_TEMP.value)
  n_rows, n_tokens = count_tokens(_OUT.value)
  print(f"added {added} response tokens; {_OUT.value} holds {n_rows} rows, {n_tokens} "
        "response tokens")


def cli() -> None:
  """Console entry point (`specjax-distill`)."""
  app.run(main)


if __name__ == "__main__":
  cli()
