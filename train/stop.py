"""Training the learned stop policies (SpecDec++, PACER) on labels from real decoding.

Labels are stored, not made on the fly. `collect` decodes training prompts with the
drafter at its full fixed length and `generate(trace=True)` records, for every draft node,
the drafter's hidden state and P(accepted | parent accepted) from the target's
verification (`verify.acceptance_probs`). Collecting costs a full decode (every step runs
the target), fitting a predictor afterwards costs seconds, and one collection serves both
predictors and every threshold or weight tried. The files are written one prompt batch
at a time, so a killed collection resumes where it stopped.

The contexts are those the policy meets when serving: the committed text (target tokens,
the target's own correction and bonus tokens among them) followed by the draft chain.
SpecDec++ builds such contexts by mixing target tokens into draft sequences; decoding for
real gives them with the right mixture by construction.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax import decode
from specjax.stopping import learned

PROGRESS, SPEC = "progress.json", "labels.json"


def collect(target, drafter, prompts: Sequence[Sequence[int]], folder: str, *,
            temperature: float, max_new_tokens: int, batch_size: int = 8, seed: int = 0,
            progress: bool = False, spec: dict | None = None) -> list[str]:
  """Decodes `prompts` (chains only) in batches with `trace=True`; writes one .npz per
  batch (hidden [M, N, H] float16, label, valid, forwarded, accepted [M, N] for the M
  steps that ran) and returns the files. Batches already on disk are kept (resume);
  `spec` (what made them: target, drafter, ...) is stored beside them, and a folder made
  by another spec is an error instead of a silent mix."""
  os.makedirs(folder, exist_ok=True)
  spec = {**(spec or {}), "temperature": temperature, "max_new_tokens": max_new_tokens,
          "batch_size": batch_size, "seed": seed, "prompts": len(prompts)}
  spec_path = os.path.join(folder, SPEC)
  if os.path.exists(spec_path):
    with open(spec_path, encoding="utf-8") as f:
      stored = json.load(f)
    if stored != json.loads(json.dumps(spec)):
      diff = sorted(k for k in set(stored) | set(spec) if stored.get(k) != spec.get(k))
      raise ValueError(f"{folder} holds labels made with other settings ({diff} differ); "
                       "use another labels folder or remove it.")
  else:
    with open(spec_path, "w", encoding="utf-8") as f:
      json.dump(spec, f, indent=1)
  files = []
  for i in range(0, len(prompts), batch_size):
    path = os.path.join(folder, f"batch_{i // batch_size:05d}.npz")
    files.append(path)
    if os.path.exists(path):
      continue
    out = decode.generate(target, list(prompts[i:i + batch_size]),
                          max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=seed + i, eos="default" if target.tokenizer else None,
                          drafter=drafter, trace=True)
    tr = jax.tree.map(np.asarray, out.trace)
    if tr.hidden is None:
      raise ValueError("This drafter keeps no hidden states (lookup, Medusa): learned stop "
                       "policies read them, so they cannot serve it.")
    ran = tr.valid.any(-1)  # [B, S]
    if (tr.parents[ran] != np.arange(tr.parents.shape[-1]) - 1).any():
      raise ValueError("Stop predictors train on chains: give the drafter no tree.")
    np.savez(path + ".tmp.npz", hidden=tr.hidden[ran].astype(np.float16), label=tr.label[ran],
             valid=tr.valid[ran], forwarded=tr.forwarded[ran], accepted=tr.accepted[ran])
    os.replace(path + ".tmp.npz", path)
    with open(os.path.join(folder, PROGRESS), "w", encoding="utf-8") as f:
      json.dump({"done": i + batch_size, "prompts": len(prompts)}, f)
    if progress:
      print(f"collected {min(i + batch_size, len(prompts))}/{len(prompts)} prompts", flush=True)
  return files


def load(files: Sequence[str]) -> dict[str, np.ndarray]:
  """The collected steps of `files`, concatenated."""
  parts = [dict(np.load(f)) for f in files]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def examples(kind: str, data: dict[str, np.ndarray], block: int = 4):
  """(inputs, soft labels, tried-outcome (1 accepted, 0 rejected, -1 untried)) for `kind`.

  specdecpp: one example per forwarded node: its hidden state [H] and its label.
  pacer: one per block of `block` consecutive forwarded nodes of a chain (blocks start at
  depths 1, block + 1, ...): their hidden states [block, H] and the product of the labels.
  """
  ok = data["valid"] & data["forwarded"]
  tried = np.concatenate([np.ones_like(data["accepted"][:, :1]), data["accepted"][:, :-1]], 1)
  outcome = np.where(tried, data["accepted"].astype(np.int8), -1)
  if kind == "specdecpp":
    return (data["hidden"][ok].astype(np.float32), data["label"][ok], outcome[ok])
  if kind != "pacer":
    raise ValueError(f"Unknown stop predictor {kind!r}: use 'specdecpp' or 'pacer'.")
  xs, ys, outs = [], [], []
  for start in range(0, data["label"].shape[1] - block + 1, block):
    sl = slice(start, start + block)
    full = ok[:, sl].all(-1)
    xs.append(data["hidden"][full, sl].astype(np.float32))
    ys.append(np.prod(data["label"][full, sl], -1))
    # A block's outcome is known when its first node was tried.
    o = outcome[full, sl]
    outs.append(np.where(o[:, 0] < 0, -1, (o == 1).all(-1).astype(np.int8)))
  return np.concatenate(xs), np.concatenate(ys), np.concatenate(outs)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ranks = stats.rankdata(scores)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if not n_pos or not n_neg:
    raise ValueError("AUC needs both accepted and rejected examples.")
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logits_fn(kind: str):
  return learned.specdecpp_logit if kind == "specdecpp" else learned.pacer_logit_from_hidden


def fit(kind: str, x: np.ndarray, y: np.ndarray, *, steps: int = 500, batch_size: int = 256,
        lr: float = 1e-3, reject_weight: float = 6.0, block: int = 4, seed: int = 0):
  """Params of `kind` fitted with Adam to weighted BCE on soft labels (rejections weighted
  `reject_weight`, as SpecDec++ does); returns (params, final loss)."""
  key = jax.random.key(seed)
  h = x.shape[-1]
  params = (learned.specdecpp_init(key, h) if kind == "specdecpp"
            else learned.pacer_init(key, h, block))
  f = logits_fn(kind)
  tx = optax.adam(lr)

  def loss_fn(p, xb, yb):
    z = f(p, xb)
    return jnp.mean(-yb * jax.nn.log_sigmoid(z) - reject_weight * (1 - yb) * jax.nn.log_sigmoid(-z))

  @jax.jit
  def step(p, opt, xb, yb):
    loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  opt = tx.init(params)
  rng = np.random.default_rng(seed)
  loss = np.nan
  for _ in range(steps):
    idx = rng.integers(0, len(y), min(batch_size, len(y)))
    params, opt, loss = step(params, opt, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
  return params, float(loss)


def score(kind: str, params, x: np.ndarray) -> np.ndarray:
  """P(accepted) of each example."""
  return np.asarray(jax.nn.sigmoid(jax.jit(logits_fn(kind))(params, jnp.asarray(x))))


def _prompts(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
  """Each row's prompt: its tokens before the first trained (response) token."""
  return [row[:int(np.argmax(m > 0))].tolist() for row, m in zip(tokens, mask)]


