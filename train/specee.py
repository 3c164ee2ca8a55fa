"""Training SpecEE's exit predictors (`specjax-train --config configs/specee.py`).

Examples come from teacher-forced forwards over the self-distilled training rows (the
target's own greedy responses to training prompts, never an evaluation set): at every
response position the target's state after each layer l < L - 1, the EAGLE-1 head's top-K
candidates for the next token (fed the target's final states, as while decoding), the
predictor's 3K inputs there (`specee.features`), the label "layer l's argmax is the final
token" and whether that argmax is a candidate (an exit is allowed). A forward gives every
position at once, so collecting costs seconds, not a decode; each batch is written to its
own file (a killed run resumes).

Then, as the reference does: one predictor per layer, BCE, Adam (lr 1e-3), batches of
1024. The static exit layers are where the oracle's first allowed, correct exit falls most
often on the training rows (the paper's offline "skewed distribution"). The held-out rows
report each predictor's precision and recall and a simulated decode (teacher-forced: the
schedule, history and exit rule of `specee.SpecEE`): exit rate, mean layers run, and the
share of tokens equal to the full model's.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax import models
from specjax.drafters import io
from specjax.drafters.selfdraft import specee
from specjax.models import skip as skip_lib
from specjax.models.model import FINAL, causal, forward, shared_params

from . import minibatch, stored

SPEC = "examples.json"


def _examples_fn(target: models.Model, head, candidates: int):
  """A jitted (params, head params, tokens [B, T], mask) -> per position s (1..T-1) the
  predictor inputs [B, T-1, E, 3K], labels and allowed [B, T-1, E], and valid [B, T-1]."""
  cfg = target.config
  exits = cfg.num_layers - 1

  @jax.jit
  def run(params, head_params, tokens_BxT, mask_BxT):
    b, t = tokens_BxT.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    out = forward(cfg, params, tokens_BxT, positions, causal(t),
                  features=tuple(range(1, cfg.num_layers)) + (FINAL,))
    final_top = jnp.argmax(out.logits[:, 1:], -1)
    # Pair s - 1 = (f_{s-1}, x_s) drafts the token after position s.
    shared = shared_params(cfg, params)
    g, _ = head.net(head_params, shared, out.features[-1][:, :-1], tokens_BxT[:, 1:],
                    positions[:, :-1], causal(t - 1))
    cands = jax.lax.top_k(head.logits(head_params, shared, g), candidates)[1]
    prev = jnp.zeros(cands.shape)  # the first layer's change is its softmax
    xs, labels, allowed = [], [], []
    for layer in range(exits):
      h = out.features[layer][:, 1:]  # the output of layer `layer` (input of the next)
      x, prev = specee.features(specee.candidate_logits(cfg, params, h, cands), prev)
      top = jnp.argmax(skip_lib.exit_logits(cfg, params, h), -1)
      xs.append(x)
      labels.append(top == final_top)
      allowed.append((cands == top[..., None]).any(-1))
    valid = jnp.pad(mask_BxT[:, 2:] > 0, ((0, 0), (0, 1)))  # the next token is a response's
    return jnp.stack(xs, 2), jnp.stack(labels, 2), jnp.stack(allowed, 2), valid

  return run


def collect(target: models.Model, head, head_params, tokens: np.ndarray, mask: np.ndarray,
            folder: str, *, candidates: int = 4, batch_size: int = 4, spec: dict | None = None,
            progress: bool = False) -> dict[str, np.ndarray]:
  """Examples of every response position of `tokens` ([N, T] rows and their loss mask),
  one file per batch under `folder` (kept: a rerun resumes). Returns x [M, E, 3K] float32,
  label and allowed [M, E] bool."""
  stored.claim(folder, {**(spec or {}), "candidates": candidates, "rows": len(tokens),
                        "batch_size": batch_size}, "examples", SPEC)
  run = _examples_fn(target, head, candidates)
  parts = []
  for i in range(0, len(tokens), batch_size):
    path = os.path.join(folder, f"batch_{i // batch_size:05d}.npz")
    if not os.path.exists(path):
      rows = slice(i, i + batch_size)
      width = int(np.max(np.nonzero(mask[rows].any(0))[0], initial=1)) + 1
      x, label, allowed, valid = jax.device_get(run(
          target.params, head_params, jnp.asarray(tokens[rows, :width]),
          jnp.asarray(mask[rows, :width])))
      np.savez(path + ".tmp.npz", x=x[valid].astype(np.float32), label=label[valid],
               allowed=allowed[valid])
      os.replace(path + ".tmp.npz", path)
      if progress:
        print(f"examples: {min(i + batch_size, len(tokens))}/{len(tokens)} rows", flush=True)
    with np.load(path) as f:
      parts.append({k: f[k] for k in ("x", "label", "allowed")})
  return {k: np.concatenate([p[k] for p in parts]) for k in ("x", "label", "allowed")}


def fit(x_MxExF: np.ndarray, y_MxE: np.ndarray, *, steps: int = 2000, batch_size: int = 1024,
        lr: float = 1e-3, seed: int = 0) -> tuple[Any, float]:
  """Every layer's predictor fitted at once (vmapped): BCE with Adam on random batches of
  positions. Returns (stacked params, final mean loss)."""
  m, e, f = x_MxExF.shape
  params = specee.init_predictors(jax.random.key(seed), e, f // 3)

  def loss_fn(p, xb_BxExF, yb_BxE):
    z = jax.vmap(lambda l, x: specee.exit_logit(p, l, x), (0, 1), 1)(jnp.arange(e), xb_BxExF)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, yb_BxE.astype(jnp.float32)))

  return minibatch.adam(loss_fn, params, (x_MxExF, y_MxE), steps=steps,
                        batch_size=batch_size, lr=lr, seed=seed)


def scores(params, x_MxExF: np.ndarray) -> np.ndarray:
  """P(exit) [M, E] of every position at every layer."""
  e = x_MxExF.shape[1]
  fn = jax.jit(lambda p, x: jax.nn.sigmoid(jax.vmap(
      lambda l, xl: specee.exit_logit(p, l, xl), (0, 1), 1)(jnp.arange(e), x)))
  return np.asarray(fn(params, jnp.asarray(x_MxExF)))


def oracle_layers(data: dict[str, np.ndarray], n: int) -> tuple[int, ...]:
  """The `n` layers where the first allowed, correct exit of a position falls most often
  (ties to the earlier layer), sorted."""
  ok = data["label"] & data["allowed"]
  first = np.where(ok.any(1), ok.argmax(1), -1)
  counts = np.bincount(first[first >= 0], minlength=ok.shape[1])
  order = sorted(range(ok.shape[1]), key=lambda l: (-counts[l], l))
  return tuple(sorted(order[:n]))


def simulate(p_MxE: np.ndarray, data: dict[str, np.ndarray], static, *, threshold: float,
             history: int = 5) -> dict[str, float]:
  """SpecEE's exit rule over positions in order, as one stream (the history carries from
  one position to the next): exit rate, mean layers run, share equal to the full model's
  token, and LM-head calls (predictor fired) per token."""
  m, e = p_MxE.shape
  num_layers = e + 1
  static = set(static)
  past: list[int] = []
  exits, layers, equal, heads = 0, 0, 0, 0
  for i in range(m):
    near = set()
    if len(past) >= history:
      near = {l + d for l in past[-history:] for d in (-2, 0, 2)}
    left = num_layers - 1
    for l in range(e):
      if (l in static or l in near) and p_MxE[i, l] > threshold:
        heads += 1
        if data["allowed"][i, l]:
          left = l
          break
    past.append(left)
    exits += left < num_layers - 1
    layers += left + 1
    equal += bool(data["label"][i, left]) if left < num_layers - 1 else 1
  return {"exit_rate": exits / m, "mean_layers": layers / m, "equal_to_full": equal / m,
          "lm_head_calls_per_token": heads / m}


def classifier_metrics(p_MxE: np.ndarray, y_MxE: np.ndarray, threshold: float) -> dict:
  """Precision and recall of "exit" over all layers' examples, and the label rate."""
  pred = p_MxE > threshold
  tp = float((pred & y_MxE).sum())
  return {"precision": tp / max(pred.sum(), 1), "recall": tp / max(y_MxE.sum(), 1),
          "label_rate": float(y_MxE.mean())}


