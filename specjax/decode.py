"""generate(): autoregressive and draft-and-verify decoding in one jitted while_loop.

Data flow of one step (AR decoding is the same step with an empty draft tree):

  history[b, :length[b]]   committed tokens; the last one, the root, is not in the cache
  drafter.propose    ->    DraftTree of N nodes rooted at the root
  target forward     on    [root, node_0..node_{N-1}] at [lengths, lengths + 1 + N)
  verify.verify      ->    accepted path + next token (bonus or correction)
  cache.commit       keeps root + accepted nodes; history gains accepted + next token

Every sequence of a ragged batch accepts its own number of tokens and stops on its own
EOS or budget; finished sequences ride along without changing. Statistics are counted
per sequence: tau = new tokens / target calls (the bonus token counts, so AR has tau 1).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import stopping
from specjax import verify as verify_lib
from specjax.drafters.base import Context
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import Model, forward
from specjax.sampling import Sampling
from specjax.tree import DraftTree


@flax.struct.dataclass
class Stats:
  accepted: jax.Array  # int32[B, S]: tokens gained per step (accepted drafts + 1); 0 = idle
  target_calls: jax.Array  # int32[B]: verification forwards (the prefill is not counted)
  draft_calls: jax.Array  # int32[B]: drafter forwards


@flax.struct.dataclass
class Output:
  tokens: jax.Array  # int32[B, max_new_tokens], valid up to `lengths` (EOS included)
  lengths: jax.Array  # int32[B]
  stats: Stats

  def token_lists(self) -> list[list[int]]:
    toks, lens = np.asarray(self.tokens), np.asarray(self.lengths)
    return [toks[b, :lens[b]].tolist() for b in range(toks.shape[0])]

  @property
  def tau(self) -> np.ndarray:
    """Mean accepted length per target call, per sequence (bonus token included)."""
    return np.asarray(self.lengths) / np.maximum(np.asarray(self.stats.target_calls), 1)


@flax.struct.dataclass
class _State:
  cache: KVCache
  history: jax.Array  # int32[B, L]
  length: jax.Array  # int32[B]
  new: jax.Array  # int32[B] tokens generated so far
  done: jax.Array  # bool[B]
  drafter: Any
  stats: Stats
  step: jax.Array


def _empty_tree(b: int) -> DraftTree:
  return DraftTree.chain(jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool))


def _write(buf_BxL, rows_BxW, start_B):
  return jax.vmap(lambda r, x, i: jax.lax.dynamic_update_slice_in_dim(r, x, i, 0))(
      buf_BxL, rows_BxW, start_B)


@functools.partial(jax.jit, static_argnames=(
    "cfg", "sampling", "rule", "max_new_tokens", "eos", "max_len"))
def _generate(cfg: ModelConfig, params, drafter, stop, prompt_BxP, prompt_len_B, key, *,
              sampling: Sampling, rule: verify_lib.Acceptance, max_new_tokens: int,
              eos: tuple[int, ...], max_len: int) -> Output:
  b, p = prompt_BxP.shape
  n = 0 if drafter is None else drafter.num_nodes
  cache = KVCache.create(cfg.num_layers, b, max_len, cfg.num_kv_heads, cfg.head_dim,
                         jax.tree.leaves(params)[0].dtype)
  if p > 1:  # prefill everything but the last prompt token (the first root)
    positions = jnp.broadcast_to(jnp.arange(p - 1), (b, p - 1))
    cache = forward(cfg, params, prompt_BxP[:, :-1], positions,
                    cache.attention_mask(num_new=p - 1), cache).cache
  cache = cache.advance(prompt_len_B - 1)
  history = jnp.zeros((b, max_len), jnp.int32).at[:, :p].set(prompt_BxP)
  ctx = Context(history, prompt_len_B)
  zeros = jnp.zeros((b,), jnp.int32)
  state = _State(
      cache=cache, history=history, length=prompt_len_B, new=zeros,
      done=jnp.zeros((b,), bool),
      drafter=() if drafter is None else drafter.init(ctx, max_len, p),
      stats=Stats(jnp.zeros((b, max_new_tokens), jnp.int32), zeros, zeros),
      step=jnp.zeros((), jnp.int32))
  rows = jnp.arange(b)
  eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

  def body(st: _State) -> _State:
    ctx = Context(st.history, st.length)
    live = ~st.done
    draft_key, verify_key = jax.random.split(jax.random.fold_in(key, st.step))
    if drafter is None:
      tree, dstate, draft_calls = _empty_tree(b), st.drafter, zeros
    else:
      tree, dstate, draft_calls = drafter.propose(st.drafter, ctx, stop, sampling, draft_key)
    root_B = st.history[rows, st.length - 1]

    def verify_tree(tree):
      tokens, positions, tree_mask = tree.verify_inputs(root_B, st.length - 1)
      out = forward(cfg, params, tokens, positions, st.cache.attention_mask(tree_mask),
                    st.cache)
      verdict = verify_lib.verify(rule, tree, out.logits, sampling, verify_key)
      return out.cache, out.hidden, verdict

    def verify_root_only(tree):
      """No sequence has a draft (e.g. no n-gram match): a plain AR step, at AR cost."""
      cache, hidden, verdict = verify_tree(_empty_tree(b))
      hidden = jnp.pad(hidden, ((0, 0), (0, n), (0, 0)))
      return cache, hidden, verdict._replace(path=jnp.zeros((b, n), jnp.int32))

    if n:
      cache, hidden, verdict = jax.lax.cond(tree.valid.any(), verify_tree, verify_root_only,
                                            tree)
    else:
      cache, hidden, verdict = verify_tree(tree)
    verdict = verdict._replace(num_accepted=jnp.where(live, verdict.num_accepted, 0))
    a_B = verdict.num_accepted
    # Target cache: keep the root (offset 0) and the accepted nodes (offset 1 + node).
    keep = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), 1 + verdict.path], axis=1)
    cache = cache.commit(keep, jnp.where(live, 1 + a_B, 0))
    # New tokens: the accepted path then the next token; cut after the first EOS.
    j = jnp.arange(n + 1)
    path_tokens = jnp.take_along_axis(tree.tokens, verdict.path, 1)
    window = jnp.where(j < a_B[:, None],
                       jnp.concatenate([path_tokens, zeros[:, None]], 1), verdict.next_token[:, None])
    is_eos = jnp.isin(window, eos_arr) & (j <= a_B[:, None])
    hit_eos = is_eos.any(-1)
    gained = jnp.where(hit_eos, jnp.argmax(is_eos, -1) + 1, a_B + 1)
    gained = jnp.where(live, gained, 0).astype(jnp.int32)
    new = st.new + gained
    stats = Stats(st.stats.accepted.at[:, st.step].set(gained),
                  st.stats.target_calls + live, st.stats.draft_calls + draft_calls * live)
    dstate = dstate if drafter is None else drafter.commit(dstate, ctx, verdict, hidden)
    return _State(cache=cache, history=_write(st.history, window, st.length),
                  length=st.length + gained, new=new,
                  done=st.done | (live & hit_eos) | (new >= max_new_tokens), drafter=dstate,
                  stats=stats, step=st.step + 1)

  def cond(st: _State):
    return (st.step < max_new_tokens) & ~st.done.all()

  st = jax.lax.while_loop(cond, body, state)
  lengths = jnp.minimum(st.new, max_new_tokens)
  idx = jnp.minimum(prompt_len_B[:, None] + jnp.arange(max_new_tokens), max_len - 1)
  tokens = jnp.take_along_axis(st.history, idx, 1)
  tokens = jnp.where(jnp.arange(max_new_tokens) < lengths[:, None], tokens, 0)
  return Output(tokens, lengths, st.stats)


def _encode_prompts(model: Model, prompts) -> list[list[int]]:
  if isinstance(prompts, (str, np.ndarray)) or (prompts and isinstance(prompts[0], int)):
    prompts = [prompts]
  out = []
  for i, pr in enumerate(prompts):
    if isinstance(pr, str):
      if model.tokenizer is None:
        raise ValueError("String prompts need a model with a tokenizer; pass token ids.")
      pr = model.tokenizer.encode(pr)
    pr = [int(t) for t in np.asarray(pr).reshape(-1)]
    if not pr:
      raise ValueError(f"Prompt {i} is empty: every prompt needs at least one token.")
    bad = [t for t in pr if not 0 <= t < model.config.vocab_size]
    if bad:
      raise ValueError(f"Prompt {i} has token ids outside [0, {model.config.vocab_size}): "
                       f"{bad[:5]}.")
    out.append(pr)
  return out


def _eos_ids(model: Model, eos) -> tuple[int, ...]:
  if eos == "default":
    return tuple(model.tokenizer.eos_ids) if model.tokenizer is not None else ()
  if eos is None:
    return ()
  return (int(eos),) if isinstance(eos, (int, np.integer)) else tuple(int(e) for e in eos)


def cache_size(prompt_width: int, max_new_tokens: int, num_nodes: int) -> int:
  """Slots the loop needs: prompt, budget, and room for one overshooting step + a tree."""
  return prompt_width + max_new_tokens + 2 * (num_nodes + 1)


def generate(model: Model, prompts: Sequence[Sequence[int] | str] | str, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos: Any = "default",
             drafter: Any = None, stop: Any = None, acceptance: Any = None,
             max_len: int | None = None, pad_to: int = 1) -> Output:
  """Decodes a batch of prompts (ragged token lists, or strings via the model's tokenizer).

  Args:
    model: the target `Model`.
    prompts: one prompt or a list; strings are encoded as-is (no chat template; render one
      with `model.tokenizer.apply_chat_template` first).
    max_new_tokens: budget per sequence.
    temperature, top_k, top_p: the target distribution (temperature 0 = greedy).
    seed: PRNG seed for sampling and sampled drafts.
    eos: "default" (the tokenizer's EOS ids), None (never stop early), an id or ids.
    drafter: None for autoregressive decoding, or a drafter (`specjax.drafters`).
    stop: a stop policy for chain drafters ("fixed", "confidence", "svip" or an instance).
    acceptance: "greedy" (default at temperature 0), "speculative" (default when
      sampling), or the LOSSY "typical" / "fuzzy" (name or `verify.Acceptance`).
    max_len: optional cache size limit; an error names the shortfall.
    pad_to: round the prompt width up to a multiple of this (fewer recompiles in sweeps).

  Returns:
    Output(tokens [B, max_new_tokens], lengths [B], stats).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  sampling = Sampling(temperature, top_k, top_p)
  if acceptance is None:
    acceptance = "greedy" if sampling.greedy else "speculative"
  rule = verify_lib.get(acceptance)
  if rule.name == "greedy" and not sampling.greedy:
    raise ValueError("acceptance='greedy' needs temperature=0; use 'speculative' to sample.")
  if rule.name == "fuzzy" and sampling.greedy:
    raise ValueError("acceptance='fuzzy' compares sampling distributions: use temperature>0.")
  if drafter is None and stop is not None:
    raise ValueError("A stop policy needs a drafter.")
  if drafter is not None:
    drafter.validate(model.config)
    if stop is not None and not getattr(drafter, "takes_stop_policy", False):
      raise ValueError(f"{type(drafter).__name__} proposes without a distribution; stop "
                       "policies do not apply to it.")
  stop = stopping.get(stop)
  tokens = _encode_prompts(model, prompts)
  lens = [len(t) for t in tokens]
  width = -(-max(lens) // pad_to) * pad_to
  n = 0 if drafter is None else drafter.num_nodes
  need = cache_size(width, max_new_tokens, n)
  if max_len is not None and need > max_len:
    raise ValueError(f"Prompt of {max(lens)} tokens + max_new_tokens={max_new_tokens} + tree "
                     f"room {2 * (n + 1)} needs {need} cache slots; max_len is {max_len}.")
  limit = model.config.max_position_embeddings
  if max(lens) + max_new_tokens + n > limit:
    raise ValueError(f"Prompt of {max(lens)} tokens + max_new_tokens={max_new_tokens} exceeds "
                     f"the model's context of {limit} positions.")
  prompt_BxP = np.zeros((len(tokens), width), np.int32)
  for i, t in enumerate(tokens):
    prompt_BxP[i, :len(t)] = t
  return _generate(model.config, model.params, drafter, stop, jnp.asarray(prompt_BxP),
                   jnp.asarray(lens, jnp.int32), jax.random.key(seed), sampling=sampling,
                   rule=rule, max_new_tokens=max_new_tokens, eos=_eos_ids(model, eos),
                   max_len=max_len or need)