def train(c, workdir: str) -> dict:
  """Collects labels with the config's drafter (resumable), fits the `c.stop_predictor`
  on the training prompts' nodes, reports its AUC on the held-out prompts' nodes (and the
  untrained predictor's), and writes workdir/predictor (load it with
  `stopping.get(kind, checkpoint=...)`). Returns the metrics."""
  from specjax import models, registry  # pylint: disable=g-import-not-at-top
  from specjax.training import data as data_lib  # pylint: disable=g-import-not-at-top

  kind = c.stop_predictor
  if kind not in ("specdecpp", "pacer"):
    raise ValueError(f"Unknown stop_predictor {kind!r}: use 'specdecpp' or 'pacer'.")
  target = models.load(c.target, c.dtype)
  drafter = registry.DRAFTERS.build(c.drafter, target, **c.drafter_kwargs)
  drafter.validate(target.config)
  if not drafter.takes_stop_policy:
    raise ValueError(f"The {c.drafter!r} drafter takes no stop policy.")
  data = data_lib.load(c.data.source, seq_len=c.data.seq_len, vocab=target.config.vocab_size,
                       encode=None if target.tokenizer is None else target.tokenizer.encode,
                       eval_rows=c.data.eval_rows, seed=c.seed, target=target)
  splits = {"train": _prompts(data.tokens, data.mask)[:c.num_prompts],
            "eval": _prompts(data.eval_tokens, data.eval_mask)}
  sets = {}
  for split, prompts in splits.items():
    files = []
    for t in c.temperatures:
      files += collect(target, drafter, prompts,
                       os.path.join(c.labels or os.path.join(workdir, "labels"), f"t{t}", split),
                       temperature=t, max_new_tokens=c.max_new_tokens,
                       batch_size=c.batch_size, seed=c.seed, progress=c.progress,
                       spec={"target": c.target, "drafter": c.drafter,
                             "drafter_kwargs": dict(c.drafter_kwargs),
                             "data": dict(c.data), "split": split})
    sets[split] = examples(kind, load(files), c.block)
  x, y, _ = sets["train"]
  xe, _, oe = sets["eval"]
  tried = oe >= 0
  params, loss = fit(kind, x, y, steps=c.fit.steps, batch_size=c.fit.batch_size, lr=c.fit.lr,
                     reject_weight=c.fit.reject_weight, block=c.block, seed=c.seed)
  untrained, _ = fit(kind, x, y, steps=0, block=c.block, seed=c.seed)
  metrics = {"kind": kind, "train_examples": int(len(y)), "eval_examples": int(tried.sum()),
             "train_label_mean": float(y.mean()), "final_loss": loss,
             "auc": auc(score(kind, params, xe)[tried], oe[tried] == 1),
             "auc_untrained": auc(score(kind, untrained, xe)[tried], oe[tried] == 1)}
  knobs = {"block": c.block} if kind == "pacer" else {}
  learned.save(os.path.join(workdir, "predictor"), kind, params, learned.drafter_id(drafter),
               target=c.target, drafter_spec={"name": c.drafter, **dict(c.drafter_kwargs)},
               temperatures=list(c.temperatures), metrics=metrics, **knobs)
  with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  return metrics
