"""Training Judge Decoding's judge (`specjax-train --config configs/judge.py`).

The paper labelled about 30k draft tokens by hand ("is this token still a correct
answer?"). specjax has no annotators and no stronger model, so its labels come from the
target itself, by *resynchronisation*: at a position where the drafter's token d differs
from the target's greedy token, put d in the text, let the target continue greedily for
`horizon` tokens, and call d acceptable when the last `anchor` tokens of that continuation
appear, in order, in what the target would have written anyway (its own greedy text for
the next horizon + slack tokens). A token whose detour rejoins the target's own text
within the horizon changed the wording, not where the text goes (a synonym, a reordered
phrase, a different but equivalent opening); one that sends the target elsewhere did not.
That is the paper's notion of "correct though not aligned" with the target as its judge of
content; it cannot see correctness the target itself lacks.

Examples come from the self-distilled training rows (the target's greedy answers to
training prompts, never an evaluation set), only at positions where the row's next
horizon + slack tokens are the target's teacher-forced greedy tokens (so the row is the
target's own continuation there). The drafter's token is the committed EAGLE-1 head's
argmax fed the target's true features (a chain's first draft), or, without a head, the
target's first `draft_layers` layers (self-draft). The judge reads the target's final
hidden state at d (what verification's forward gives at a draft token) and is one linear
layer trained with class-balanced logistic loss (Adam). Held-out rows give precision and
recall at several thresholds. Each batch of examples is its own file: a killed run resumes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specjax import decode, models, verify
from specjax.drafters import io
from specjax.models.model import FINAL, causal, forward, shared_params

from . import minibatch, stored

SPEC = "examples.json"


def rejoins(continuation, own, anchor: int) -> bool:
  """Whether the last `anchor` tokens of `continuation` occur contiguously in `own`."""
  tail = list(continuation[-anchor:])
  own = list(own)
  return len(tail) == anchor and any(own[i:i + anchor] == tail
                                     for i in range(len(own) - anchor + 1))


def _draft_fn(target: models.Model, head, draft_layers: int):
  """A jitted (params, head params, tokens [B, T]) -> (the target's greedy next token,
  the drafter's next token) at every position [B, T - 1] (teacher forced)."""
  cfg = target.config

  @jax.jit
  def run(params, head_params, tokens_BxT):
    b, t = tokens_BxT.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    out = forward(cfg, params, tokens_BxT, positions, causal(t), features=(FINAL,))
    greedy = jnp.argmax(out.logits[:, :-1], -1)
    if head is not None:  # EAGLE: pair s - 1 = (f_{s-1}, x_s) drafts the token after s
      shared = shared_params(cfg, params)
      g, _ = head.net(head_params, shared, out.features[0][:, :-1], tokens_BxT[:, 1:],
                      positions[:, :-1], causal(t - 1))
      draft = jnp.argmax(head.logits(head_params, shared, g), -1)  # [B, T-1]: token s + 1
      draft = jnp.concatenate([greedy[:, :1], draft[:, :-1]], 1)  # position 0: no pair yet
    else:
      small = cfg.replace(num_layers=draft_layers)
      draft = jnp.argmax(models.causal_forward(small, params, tokens_BxT).logits[:, :-1], -1)
    return greedy.astype(jnp.int32), draft.astype(jnp.int32)

  return run


def _hidden_fn(target: models.Model):
  """A jitted (params, tokens [B, T], at [B]) -> the final hidden state at `at` [B, H]."""
  cfg = target.config

  @jax.jit
  def run(params, tokens_BxT, at_B):
    out = models.causal_forward(cfg, params, tokens_BxT, features=(FINAL,))
    return out.features[0][jnp.arange(tokens_BxT.shape[0]), at_B]

  return run


def candidates(greedy, draft, tokens, mask, length: int, window: int, per_row: int,
               rng) -> list[tuple[int, int]]:
  """(row, position s) pairs: the drafter's token after s differs from the target's, the
  next token is a response token, and the row holds the target's own greedy tokens for
  `window` tokens from s + 1; at most `per_row` per row, chosen at random."""
  out = []
  for i in range(tokens.shape[0]):
    ok = []
    for s in range(1, length - window - 1):
      if mask[i, s + 1] > 0 and draft[i, s] != greedy[i, s] and np.all(
          greedy[i, s:s + window] == tokens[i, s + 1:s + 1 + window]):
        ok.append(s)
    for s in rng.permutation(ok)[:per_row]:
      out.append((i, int(s)))
  return out


def collect(target: models.Model, head, head_params, tokens: np.ndarray, mask: np.ndarray,
            folder: str, *, c, spec: dict[str, Any]) -> dict[str, np.ndarray]:
  """Examples (hidden [M, H], label [M] bool) from rows `tokens`, `rows_per_batch` rows per
  file under `folder` (kept: a rerun resumes)."""
  stored.claim(folder, {**spec, "rows": len(tokens), "horizon": c.horizon, "anchor": c.anchor,
                        "slack": c.slack, "per_row": c.per_row,
                        "rows_per_batch": c.rows_per_batch}, "judge examples", SPEC)
  draft_fn, hidden_fn = _draft_fn(target, head, c.draft_layers), _hidden_fn(target)
  window = c.horizon + c.slack
  parts = []
  for b0 in range(0, len(tokens), c.rows_per_batch):
    path = os.path.join(folder, f"batch_{b0 // c.rows_per_batch:05d}.npz")
    if not os.path.exists(path):
      rows = slice(b0, b0 + c.rows_per_batch)
      toks, msk = tokens[rows], mask[rows]
      length = int(np.max(np.nonzero(msk.any(0))[0], initial=1)) + 1
      greedy, draft = jax.device_get(draft_fn(target.params, head_params,
                                              jnp.asarray(toks[:, :length])))
      picks = candidates(greedy, draft, toks, msk, length, window, c.per_row,
                         np.random.default_rng([c.seed, b0]))
      hidden, label = [], []
      for k0 in range(0, len(picks), c.examples_per_call):
        chunk = picks[k0:k0 + c.examples_per_call]
        # A full batch every call (copies of the first pad it): one compiled program.
        full = chunk + [chunk[0]] * (c.examples_per_call - len(chunk))
        prompts = [list(toks[i, :s + 1]) + [int(draft[i, s])] for i, s in full]
        cont = decode.generate(target, prompts, max_new_tokens=c.horizon, eos=None,
                               max_len=tokens.shape[1] + 2 * c.horizon + 8).token_lists()
        padded = np.zeros((len(full), tokens.shape[1] + 1), np.int32)
        for j, p in enumerate(prompts):
          padded[j, :len(p)] = p
        at = np.asarray([s + 1 for _, s in full], np.int32)
        hidden.append(np.asarray(hidden_fn(target.params, jnp.asarray(padded),
                                           jnp.asarray(at)))[:len(chunk)])
        label += [rejoins(cn, toks[i, s + 2:s + 2 + window], c.anchor)
                  for cn, (i, s) in zip(cont, chunk)]
      h = (np.concatenate(hidden) if hidden else
           np.zeros((0, target.config.hidden_size), np.float32))
      np.savez(path + ".tmp.npz", hidden=h.astype(np.float32), label=np.asarray(label, bool))
      os.replace(path + ".tmp.npz", path)
      if c.progress:
        print(f"judge examples: {min(b0 + c.rows_per_batch, len(tokens))}/{len(tokens)} "
              f"rows, {len(label)} examples ({np.mean(label) if label else 0:.2f} rejoin)",
              flush=True)
    with np.load(path) as f:
      parts.append({k: f[k] for k in ("hidden", "label")})
  return {k: np.concatenate([p[k] for p in parts]) for k in ("hidden", "label")}


def train(c, workdir: str) -> dict:
  """Collects labelled examples (resumable), fits the judge, reports held-out precision
  and recall, and writes workdir/judge (`acceptance="judge", checkpoint=...`)."""
  from specjax.training import data as data_lib  # pylint: disable=g-import-not-at-top
  from specjax.training import trainer  # pylint: disable=g-import-not-at-top

  trainer.check_numbers(c, {"horizon": 2, "anchor": 1, "slack": 0, "per_row": 1,
                            "num_rows": 1, "rows_per_batch": 1, "examples_per_call": 1,
                            "fit.steps": 1, "fit.batch_size": 1, "data.seq_len": 8,
                            "data.eval_rows": 1})
  if c.anchor > c.horizon:
    raise ValueError(f"anchor={c.anchor} must be <= horizon={c.horizon}.")
  target = models.load(c.target, c.dtype)
  head, head_params = None, None
  if c.head:
    kind, head, head_params, _ = io.load(c.head, target.config, target.dtype)
    if kind != "eagle":
      raise ValueError(f"{c.head!r} holds a {kind} head; the judge's draft tokens come "
                       "from an EAGLE-1 head (kind 'eagle') or, with head='', self-draft.")
  elif not 1 <= c.draft_layers < target.config.num_layers:
    raise ValueError(f"draft_layers must be in [1, {target.config.num_layers}); got "
                     f"{c.draft_layers}.")
  data = data_lib.load(c.data.source, seq_len=c.data.seq_len, vocab=target.config.vocab_size,
                       encode=None if target.tokenizer is None else target.tokenizer.encode,
                       eval_rows=c.data.eval_rows, seed=c.seed, target=target)
  spec = {"target": c.target, "head": os.path.abspath(c.head) if c.head else "",
          "draft_layers": c.draft_layers, "data": dict(c.data), "seed": c.seed}
  folder = c.examples or os.path.join(workdir, "examples")
  sets = {
      "train": collect(target, head, head_params, data.tokens[:c.num_rows],
                       data.mask[:c.num_rows], os.path.join(folder, "train"), c=c,
                       spec={**spec, "split": "train"}),
      "eval": collect(target, head, head_params, data.eval_tokens, data.eval_mask,
                      os.path.join(folder, "eval"), c=c, spec={**spec, "split": "eval"})}
  if len(sets["train"]["label"]) < 2 or sets["train"]["label"].all() or not sets["train"][
      "label"].any():
    raise ValueError(f"The training rows gave {len(sets['train']['label'])} examples with "
                     "one label only; use more rows (num_rows) or per_row.")
  w, b, loss = minibatch.logistic(sets["train"]["hidden"], sets["train"]["label"],
                                  steps=c.fit.steps, batch_size=c.fit.batch_size, lr=c.fit.lr,
                                  l2=c.fit.l2, seed=c.seed)
  judge = verify.Judge(tuple(float(x) for x in w), b)
  p_eval = np.asarray(judge.probs(jnp.asarray(sets["eval"]["hidden"])))
  metrics = {"train_examples": int(len(sets["train"]["label"])),
             "eval_examples": int(len(sets["eval"]["label"])),
             "train_rejoin_rate": float(sets["train"]["label"].mean()),
             "eval_rejoin_rate": float(sets["eval"]["label"].mean()) if len(p_eval) else None,
             "final_loss": loss,
             "eval_auc": minibatch.roc_auc(p_eval, sets["eval"]["label"].astype(bool)),
             "eval": {str(t): minibatch.classifier_metrics(p_eval, sets["eval"]["label"], t)
                      for t in (0.5, 0.7, 0.9)}}
  if c.progress:
    print(json.dumps(metrics, indent=1), flush=True)
  out = os.path.join(workdir, "judge")
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, verify.JUDGE_FILE), weights=w, bias=np.float32(b))
  with open(os.path.join(out, "judge.json"), "w", encoding="utf-8") as f:
    json.dump({"target": c.target, "labels": "resynchronisation (train/judge.py)",
               "horizon": c.horizon, "anchor": c.anchor, "slack": c.slack,
               "draft": os.path.basename(os.path.normpath(c.head)) if c.head
               else f"self_draft:{c.draft_layers}", "metrics": metrics}, f,
              indent=1)
  with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  return metrics