def train(c, workdir: str) -> dict:
  """Collects examples (resumable), fits the predictors, picks the static layers, reports
  held-out metrics and writes workdir/predictor (`drafter="specee", checkpoint=...`)."""
  from specjax.training import data as data_lib  # pylint: disable=g-import-not-at-top
  from specjax.training import trainer  # pylint: disable=g-import-not-at-top

  trainer.check_numbers(c, {"candidates": 1, "static_layers": 1, "num_rows": 1,
                            "batch_size": 1, "fit.steps": 1, "fit.batch_size": 1,
                            "data.seq_len": 3, "data.eval_rows": 1})
  if not 0.0 <= c.threshold <= 1.0:
    raise ValueError(f"threshold is a probability; got {c.threshold}.")
  target = models.load(c.target, c.dtype)
  skip_lib.check(target.config, "SpecEE")
  if c.static_layers > target.config.num_layers - 1:
    raise ValueError(f"static_layers={c.static_layers}: a {target.config.num_layers}-layer "
                     f"target has {target.config.num_layers - 1} exit layers.")
  kind, head, head_params, _ = io.load(c.head, target.config, target.dtype)
  if kind != "eagle":
    raise ValueError(f"{c.head!r} holds a {kind} head; SpecEE's candidates come from an "
                     "EAGLE-1 head (kind 'eagle').")
  data = data_lib.load(c.data.source, seq_len=c.data.seq_len, vocab=target.config.vocab_size,
                       encode=None if target.tokenizer is None else target.tokenizer.encode,
                       eval_rows=c.data.eval_rows, seed=c.seed, target=target)
  spec = {"target": c.target, "head": os.path.abspath(c.head), "data": dict(c.data),
          "seed": c.seed}
  folder = c.examples or os.path.join(workdir, "examples")
  sets = {
      "train": collect(target, head, head_params, data.tokens[:c.num_rows],
                       data.mask[:c.num_rows], os.path.join(folder, "train"),
                       candidates=c.candidates, batch_size=c.batch_size,
                       spec={**spec, "split": "train"}, progress=c.progress),
      "eval": collect(target, head, head_params, data.eval_tokens, data.eval_mask,
                      os.path.join(folder, "eval"), candidates=c.candidates,
                      batch_size=c.batch_size, spec={**spec, "split": "eval"},
                      progress=c.progress)}
  params, loss = fit(sets["train"]["x"], sets["train"]["label"], steps=c.fit.steps,
                     batch_size=c.fit.batch_size, lr=c.fit.lr, seed=c.seed)
  static = oracle_layers(sets["train"], c.static_layers)
  p_eval = scores(params, sets["eval"]["x"])
  metrics = {"train_examples": int(len(sets["train"]["x"])),
             "eval_examples": int(len(sets["eval"]["x"])), "final_loss": loss,
             "static": list(static),
             "eval": classifier_metrics(p_eval, sets["eval"]["label"], c.threshold),
             "simulated": {str(t): simulate(p_eval, sets["eval"], static, threshold=t)
                           for t in sorted({c.threshold, 0.5, 0.7, 0.9})}}
  if c.progress:
    print(json.dumps(metrics, indent=1), flush=True)
  out = os.path.join(workdir, "predictor")
  # The head's folder relative to the predictor's: a committed pair moves together.
  specee.save(out, params, static=static, head=os.path.relpath(c.head, out),
              candidates=c.candidates, num_layers=target.config.num_layers, target=c.target,
              threshold=c.threshold, metrics=metrics)
  with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  return metrics
