"""Training Arbitrage's router (`specjax-train --config configs/arbitrage.py`).

The paper scores each reasoning step with a process reward model and trains a 1.5B router
(reading the text) on labels 1[score(target step) - score(draft step) > delta]. specjax
has no reward model; its step scorer is the target's own mean log-probability per token
of the step (how much the target itself believes the step), and its router is a logistic
layer on what verification's forward already gives for the draft step: the target's mean
final hidden state over the step's tokens and the mean and lowest log-probability of its
tokens (`verify.step_features`). The label asks whether the target's own step would be
more than `delta` nats per token likelier, by its own measure, than the drafter's.

Pairs come from the self-distilled training rows (the target's greedy answers to training
prompts, never an evaluation set): at random response positions where the row holds the
target's teacher-forced greedy tokens for the next `depth` tokens, the drafter (the
committed EAGLE-1 head as a chain of `depth`, or self-draft) drafts a chain from the row's
prefix; both it and the row's own continuation are cut after their first step boundary
(a token holding a blank line). Each batch of pairs is its own file: a killed run resumes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from specjax import decode, models, registry, verify
from specjax.models.model import FINAL
from specjax.tree import DraftTree

from . import minibatch, stored

SPEC = "pairs.json"


def boundary_ids(target: models.Model) -> tuple[int, ...]:
  """The token ids whose text holds a blank line ("\\n\\n"): where a step ends. None
  without a tokenizer (then a step is a whole draft)."""
  tok = target.tokenizer
  if tok is None:
    return ()
  return tuple(i for i in range(target.config.vocab_size) if "\n\n" in tok.decode([i]))


def _score_fn(target: models.Model):
  """A jitted (params, tokens [B, T]) -> (log p(token t + 1) [B, T - 1] at temperature 1,
  the final hidden state at each token [B, T, H])."""
  cfg = target.config

  @jax.jit
  def run(params, tokens_BxT):
    out = models.causal_forward(cfg, params, tokens_BxT, features=(FINAL,))
    lp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), -1)
    return (jnp.take_along_axis(lp, tokens_BxT[:, 1:, None], -1)[..., 0],
            jnp.argmax(out.logits[:, :-1], -1).astype(jnp.int32), out.features[0])

  return run


def _cut(tokens, boundary) -> int:
  """Tokens kept of a step: up to and including the first boundary token."""
  for k, t in enumerate(tokens):
    if int(t) in boundary:
      return k + 1
  return len(tokens)


def collect(target: models.Model, drafter, tokens: np.ndarray, mask: np.ndarray,
            boundary: tuple[int, ...], folder: str, *, c, spec: dict[str, Any]
            ) -> dict[str, np.ndarray]:
  """Pairs (router input x [M, H + 3], score gap [M]) from rows `tokens`, one file per
  `rows_per_batch` rows under `folder` (kept: a rerun resumes)."""
  stored.claim(folder, {**spec, "rows": len(tokens), "per_row": c.per_row,
                        "rows_per_batch": c.rows_per_batch, "depth": c.depth},
               "arbitrage pairs", SPEC)
  score = _score_fn(target)
  d = c.depth
  parts = []
  for b0 in range(0, len(tokens), c.rows_per_batch):
    path = os.path.join(folder, f"batch_{b0 // c.rows_per_batch:05d}.npz")
    if not os.path.exists(path):
      toks, msk = tokens[b0:b0 + c.rows_per_batch], mask[b0:b0 + c.rows_per_batch]
      row_lp, greedy, _ = jax.device_get(score(target.params, jnp.asarray(toks)))
      rng = np.random.default_rng([c.seed, b0])
      picks = []
      for i in range(len(toks)):
        ok = [s for s in range(1, toks.shape[1] - d - 1) if msk[i, s + 1] > 0
              and np.all(greedy[i, s:s + d] == toks[i, s + 1:s + 1 + d])]
        picks += [(i, int(s)) for s in rng.permutation(ok)[:c.per_row]]
      xs, gaps = [], []
      for k0 in range(0, len(picks), c.examples_per_call):
        chunk = picks[k0:k0 + c.examples_per_call]
        full = chunk + [chunk[0]] * (c.examples_per_call - len(chunk))
        prompts = [list(toks[i, :s + 1]) for i, s in full]
        out = decode.generate(target, prompts, max_new_tokens=1, eos=None, drafter=drafter,
                              trace=True, max_len=tokens.shape[1] + 4 * d + 8)
        chains = np.asarray(out.trace.tokens[:, 0])  # [B, d]: the first step's chain
        seqs = np.zeros((len(full), tokens.shape[1] + d), np.int32)
        for j, (p, ch) in enumerate(zip(prompts, chains)):
          seqs[j, :len(p)], seqs[j, len(p):len(p) + d] = p, ch
        lp, _, hidden = jax.device_get(score(target.params, jnp.asarray(seqs)))
        for j, (i, s) in enumerate(chunk):
          n_d = _cut(chains[j], boundary)
          n_t = _cut(toks[i, s + 1:s + 1 + d], boundary)
          lp_d = lp[j, s:s + n_d]  # log p of chain token k sits at position s + k
          on = np.zeros((1, d), bool)
          on[0, :n_d] = True
          x = verify.step_features(jnp.asarray(hidden[j:j + 1, s + 1:s + 1 + d]),
                                   jnp.asarray(np.pad(lp_d, (0, d - n_d))[None]),
                                   jnp.asarray(on), d)
          xs.append(np.asarray(x)[0])
          gaps.append(float(row_lp[i, s:s + n_t].mean() - lp_d.mean()))
      np.savez(path + ".tmp.npz", x=np.asarray(xs, np.float32).reshape(len(xs), -1),
               gap=np.asarray(gaps, np.float32))
      os.replace(path + ".tmp.npz", path)
      if c.progress:
        print(f"arbitrage pairs: {min(b0 + c.rows_per_batch, len(tokens))}/{len(tokens)} "
              f"rows, {len(gaps)} pairs", flush=True)
    with np.load(path) as f:
      parts.append({k: f[k] for k in ("x", "gap")})
  return {k: np.concatenate([p[k] for p in parts]) for k in ("x", "gap")}


def train(c, workdir: str) -> dict:
  """Collects draft/target step pairs (resumable), fits the router on
  1[gap > delta], reports held-out precision and recall, and writes workdir/router
  (`acceptance="arbitrage", checkpoint=...`)."""
  from specjax.training import data as data_lib  # pylint: disable=g-import-not-at-top
  from specjax.training import trainer  # pylint: disable=g-import-not-at-top

  trainer.check_numbers(c, {"depth": 1, "per_row": 1, "num_rows": 1, "rows_per_batch": 1,
                            "examples_per_call": 1, "fit.steps": 1, "fit.batch_size": 1,
                            "data.seq_len": 8, "data.eval_rows": 1})
  target = models.load(c.target, c.dtype)
  drafter = registry.DRAFTERS.build(c.drafter, target, **{**c.drafter_kwargs, "depth": c.depth})
  drafter.validate(target.config)
  data = data_lib.load(c.data.source, seq_len=c.data.seq_len, vocab=target.config.vocab_size,
                       encode=None if target.tokenizer is None else target.tokenizer.encode,
                       eval_rows=c.data.eval_rows, seed=c.seed, target=target)
  boundary = boundary_ids(target)
  spec = {"target": c.target, "drafter": c.drafter, "drafter_kwargs": dict(c.drafter_kwargs),
          "data": dict(c.data), "seed": c.seed}
  folder = c.examples or os.path.join(workdir, "examples")
  sets = {split: collect(target, drafter, toks, msk, boundary, os.path.join(folder, split),
                         c=c, spec={**spec, "split": split})
          for split, toks, msk in (("train", data.tokens[:c.num_rows], data.mask[:c.num_rows]),
                                   ("eval", data.eval_tokens, data.eval_mask))}
  label = {k: v["gap"] > c.delta for k, v in sets.items()}
  if label["train"].all() or not label["train"].any():
    raise ValueError(f"Every training pair has the same label at delta={c.delta} (gaps "
                     f"{np.percentile(sets['train']['gap'], [10, 50, 90]).round(2)} at the "
                     "10/50/90th percentiles); pick a delta inside them.")
  w, b, loss = minibatch.logistic(sets["train"]["x"], label["train"], steps=c.fit.steps,
                                  batch_size=c.fit.batch_size, lr=c.fit.lr, l2=c.fit.l2,
                                  seed=c.seed)
  router = verify.Arbitrage(tuple(float(v) for v in w), b, boundary)
  p_eval = np.asarray(router.escalate(jnp.asarray(sets["eval"]["x"])))
  metrics = {"train_pairs": int(len(label["train"])), "eval_pairs": int(len(label["eval"])),
             "delta": c.delta, "train_escalate_rate": float(label["train"].mean()),
             "eval_escalate_rate": float(label["eval"].mean()),
             "gap_percentiles_10_50_90": np.percentile(sets["train"]["gap"],
                                                       [10, 50, 90]).round(3).tolist(),
             "final_loss": loss, "boundary_tokens": len(boundary),
             "eval_auc": minibatch.roc_auc(p_eval, label["eval"]),
             "eval": {str(t): minibatch.classifier_metrics(p_eval, label["eval"], t)
                      for t in (0.3, 0.5, 0.7)}}
  if c.progress:
    print(json.dumps(metrics, indent=1), flush=True)
  out = os.path.join(workdir, "router")
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, verify.ROUTER_FILE), weights=w, bias=np.float32(b),
           boundary=np.asarray(boundary, np.int32))
  with open(os.path.join(out, "router.json"), "w", encoding="utf-8") as f:
    json.dump({"target": c.target, "scorer": "target mean log-prob per token",
               "delta": c.delta, "drafter": c.drafter, "depth": c.depth,
               "metrics": metrics}, f, indent=1)
  with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  return metrics
