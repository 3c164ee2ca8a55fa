"""Online speculative decoding: a head that keeps training on the requests it serves.

Online Speculative Decoding (Liu et al. 2023) distils the draft on the target's own
verification outputs while serving: each served sequence goes into a replay buffer with
the positions the draft mispredicted, and every `update_every` sequences the draft takes
an optimizer step on the buffer (the target's distributions recomputed, soft cross-entropy
at those positions only), then the buffer empties. Here the draft is any trainable head:

  learner = OnlineLearner.from_head(target, "assets/heads/eagle3-smollm2-135m")
  for prompt in stream:
    out = decode.generate(target, [prompt], drafter=learner.drafter(), ...)
    learner.observe([prompt], out.token_lists())       # may update the head

Decoding stays lossless whatever the head's weights: verification keeps only what the
target would emit, so each request's output equals its AR output while the head changes
between requests (tested). A mispredicted position is one where the head's first draft
from there (teacher-forced on the served sequence) is not the target's argmax; `observe`
finds them with the trainer's own held-out acceptance (`TrainableHead.accept`), and the
update is the trainer's step with the loss mask set to those positions (`trainer.make_steps`).
Rows are padded to `bucket` tokens, so a stream compiles a few programs, not one per length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from specjax import models
from specjax.drafters import io as head_io
from specjax.training import trainer


@dataclasses.dataclass
class OnlineLearner:
  """A head, its optimizer state and the replay buffer (host-side; the steps are jitted)."""

  target: models.Model
  head: Any
  state: trainer.TrainState
  decode: dict
  train_step: Any
  eval_step: Any
  update_every: int = 8
  bucket: int = 128
  buffer: list = dataclasses.field(default_factory=list)  # (tokens [T], mask [T]) pairs
  updates: int = 0
  mispredicted: int = 0  # positions pushed into the buffer so far

  @classmethod
  def from_head(cls, target: models.Model, path: str, *, lr: float = 1e-4,
                update_every: int = 8, bucket: int = 128, seed: int = 0,
                **decode) -> "OnlineLearner":
    """A learner starting from the head folder at `path` (any layout `io.load` reads):
    AdamW at a constant `lr` (OSD's 1e-4), an update every `update_every` sequences;
    `decode` overrides the head's saved draft-size knobs."""
    if update_every < 1:
      raise ValueError(f"update_every must be >= 1; got {update_every}.")
    if bucket < 8:
      raise ValueError(f"bucket must be >= 8 tokens; got {bucket}.")
    _, head, params, meta = head_io.load(path, target.config, target.dtype)
    c = ml_collections.ConfigDict({"steps": 1, "grad_accum": 1, "optim": {
        "lr": lr, "warmup_steps": 0, "end_lr": 1.0, "b1": 0.9, "b2": 0.95,
        "weight_decay": 0.0, "clip": 0.5}})
    tx = trainer.optimizer(c, params)
    train_step, eval_step = trainer.make_steps(target, head, tx, seed, sim_depth=1)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    return cls(target, head, state, {**meta.get("decode", {}), **decode}, train_step,
               eval_step, update_every, bucket)

  def drafter(self):
    """The drafter of the head as it is now: on a copy of the weights, since an update
    donates the state's buffers (a drafter kept from before it stays usable)."""
    shared = models.shared_params(self.target.config, self.target.params)
    return self.head.drafter(jax.tree.map(jnp.copy, self.state.params), shared, **self.decode)

  def _padded(self, rows: Sequence[tuple[list[int], list[int]]]):
    """(tokens [B, W], response mask [B, W]) of (prompt, output) rows, W a bucket."""
    lengths = [len(p) + len(o) for p, o in rows]
    width = -(-max(lengths) // self.bucket) * self.bucket
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, (p, o) in enumerate(rows):
      tokens[i, :len(p) + len(o)] = p + o
      mask[i, len(p):len(p) + len(o)] = 1.0
    return tokens, mask

  def observe(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> bool:
    """Adds served sequences (prompt, output) to the buffer with their mispredicted
    positions; updates the head when the buffer holds `update_every` sequences. Returns
    whether it updated."""
    for p, o in zip(prompts, outputs):
      if not o:
        continue
      tokens, mask = self._padded([(list(p), list(o))])
      _, acc = self.eval_step(self.state.params, self.target.params, tokens, mask)
      # rows_BxT[i] > 0: draft 1 from position i guesses a served token (i + 2); it was
      # mispredicted when none of the chain was accepted there.
      missed = (np.asarray(acc["rows_BxT"])[0] > 0) & (np.asarray(acc["accepted_BxT"])[0] == 0)
      where = np.zeros_like(mask[0])
      where[2:] = missed[:-2]
      self.mispredicted += int(where.sum())
      self.buffer.append((tokens[0], where))
    if len(self.buffer) < self.update_every:
      return False
    width = max(len(t) for t, _ in self.buffer)
    pad = lambda x: np.pad(x, (0, width - len(x)))
    tokens = np.stack([pad(t) for t, _ in self.buffer])
    mask = np.stack([pad(m) for _, m in self.buffer])
    self.buffer = []
    if mask.sum() == 0:
      return False
    self.state, _ = self.train_step(self.state, self.target.params, jnp.asarray(tokens),
                                    jnp.asarray(mask))
    self.updates += 1
    return True


# Standard-library modules none of the training mix's function prompts come from: a code
# stream from one domain the heads never trained on, and no evaluation set.
STREAM_MODULES = ("shutil", "email.utils", "inspect", "tempfile", "platform", "traceback",
                  "logging", "urllib.request", "codecs", "typing", "xml.etree.ElementTree",
                  "re", "sysconfig", "ast", "dis", "pydoc", "site")


def stream(n: int, seed: int = 0) -> list[str]:
  """n "complete this function" prompts from `STREAM_MODULES`, shuffled with `seed`."""
  import random  # pylint: disable=g-import-not-at-top

  from specjax.training import prompt_mix  # pylint: disable=g-import-not-at-top
  assert not set(STREAM_MODULES) & set(prompt_mix._STDLIB)  # pylint: disable=protected-access
  rng = random.Random(seed)
  prompts = prompt_mix.function_prompts(STREAM_MODULES, rng)
  rng.shuffle(prompts)
  if len(prompts) < n:
    raise ValueError(f"The stream has {len(prompts)} prompts; asked for {n}.")
  prompt_mix.check_disjoint(prompts[:n])
  return prompts[:n]


def run_stream(target: models.Model, head_path: str, prompts: Sequence[str], *,
               max_new_tokens: int = 128, progress: bool = True, **learner_kw) -> list[dict]:
  """Serves `prompts` one at a time (greedy) with the head at `head_path` frozen and
  learning online, side by side; returns a row per prompt {i, tau_frozen, tau_online,
  equal, updates}. Both outputs are checked equal to each other (lossless: both equal AR)."""
  import tqdm  # pylint: disable=g-import-not-at-top

  from specjax import decode  # pylint: disable=g-import-not-at-top
  learner = OnlineLearner.from_head(target, head_path, **learner_kw)
  frozen = learner.drafter()
  rows = []
  for i, text in enumerate(tqdm.tqdm(prompts, desc="online", disable=not progress)):
    ids = target.tokenizer.encode_chat([{"role": "user", "content": text}])
    kw = dict(max_new_tokens=max_new_tokens, max_len=-(-(len(ids) + max_new_tokens + 16) //
                                                       256) * 256)
    a = decode.generate(target, [ids], drafter=frozen, **kw)
    b = decode.generate(target, [ids], drafter=learner.drafter(), **kw)
    if a.token_lists() != b.token_lists():
      raise AssertionError(f"prompt {i}: the online head's output differs from the frozen "
                           "head's (both must equal AR).")
    new = len(b.token_lists()[0])
    learner.observe([ids], b.token_lists())
    rows.append({"i": i, "new_tokens": new,
                 "tau_frozen": new / max(int(a.stats.target_calls[0]), 1),
                 "tau_online": new / max(int(b.stats.target_calls[0]), 1),
                 "updates": learner.updates})
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  """python -m specjax.training.online --head DIR [--n 120] [--out DIR]"""
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="python -m specjax.training.online", description=(
      "A stream of code prompts from one domain, served with a head frozen and learning "
      "online; prints tau per window of prompts."))
  p.add_argument("--head", required=True, help="a head folder")
  p.add_argument("--target", default=models.DEFAULT)
  p.add_argument("--n", type=int, default=120)
  p.add_argument("--window", type=int, default=20)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--update_every", type=int, default=8)
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--out", default="workdir/online")
  args = p.parse_args(argv)
  from specjax import runtime  # pylint: disable=g-import-not-at-top
  runtime.enable_compilation_cache()
  target = models.load(args.target)
  rows = run_stream(target, args.head, stream(args.n), max_new_tokens=args.max_new_tokens,
                    lr=args.lr, update_every=args.update_every)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "stream.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  print("| prompts | tau, frozen head | tau, online head | updates |\n|---|---|---|---|")
  for s in range(0, len(rows), args.window):
    w = rows[s:s + args.window]
    tau = lambda k: sum(r["new_tokens"] for r in w) / sum(r["new_tokens"] / r[k] for r in w)
    print(f"| {s + 1}-{s + len(w)} | {tau('tau_frozen'):.3f} | {tau('tau_online'):.3f} | "
          f"{w[-1]['updates']} |")


if __name__ == "__main__":
  main()
