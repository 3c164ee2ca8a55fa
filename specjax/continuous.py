"""Speculative decoding of continuous-valued tokens, exactly (after "Continuous Speculative
Decoding for Autoregressive Image Generation").

The tokens are vectors. A small causal transformer reads the sequence and outputs, at each
position, a mixture of diagonal Gaussians (a mixture-of-Gaussians head, `MoG`) over the
next vector; its density is exact, so the discrete rule carries over:

  accept a draft x ~ q with probability min(1, p(x) / q(x));
  on rejection, draw from the normalised max(0, p - q) by proposing y ~ p and keeping it
  with probability max(0, 1 - q(y) / p(y)) until one is kept.

The kept proposal's density is proportional to p(y) (1 - q(y)/p(y))^+ = (p - q)^+, so the
output follows p exactly (the loop runs until every row has one: it ends with probability
one, after 1 / TV(p, q) tries on average). The loop is the discrete one: the draft model
proposes `gamma` vectors autoregressively, the target scores the root and all of them in
one forward, the longest accepted prefix is kept and one more vector (the residual draw or
the bonus) follows; rows of a batch advance by their own counts.

The paper's diffusion-head version needs shortcuts that are not exact, two of which apply
to any density and are offered here as LOSSY options (`Rule`): an inner temperature on the
acceptance ratio (accept with min(1, (p/q)^(1/temperature)); the public code uses 42) and
a cap on the residual draw's tries (then the last proposal, a plain draw from p, is kept;
the paper gives up after 100). Its third, the ratio taken on the last denoising step's
Gaussian with noise shared between the two models, belongs to diffusion heads and has no
counterpart on a mixture head.

The models here are trained in seconds on synthetic sequences (`synthetic`, `train`):
`python -m specjax.continuous` trains a target and a draft and prints tau for the exact
rule and the lossy shortcuts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Config:
  dim: int = 2  # the token vectors' size
  hidden: int = 64
  layers: int = 2
  heads: int = 4
  components: int = 4  # Gaussians in the output mixture
  max_len: int = 64


class MoG(NamedTuple):
  """A mixture of diagonal Gaussians per position: weights' logits [..., K], means and
  log standard deviations [..., K, D]."""
  logits: jax.Array
  mean: jax.Array
  log_std: jax.Array

  def log_prob(self, x_xD: jax.Array) -> jax.Array:
    z = (x_xD[..., None, :] - self.mean) * jnp.exp(-self.log_std)
    comp = -0.5 * jnp.sum(z * z + 2 * self.log_std + math.log(2 * math.pi), -1)
    return jax.nn.logsumexp(jax.nn.log_softmax(self.logits, -1) + comp, -1)

  def sample(self, key: jax.Array) -> jax.Array:
    kc, kn = jax.random.split(key)
    k = jax.random.categorical(kc, self.logits, -1)
    pick = lambda a: jnp.take_along_axis(a, k[..., None, None], -2)[..., 0, :]
    mean, log_std = pick(self.mean), pick(self.log_std)
    return mean + jnp.exp(log_std) * jax.random.normal(kn, mean.shape)


def init(cfg: Config, key: jax.Array) -> dict[str, Any]:
  keys = iter(jax.random.split(key, 4 + 4 * cfg.layers))
  dense = lambda i, o: jax.random.normal(next(keys), (i, o)) / math.sqrt(i)
  h = cfg.hidden
  return {
      "embed": dense(cfg.dim, h), "bos": jnp.zeros((h,)),
      "pos": 0.02 * jax.random.normal(next(keys), (cfg.max_len, h)),
      "layers": [{"qkv": dense(h, 3 * h), "out": dense(h, h), "up": dense(h, 4 * h),
                  "down": dense(4 * h, h)} for _ in range(cfg.layers)],
      "head": dense(h, cfg.components * (1 + 2 * cfg.dim)) * 0.1,
  }


def _norm(x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def forward(cfg: Config, params, x_BxTxD: jax.Array) -> MoG:
  """The mixture over vector t + 1 at every position t, given vectors 0..t; position 0 is
  a learned start state, so the output's [:, t] predicts x[:, t] (the sequence's first
  vector comes from [:, 0])."""
  b, t, _ = x_BxTxD.shape
  h = jnp.concatenate([jnp.broadcast_to(params["bos"], (b, 1, cfg.hidden)),
                       x_BxTxD[:, :-1] @ params["embed"]], 1) + params["pos"][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  hd = cfg.hidden // cfg.heads
  for layer in params["layers"]:
    q, k, v = jnp.split(_norm(h) @ layer["qkv"], 3, -1)
    split = lambda a: a.reshape(b, t, cfg.heads, hd)
    att = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(hd)
    att = jax.nn.softmax(jnp.where(mask, att, -1e30), -1)
    h = h + jnp.einsum("bhqk,bkhd->bqhd", att, split(v)).reshape(b, t, -1) @ layer["out"]
    h = h + jax.nn.gelu(_norm(h) @ layer["up"]) @ layer["down"]
  out = (_norm(h) @ params["head"]).reshape(b, t, cfg.components, 1 + 2 * cfg.dim)
  return MoG(out[..., 0], out[..., 1:1 + cfg.dim],
             jnp.clip(out[..., 1 + cfg.dim:], -5.0, 3.0))


# ------------------------------------------------------------------------------------------
# Data and training.


def synthetic(key: jax.Array, n: int, length: int) -> jax.Array:
  """float32[n, length, 2]: a rotating walk whose start is one of four corners and whose
  steps jump between two radii: a multi-modal conditional law a mixture head can learn."""
  k0, k1, kc, kn = jax.random.split(key, 4)
  corners = jnp.array([[1., 1.], [1., -1.], [-1., 1.], [-1., -1.]])
  x0 = corners[jax.random.randint(k0, (n,), 0, 4)] + 0.1 * jax.random.normal(k1, (n, 2))
  c, s = math.cos(0.6), math.sin(0.6)
  rot = jnp.array([[c, -s], [s, c]])

  def step(x, keys):
    kr, ke = keys
    radius = jnp.where(jax.random.bernoulli(kr, 0.5, (n, 1)), 0.6, 1.4)
    y = x @ rot.T
    y = radius * y / jnp.linalg.norm(y, axis=-1, keepdims=True)
    y = y + 0.15 * jax.random.normal(ke, (n, 2))
    return y, y

  keys = jnp.stack([jax.random.split(kc, length - 1), jax.random.split(kn, length - 1)], 1)
  _, rest = jax.lax.scan(step, x0, keys)
  return jnp.concatenate([x0[:, None], jnp.swapaxes(rest, 0, 1)], 1)


def nll(cfg: Config, params, x_BxTxD) -> jax.Array:
  return -jnp.mean(forward(cfg, params, x_BxTxD).log_prob(x_BxTxD))


def train(cfg: Config, key: jax.Array, *, steps: int = 300, batch: int = 64,
          length: int = 16, lr: float = 3e-3, log_every: int = 0):
  """(params, final mean NLL per vector) after `steps` Adam steps on fresh synthetic
  batches."""
  k_init, k_data = jax.random.split(key)
  params = init(cfg, k_init)
  opt = optax.adam(lr)
  state = opt.init(params)

  @jax.jit
  def update(params, state, key):
    loss, grads = jax.value_and_grad(functools.partial(nll, cfg))(
        params, synthetic(key, batch, length))
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  for i, k in enumerate(jax.random.split(k_data, steps)):
    params, state, loss = update(params, state, k)
    if log_every and (i + 1) % log_every == 0:
      print(f"step {i + 1}/{steps}: nll {float(loss):.3f}", flush=True)
  return params, float(loss)


# ------------------------------------------------------------------------------------------
# Decoding.


@dataclasses.dataclass(frozen=True)
class Rule:
  """The verification rule. The defaults are exact (lossless); `ratio_temperature` != 1
  or a finite `max_tries` are the paper's shortcuts (LOSSY)."""
  ratio_temperature: float = 1.0
  max_tries: int | None = None  # None: draw the residual until a proposal is kept

  def __post_init__(self):
    if not self.ratio_temperature > 0:
      raise ValueError(f"ratio_temperature must be > 0; got {self.ratio_temperature}.")
    if self.max_tries is not None and self.max_tries < 1:
      raise ValueError(f"max_tries must be >= 1 (or None: exact); got {self.max_tries}.")

  @property
  def lossless(self) -> bool:
    return self.ratio_temperature == 1.0 and self.max_tries is None


