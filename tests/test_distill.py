"""Self-distillation: the target's answers as a dataset, resumable; training prompts stay
disjoint from the evaluation sets."""

import json
import os

import pytest

from specjax import decode, models
from specjax.training import data as data_lib
from specjax.training import distill, prompt_mix

import doubles


@pytest.fixture(scope="module")
def tiny_chat_target(tmp_path_factory):
  return models.load(doubles.write_tiny_llama(str(tmp_path_factory.mktemp("tiny"))))


def test_distill_writes_answers_and_resumes(tmp_path, tiny_chat_target):
  rows = [{"id": f"p{i}", "source": "test", "prompt": f"Tell me about topic {i}."}
          for i in range(5)]
  out = str(tmp_path / "d")
  added = distill.run(tiny_chat_target, rows, out, max_new_tokens=6, batch_size=2,
                      shard_size=2, progress=False)
  assert len(distill.shard_files(out)) == 3 and added == distill.count_tokens(out)[1] > 0
  tok = tiny_chat_target.tokenizer
  for path in distill.shard_files(out):
    for line in open(path, encoding="utf-8"):
      r = json.loads(line)
      n = r["loss_mask"].index(1)
      prompt = next(x["prompt"] for x in rows if x["id"] == r["id"])
      assert r["input_ids"][:n] == tok.encode_chat([{"role": "user", "content": prompt}])
      answer = decode.generate(tiny_chat_target, [r["input_ids"][:n]], max_new_tokens=6)
      assert r["input_ids"][n:] == answer.token_lists()[0]  # the target's greedy answer
  # A restarted run finds every shard done; a lost shard is redone.
  assert distill.run(tiny_chat_target, rows, out, max_new_tokens=6, batch_size=2,
                     shard_size=2, progress=False) == 0
  os.remove(distill.shard_files(out)[1])
  assert distill.run(tiny_chat_target, rows, out, max_new_tokens=6, batch_size=2,
                     shard_size=2, progress=False) > 0
  with pytest.raises(ValueError, match="other settings"):
    distill.run(tiny_chat_target, rows, out, max_new_tokens=7, progress=False)
  # The folder is a training source.
  d = data_lib.load(out, seq_len=64, vocab=tiny_chat_target.config.vocab_size, eval_rows=1)
  assert len(d.tokens) == 4 and d.mask.sum() > 0


def test_training_mix_is_wide_and_disjoint_from_eval_sets():
  rows = prompt_mix.build()
  sources = {r["source"] for r in rows}
  assert sources == {"composed", "code", "math", "science", "docs"} and len(rows) > 1000
  assert len({r["prompt"] for r in rows}) == len(rows)
  prompt_mix.check_disjoint([r["prompt"] for r in rows])
  # The check can fail: an MT-Bench question slipped into the mix is caught.
  from specjax.evaluation import prompts  # pylint: disable=g-import-not-at-top
  leaked = prompts.load("mt_bench")[0].turns[0]
  with pytest.raises(ValueError, match="overlaps an evaluation prompt"):
    prompt_mix.check_disjoint([rows[0]["prompt"], "Please answer: " + leaked])
