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

A threshold is only good for some hardware: `calibrate` replays the fitted policy on the
recorded chains (`stop_depths`) and keeps the threshold whose simulated speedup under a
cost file (`simulate`) is best, reporting the fixed lengths and two oracles beside it.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax import decode
from specjax.stopping import learned

from . import minibatch, stored

PROGRESS, SPEC = "progress.json", "labels.json"


def collect(target, drafter, prompts: Sequence[Sequence[int]], folder: str, *,
            temperature: float, max_new_tokens: int, batch_size: int = 8, seed: int = 0,
            progress: bool = False, spec: dict | None = None) -> list[str]:
  """Decodes `prompts` (chains only) in batches with `trace=True`; writes one .npz per
  batch (hidden [M, N, H] float16, label, valid, forwarded, accepted [M, N] for the M
  steps that ran) and returns the files. Batches already on disk are kept (resume);
  `spec` (what made them: target, drafter, ...) is stored beside them, and a folder made
  by another spec is an error instead of a silent mix."""
  stored.claim(folder, {**(spec or {}), "temperature": temperature,
                        "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                        "seed": seed, "prompts": len(prompts)}, "labels", SPEC)
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

  def loss_fn(p, xb, yb):
    z = f(p, xb)
    return jnp.mean(-yb * jax.nn.log_sigmoid(z) - reject_weight * (1 - yb) * jax.nn.log_sigmoid(-z))

  return minibatch.adam(loss_fn, params, (x, y), steps=steps, batch_size=batch_size, lr=lr,
                        seed=seed)


def score(kind: str, params, x: np.ndarray) -> np.ndarray:
  """P(accepted) of each example."""
  return np.asarray(jax.nn.sigmoid(jax.jit(logits_fn(kind))(params, jnp.asarray(x))))


def _verify_cost(costs: dict, tokens: np.ndarray) -> np.ndarray:
  """ms of one verification forward of `tokens` tokens (linear between measured sizes)."""
  sizes = sorted(int(k) for k in costs["verify_ms"])
  return np.interp(tokens, sizes, [costs["verify_ms"][str(k)] for k in sizes])


def stop_depths(kind: str, params, data: dict[str, np.ndarray], *, threshold: float,
                min_len: int = 1, block: int = 4) -> np.ndarray:
  """int[M]: where the policy stops each collected chain of N drafts (its draft count),
  replaying `learned.SpecDecPP` / `learned.Pacer` on the recorded hidden states."""
  m, n = data["label"].shape
  ok = data["valid"] & data["forwarded"]
  depth = np.arange(1, n + 1)
  if kind == "specdecpp":
    p = np.where(ok, score(kind, params, data["hidden"].astype(np.float32)), 1.0)
    stop = (depth >= min_len) & (1.0 - np.cumprod(p, 1) > threshold) & ok
  else:
    stop = np.zeros((m, n), bool)
    for d in range(block, n, block):
      window = data["hidden"][:, d - block:d].astype(np.float32)
      stop[:, d - 1] = ok[:, d - block:d].all(1) & (score(kind, params, window) < threshold)
  return np.where(stop.any(1), np.argmax(stop, 1) + 1, n)


def _steps(data: dict[str, np.ndarray], k: np.ndarray, costs: dict, draft_ms: float,
           policy: bool) -> tuple[np.ndarray, np.ndarray]:
  """(expected tokens, ms) of each collected chain stopped after k[i] drafts."""
  n = data["label"].shape[1]
  labels = np.where(data["valid"], data["label"], 0.0).astype(np.float64)
  reach = np.cumprod(labels, 1)
  accepted = np.where(np.arange(1, n + 1) <= k[:, None], reach, 0.0).sum(1)
  if policy:
    widths = np.asarray(decode.verify_widths(n))
    width = widths[np.searchsorted(widths, k)]
    forwards = np.where(k < n, k + 1, n)
  else:
    width, forwards = k, k
  return 1.0 + accepted, forwards * draft_ms + _verify_cost(costs, 1 + width)


def simulate(data: dict[str, np.ndarray], k: np.ndarray, costs: dict, draft_ms: float, *,
             policy: bool) -> dict[str, float]:
  """Expected tokens per step, ms per step and speedup over AR of stopping each collected
  chain (N drafts) after k[i] drafts, under `costs` (`make bench`'s costs.json).

  Expected accepted drafts: sum over j <= k of prod over i <= j of the labels (exact for
  greedy 0/1 labels, the expectation for sampled ones). Draft forwards: k for a fixed-k
  drafter (its last draft is never read back); a policy also reads the k-th draft's hidden
  state unless k = N. Verification: the root + the narrowest `decode.verify_widths(N)`
  width that holds k (a fixed-k drafter verifies exactly k)."""
  tokens, ms = _steps(data, k, costs, draft_ms, policy)
  ar_ms = float(_verify_cost(costs, np.asarray([1]))[0])
  return {"tau": float(tokens.mean()), "ms_per_step": float(ms.mean()),
          "speedup": float(tokens.sum() / ms.sum() * ar_ms)}


def oracle_depths(data: dict[str, np.ndarray], costs: dict, draft_ms: float, *,
                  policy: bool = True) -> np.ndarray:
  """int[M]: each chain's stop depth with the fewest ms per expected token, knowing its
  labels: a bound on what a stop policy of this engine can do on these chains (policy
  costs), or on one that decided without reading the last draft (policy=False: fixed-k
  costs)."""
  m, n = data["label"].shape
  per_token = [np.divide(*_steps(data, np.full(m, k), costs, draft_ms, policy)[::-1])
               for k in range(1, n + 1)]
  return np.argmin(np.stack(per_token, 1), 1) + 1


THRESHOLDS = tuple(np.round(np.linspace(0.05, 0.95, 19), 2).tolist())


def calibrate(kind: str, params, train_data: dict, eval_data: dict, costs: dict,
              draft_ms: float, block: int) -> dict:
  """The threshold (and SpecDec++'s min_len) with the best simulated speedup on the
  training prompts' chains; the held-out simulated speedup at it and of every fixed K."""
  n = train_data["label"].shape[1]
  grid = [(t, m) for t in THRESHOLDS for m in ((1, 2) if kind == "specdecpp" else (1,))]
  sim = lambda data, t, m: simulate(data, stop_depths(kind, params, data, threshold=t,
                                                      min_len=m, block=block),
                                    costs, draft_ms, policy=True)
  best_t, best_m = max(grid, key=lambda tm: sim(train_data, *tm)["speedup"])
  out = {"threshold": best_t, "eval": sim(eval_data, best_t, best_m),
         "eval_oracle": simulate(eval_data, oracle_depths(eval_data, costs, draft_ms),
                                 costs, draft_ms, policy=True),
         "eval_oracle_fixed_costs": simulate(
             eval_data, oracle_depths(eval_data, costs, draft_ms, policy=False), costs,
             draft_ms, policy=False),
         "eval_fixed": {str(k): simulate(eval_data, np.full(len(eval_data["label"]), k),
                                         costs, draft_ms, policy=False)
                        for k in range(1, n + 1)}}
  if kind == "specdecpp":
    out["min_len"] = best_m
  return out


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

  from specjax.training import trainer  # pylint: disable=g-import-not-at-top

  kind = c.stop_predictor
  if kind not in ("specdecpp", "pacer"):
    raise ValueError(f"Unknown stop_predictor {kind!r}: use 'specdecpp' or 'pacer'.")
  trainer.check_numbers(c, {"batch_size": 1, "num_prompts": 1, "max_new_tokens": 1,
                            "block": 1, "fit.steps": 1, "fit.batch_size": 1,
                            "data.seq_len": 2, "data.eval_rows": 1})
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
    sets[split] = load(files)
  x, y, _ = examples(kind, sets["train"], c.block)
  xe, _, oe = examples(kind, sets["eval"], c.block)
  tried = oe >= 0
  params, loss = fit(kind, x, y, steps=c.fit.steps, batch_size=c.fit.batch_size, lr=c.fit.lr,
                     reject_weight=c.fit.reject_weight, block=c.block, seed=c.seed)
  untrained, _ = fit(kind, x, y, steps=0, block=c.block, seed=c.seed)
  metrics = {"kind": kind, "train_examples": int(len(y)), "eval_examples": int(tried.sum()),
             "train_label_mean": float(y.mean()), "final_loss": loss,
             "auc": auc(score(kind, params, xe)[tried], oe[tried] == 1),
             "auc_untrained": auc(score(kind, untrained, xe)[tried], oe[tried] == 1)}
  knobs = {"block": c.block} if kind == "pacer" else {}
  if c.calibrate.costs:
    with open(c.calibrate.costs, encoding="utf-8") as f:
      costs = json.load(f)
    draft_ms = c.calibrate.draft_ms or costs["draft_ms"]
    cal = calibrate(kind, params, sets["train"], sets["eval"], costs, draft_ms, c.block)
    metrics["calibration"] = {"costs": c.calibrate.costs, "draft_ms": draft_ms, **cal}
    knobs.update({k: cal[k] for k in ("threshold", "min_len") if k in cal})
  learned.save(os.path.join(workdir, "predictor"), kind, params, learned.drafter_id(drafter),
               target=c.target, drafter_spec={"name": c.drafter, **dict(c.drafter_kwargs)},
               temperatures=list(c.temperatures), metrics=metrics, **knobs)
  with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=1)
  return metrics