class Output(NamedTuple):
  vectors: jax.Array  # float32[B, new, D]
  target_calls: jax.Array  # int32[B]
  residual_proposals: jax.Array  # int32[]: proposals the residual draws made, all rows


def _pick(mog: MoG, pos_B: jax.Array) -> MoG:
  """Each row's mixture at its own position."""
  rows = jnp.arange(pos_B.shape[0])
  return MoG(*(a[rows, pos_B] for a in mog))


def _residual(key, p: MoG, q: MoG, rule: Rule, todo_B):
  """One draw per row from norm(max(0, p - q)) by rejection from p (rows in `todo_B`)."""
  def cond(c):
    return jnp.any(c[2])

  def body(c):
    key, y, pending, rounds, proposals = c
    key, kp, ku = jax.random.split(key, 3)
    prop = p.sample(kp)
    keep = jnp.log(jax.random.uniform(ku, pending.shape)) < jnp.log1p(
        -jnp.minimum(jnp.exp(q.log_prob(prop) - p.log_prob(prop)), 1.0))
    if rule.max_tries is not None:  # LOSSY: the last try keeps its plain draw from p
      keep = keep | (rounds + 1 >= rule.max_tries)
    take = pending & keep
    return (key, jnp.where(take[:, None], prop, y), pending & ~take, rounds + 1,
            proposals + jnp.sum(pending, dtype=jnp.int32))

  y0 = jnp.zeros(p.mean.shape[:1] + p.mean.shape[-1:])
  _, y, _, _, tries = jax.lax.while_loop(cond, body, (key, y0, todo_B, jnp.int32(0),
                                                      jnp.int32(0)))
  return y, tries


@functools.partial(jax.jit, static_argnames=("cfg", "draft_cfg", "new", "gamma", "rule"))
def generate(cfg: Config, params, draft_cfg: Config | None, draft_params, prompt_BxPxD,
             key, *, new: int, gamma: int, rule: Rule = Rule()) -> Output:
  """`new` vectors after each prompt: autoregressive from the target when gamma = 0 (or
  no draft), else draft `gamma` and verify. One program; every row ends with exactly
  `new` vectors."""
  b, plen, d = prompt_BxPxD.shape
  size = plen + new + gamma + 1
  if size > cfg.max_len:
    raise ValueError(f"prompt {plen} + new {new} + gamma {gamma} + 1 exceeds max_len "
                     f"{cfg.max_len}.")
  seq = jnp.zeros((b, size, d)).at[:, :plen].set(prompt_BxPxD)
  rows = jnp.arange(b)

  def body(c):
    seq, n_B, calls, tries, key = c
    key, kd, ka, kr, kb = jax.random.split(key, 5)
    live = n_B < plen + new
    # Draft gamma vectors autoregressively (a draft forward per vector).
    q_logs, drafted = [], seq
    for j, kj in enumerate(jax.random.split(kd, gamma)):
      qj = _pick(forward(draft_cfg, draft_params, drafted), n_B + j)
      xj = qj.sample(kj)
      drafted = drafted.at[rows, n_B + j].set(xj)
      q_logs.append(qj)
    # The target scores every drafted position and the one after in one forward.
    p_all = forward(cfg, params, drafted)
    acc = jnp.ones((b,), bool)
    accepted = jnp.zeros((b,), jnp.int32)
    for j in range(gamma):
      pj = _pick(p_all, n_B + j)
      xj = drafted[rows, n_B + j]
      log_ratio = (pj.log_prob(xj) - q_logs[j].log_prob(xj)) / rule.ratio_temperature
      ok = jnp.log(jax.random.uniform(jax.random.fold_in(ka, j), (b,))) < log_ratio
      acc = acc & ok
      accepted = accepted + acc
    # The next vector: the residual draw at the first rejection, else the bonus from p.
    p_next = _pick(p_all, n_B + accepted)
    if gamma:
      q_stack = MoG(*(jnp.stack([getattr(qq, f) for qq in q_logs], 1) for f in MoG._fields))
      q_next = _pick(q_stack, jnp.minimum(accepted, gamma - 1))
      resid, t = _residual(kr, p_next, q_next, rule, live & (accepted < gamma))
    else:
      resid, t = jnp.zeros((b, d)), jnp.int32(0)
    nxt = jnp.where((accepted < gamma)[:, None], resid, p_next.sample(kb))
    new_seq = drafted.at[rows, n_B + accepted].set(nxt)
    seq = jnp.where(live[:, None, None], new_seq, seq)
    return (seq, jnp.where(live, n_B + accepted + 1, n_B), calls + live, tries + t, key)

  init_c = (seq, jnp.full((b,), plen, jnp.int32), jnp.zeros((b,), jnp.int32), jnp.int32(0),
            key)
  seq, _, calls, tries, _ = jax.lax.while_loop(
      lambda c: jnp.any(c[1] < plen + new), body, init_c)
  return Output(seq[:, plen:plen + new], calls, tries)


def main():
  """Trains a target (2 layers, 4 components) and a draft (1 narrow layer, 1 component)
  and reports tau (vectors per target call) for the exact rule and the lossy shortcuts."""
  cfg, draft_cfg = Config(), Config(hidden=32, layers=1, heads=2, components=1)
  start = time.time()
  params, t_nll = train(cfg, jax.random.key(0), steps=600)
  dparams, d_nll = train(draft_cfg, jax.random.key(1), steps=600)
  print(f"trained in {time.time() - start:.0f} s: target nll {t_nll:.3f}, draft nll "
        f"{d_nll:.3f} per vector")
  prompt = synthetic(jax.random.key(2), 512, 4)
  print("| rule | gamma | tau | residual proposals per row | lossy |\n|---|---|---|---|---|")
  for gamma in (2, 4):
    for rule in (Rule(), Rule(ratio_temperature=4.0), Rule(max_tries=2)):
      out = generate(cfg, params, draft_cfg, dparams, prompt, jax.random.key(3), new=24,
                     gamma=gamma, rule=rule)
      tau = 24 / float(np.mean(np.asarray(out.target_calls)))
      print(f"| {rule} | {gamma} | {tau:.2f} | {int(out.residual_proposals) / 512:.2f} | "
            f"{'no' if rule.lossless else 'LOSSY'} |")


if __name__ == "__main__":
  main()
