"""generate(): autoregressive and draft-and-verify decoding in one jitted while_loop.

Data flow of one step (AR decoding is the same step with an empty draft tree):

  history[b, :length[b]]   committed tokens; the last one, the root, is not in the cache
  drafter.propose    ->    DraftTree of N nodes rooted at the root
  target forward     on    [root, node_0..node_{N-1}] at [lengths, lengths + 1 + N),
                           returning the target features the drafter declared
  verify.verify      ->    accepted path + next token (bonus or correction)
  cache.commit       keeps root + accepted nodes; history gains accepted + next token
  drafter.commit     sees the verdict and the features of [root, nodes...]

Before the loop the prefill runs the prompt (all but its last token, the first root) and
hands the drafter's declared features to `drafter.init`.

Every sequence of a ragged batch accepts its own number of tokens and stops on its own
EOS or budget; finished sequences ride along without changing. Statistics are counted
per sequence: tau = new tokens / target calls (the bonus token counts, so AR has tau 1).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from specjax import registry, sharding, stopping
from specjax import verify as verify_lib
from specjax.drafters.base import Context
from specjax.models import cache as cache_lib
from specjax.models.cache import KVCache
from specjax.models.config import ModelConfig
from specjax.models.model import Model, check_features, forward, param_dtype, prefill
from specjax.sampling import Sampling
from specjax.tree import DraftTree


@flax.struct.dataclass
class Stats:
  gained: jax.Array  # int32[B, S]: tokens gained per step (accepted drafts + 1); 0 = idle
  target_calls: jax.Array  # int32[B]: verification forwards (the prefill is not counted)
  draft_calls: jax.Array  # int32[B]: drafter forwards
  # int32[B]: tokens the verification forwards carried (root + the verified width, which
  # follows the longest draft in the batch: `verify_widths`)
  verified: jax.Array


@flax.struct.dataclass
class Trace:
  """Every draft node of every step ([B, S, N], S = max_new_tokens; `generate(trace=True)`):
  what learned stop policies train on. Steps a sequence did not run have valid False."""
  tokens: jax.Array  # int32
  parents: jax.Array  # int32, -1 = the step's root
  valid: jax.Array  # bool: drafted (not cut off) in a step the sequence ran
  label: jax.Array  # float32: P(accepted | parent accepted), `verify.acceptance_probs`
  accepted: jax.Array  # bool: on the accepted path
  hidden: jax.Array | None  # [B, S, N, H]: the drafter's hidden state at the node
  forwarded: jax.Array | None  # bool: `hidden` is real (the drafter forwarded the node)


@flax.struct.dataclass
class Output:
  tokens: jax.Array  # int32[B, max_new_tokens], valid up to `lengths` (EOS included)
  lengths: jax.Array  # int32[B]
  stats: Stats
  trace: Trace | None = None
  # The drafter's state after the last step, for drafters that learn across calls
  # (`drafter.carry(output)` is the next call's drafter: Token Recycling's matrix,
  # SuffixDecoding's corpus); None for the others and on a mesh (`plan`).
  drafter_state: Any = None

  def token_lists(self) -> list[list[int]]:
    toks, lens = np.asarray(self.tokens), np.asarray(self.lengths)
    return [toks[b, :lens[b]].tolist() for b in range(toks.shape[0])]

  @property
  def tau(self) -> np.ndarray:
    """Mean accepted length per target call, per sequence (bonus token included)."""
    return np.asarray(self.lengths) / np.maximum(np.asarray(self.stats.target_calls), 1)


@flax.struct.dataclass
class State:
  """The loop's carry over B rows (`start`, `step`; `specjax.serve` keeps one per slot)."""
  cache: KVCache  # the target's, of every committed token but the root
  history: jax.Array  # int32[B, L]: prompt + generated tokens, left-aligned
  length: jax.Array  # int32[B]
  new: jax.Array  # int32[B] tokens generated so far
  budget: jax.Array  # int32[B]: the row is done once `new` reaches it
  done: jax.Array  # bool[B]
  drafter: Any
  stats: Stats
  step: jax.Array  # int32: steps run (the PRNG key's fold-in)
  trace: Trace | None


def _empty_tree(b: int) -> DraftTree:
  return DraftTree.chain(jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool))


def verify_widths(n: int) -> tuple[int, ...]:
  """The node counts one step's verification is compiled for: 0 (an AR step), the powers
  of two below `n`, and `n`. Where the target's cost grows with the tokens it verifies
  (CPUs; large batches anywhere), drafting less must also verify less for a stop policy
  to pay."""
  return tuple(sorted({0, n} | {1 << i for i in range(max(n, 1).bit_length()) if 1 << i < n}))


def _drafts_vary(drafter, stop) -> bool:
  """Whether a step's drafts can be narrower than the drafter's tree: a stop policy cuts
  them, or the drafter's own drafts vary (`Drafter.drafts_vary`: prompt lookup)."""
  return drafter.drafts_vary or not isinstance(stop, stopping.Fixed)


def _write(buf_BxL, rows_BxW, start_B):
  return jax.vmap(lambda r, x, i: jax.lax.dynamic_update_slice_in_dim(r, x, i, 0))(
      buf_BxL, rows_BxW, start_B)


def _empty_trace(tree: DraftTree, steps: int) -> Trace:
  """Zero [B, steps, N, ...] buffers shaped like `tree` (a ShapeDtypeStruct tree)."""
  b, n = tree.tokens.shape
  z = lambda x, dtype=None: None if x is None else jnp.zeros(
      (b, steps) + x.shape[1:], dtype or x.dtype)
  return Trace(z(tree.tokens), z(tree.parents), z(tree.valid, bool),
               jnp.zeros((b, steps, n), jnp.float32), z(tree.valid, bool), z(tree.hidden),
               z(tree.forwarded))


def _record(trace: Trace, step, tree: DraftTree, label_BxN, verdict, live_B) -> Trace:
  """`trace` with step `step`'s tree, labels and verdict written in."""
  n = tree.num_nodes
  on_path = jnp.arange(n) < verdict.accepted_drafts[:, None]
  accepted_BxN = jnp.zeros(tree.tokens.shape, bool).at[
      jnp.arange(tree.tokens.shape[0])[:, None], verdict.path].max(on_path)
  live = live_B[:, None]
  row = Trace(tree.tokens, tree.parents, tree.valid & live, label_BxN, accepted_BxN & live,
              tree.hidden, None if tree.forwarded is None else tree.forwarded & live)
  return jax.tree.map(lambda buf, x: buf.at[:, step].set(x.astype(buf.dtype)), trace, row)


def _decode(cfg: ModelConfig, params, drafter, stop, history_BxL, prompt_len_B, key, *,
            sampling: Sampling, rule: verify_lib.Acceptance, max_new_tokens: int,
            eos: tuple[int, ...], trace: bool = False,
            plan: sharding.Plan | None = None) -> Output:
  """The whole decode, one program per cache size L (= the history's width): `start`, then
  `step` under one while_loop until every row is done, then `finish`. With a `plan`, the
  KV cache is laid out over its mesh (batch and KV heads), kernels run per device
  (`sharding.use`), and XLA's SPMD partitioner shards the rest from the placed arguments."""
  with sharding.use(plan):
    budget_B = jnp.full(prompt_len_B.shape, max_new_tokens, jnp.int32)
    st = start(cfg, params, drafter, stop, history_BxL, prompt_len_B, budget_B, key,
               sampling=sampling, max_new_tokens=max_new_tokens, trace=trace, plan=plan)
    st = jax.lax.while_loop(
        lambda st: (st.step < max_new_tokens) & ~st.done.all(),
        lambda st: step(cfg, params, drafter, stop, st, key, sampling=sampling, rule=rule,
                        eos=eos, plan=plan), st)
    return finish(drafter, st, prompt_len_B, max_new_tokens, keep_drafter=plan is None)


def start(cfg: ModelConfig, params, drafter, stop, history_BxL, prompt_len_B, budget_B, key,
          *, sampling: Sampling, max_new_tokens: int, trace: bool = False,
          plan: sharding.Plan | None = None) -> State:
  """The loop's state before its first step: the prompts (all but their last token, the
  first root) prefilled into a fresh cache, the drafter's state built from their
  features. Row b may gain up to budget_B[b] <= max_new_tokens tokens."""
  b, max_len = history_BxL.shape
  feats = () if drafter is None else tuple(drafter.features)
  cache = KVCache.for_config(cfg, b, max_len, param_dtype(params))
  cache_shardings = None if plan is None else plan.cache_shardings(cache)
  cache, prompt_features = prefill(cfg, params, sharding.constrain(cache, cache_shardings),
                                   history_BxL, prompt_len_B - 1, feats)
  ctx = Context(history_BxL, prompt_len_B, cache)
  zeros = jnp.zeros((b,), jnp.int32)
  state = State(
      cache=cache, history=history_BxL, length=prompt_len_B, new=zeros,
      budget=budget_B.astype(jnp.int32), done=budget_B <= 0,
      drafter=() if drafter is None else drafter.init(ctx, max_len, prompt_features),
      stats=Stats(jnp.zeros((b, max_new_tokens), jnp.int32), zeros, zeros, zeros),
      step=jnp.zeros((), jnp.int32), trace=None)
  if trace:
    tree_shape = jax.eval_shape(lambda: drafter.propose(state.drafter, ctx, stop, sampling,
                                                        key)[0])
    state = state.replace(trace=_empty_trace(tree_shape, max_new_tokens))
  return state


def step(cfg: ModelConfig, params, drafter, stop, st: State, key, *, sampling: Sampling,
         rule: verify_lib.Acceptance, eos: tuple[int, ...],
         plan: sharding.Plan | None = None) -> State:
  """One draft-and-verify step of every live row (an AR step without a drafter); done rows
  ride along unchanged. The step's PRNG key is `key` folded with the step count."""
  b = st.history.shape[0]
  n = 0 if drafter is None else drafter.num_nodes
  feats = () if drafter is None else tuple(drafter.features)
  cache_shardings = None if plan is None else plan.cache_shardings(st.cache)
  rows = jnp.arange(b)
  zeros = jnp.zeros((b,), jnp.int32)
  eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
  top_k = 0 if drafter is None else getattr(drafter, "target_top_k", 0)
  owns_forward = callable(getattr(drafter, "target_forward", None))
  rule_feats = tuple(getattr(rule, "features", ()))  # what the rule reads (Judge: FINAL)
  trace = st.trace is not None

  live = ~st.done
  ctx = Context(st.history, st.length, st.cache, live)
  draft_key, verify_key = jax.random.split(jax.random.fold_in(key, st.step))
  if drafter is None:
    tree, dstate, draft_calls = _empty_tree(b), st.drafter, zeros
  else:
    tree, dstate, draft_calls = drafter.propose(st.drafter, ctx, stop, sampling, draft_key)
  root_B = st.history[rows, st.length - 1]

  def verify_tree(tree):
    tokens, positions, tree_mask = tree.verify_inputs(root_B, st.length - 1)
    every = feats + rule_feats
    if owns_forward:  # the drafter runs the target itself (SpecEE's early exit: LOSSY)
      out, state = drafter.target_forward(dstate, cfg, params, tokens, positions, tree_mask,
                                          st.cache, every)
    else:
      out, state = forward(cfg, params, tokens, positions, tree_mask, st.cache, every), dstate
    verdict = verify_lib.verify(rule, tree, out.logits, sampling, verify_key,
                                out.features[len(feats)] if rule_feats else None)
    if top_k:  # what drafters that learn from the target's predictions read in commit
      verdict = verdict._replace(scored_tokens=tokens,
                                 target_top_k=jax.lax.top_k(out.logits, top_k)[1])
    label = (verify_lib.acceptance_probs(tree, out.logits, sampling) if trace
             else jnp.zeros(tree.tokens.shape))
    return out.cache, out.features[:len(feats)], verdict, label, state

  defer = not owns_forward  # write the verified keys/values after the width switch

  def verify_first(m, tree):
    """Verifies nodes [0, m) (none after them is valid), padded back to n nodes. The
    forward's new keys/values come back padded to 1 + n entries, not written: the cache
    is written after the switch, in place (`cache_lib.deferred_writes`; a drafter that
    runs the target's forward itself writes its own)."""
    with cache_lib.deferred_writes() if defer else contextlib.nullcontext():
      cache, features, verdict, label, state = verify_tree(tree.first(m))
    pad = lambda x: jnp.pad(x, ((0, 0), (0, n - m)) + ((0, 0),) * (x.ndim - 2))
    cache = cache.pad_pending(1 + n)  # recurrent states' per-token ingredients (`ssm`)
    if defer:  # the new entries, padded to 1 + n
      pad_kv = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, n - m), (0, 0)))
      cache = cache.replace(k=tuple(map(pad_kv, cache.k)), v=tuple(map(pad_kv, cache.v)))
    verdict = verdict._replace(
        path=pad(verdict.path),
        **({} if not top_k else dict(scored_tokens=jnp.pad(  # -1: no token verified there
            verdict.scored_tokens, ((0, 0), (0, n - m)), constant_values=-1),
                                     target_top_k=pad(verdict.target_top_k))))
    return (cache, tuple(pad(f) for f in features), verdict, pad(label), state,
            jnp.int32(1 + m))

  if n:
    # The narrowest width that holds every sequence's last valid node: a step whose
    # stop policy drafted little verifies little, and one without drafts is an AR step.
    # A drafter that always fills its tree compiles one width (fewer target forwards).
    widths = verify_widths(n) if _drafts_vary(drafter, stop) else (n,)
    last = jnp.max(jnp.where(tree.valid & live[:, None], jnp.arange(1, n + 1), 0))
    if len(widths) == 1:
      cache, features, verdict, label, dstate = verify_tree(tree)
      width = jnp.int32(1 + n)
    else:
      cache, features, verdict, label, dstate, width = jax.lax.switch(
          jnp.searchsorted(jnp.asarray(widths), last),
          [functools.partial(verify_first, m) for m in widths], tree)
      if defer:
        start = st.cache.lengths
        cache = st.cache.replace(
            k=tuple(cache_lib.write(c, k, start) for c, k in zip(st.cache.k, cache.k)),
            v=tuple(cache_lib.write(c, v, start) for c, v in zip(st.cache.v, cache.v)),
            ssm=cache.ssm)  # recurrent states: never written, pending until the commit
  else:
    (cache, features, verdict, label, dstate), width = verify_tree(tree), jnp.int32(1)
  verdict = verdict._replace(accepted_drafts=jnp.where(live, verdict.accepted_drafts, 0))
  a_B = verdict.accepted_drafts
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
  # gained[b, k]: row b's k-th step (its own count: rows of a stream start at other steps)
  stats = Stats(st.stats.gained.at[rows, st.stats.target_calls].set(gained, mode="drop"),
                st.stats.target_calls + live, st.stats.draft_calls + draft_calls * live,
                st.stats.verified + width * live)
  dstate = dstate if drafter is None else drafter.commit(dstate, ctx, verdict, features)
  return State(cache=sharding.constrain(cache, cache_shardings),
                history=_write(st.history, window, st.length),
                length=st.length + gained, new=new, budget=st.budget,
                done=st.done | (live & hit_eos) | (new >= st.budget), drafter=dstate,
                stats=stats, step=st.step + 1,
                trace=st.trace if st.trace is None else _record(
                    st.trace, st.step, tree, label, verdict, live))


def finish(drafter, st: State, prompt_len_B, max_new_tokens: int,
           keep_drafter: bool = True) -> Output:
  """The `Output` of a finished loop: each row's new tokens, cut at its length."""
  max_len = st.history.shape[1]
  lengths = jnp.minimum(st.new, max_new_tokens)
  idx = jnp.minimum(prompt_len_B[:, None] + jnp.arange(max_new_tokens), max_len - 1)
  tokens = jnp.take_along_axis(st.history, idx, 1)
  tokens = jnp.where(jnp.arange(max_new_tokens) < lengths[:, None], tokens, 0)
  carried = st.drafter if drafter is not None and keep_drafter and carries(drafter) else None
  return Output(tokens, lengths, st.stats, st.trace, carried)


def carries(drafter) -> bool:
  """Whether a drafter learns across calls (`Drafter.carry`): then `generate` returns its
  final state, which `carry` turns into the drafter of the next call (a hot start)."""
  return callable(getattr(drafter, "carry", None))


_STATIC = ("cfg", "rule", "max_new_tokens", "eos", "trace", "plan")
_generate = jax.jit(_decode, static_argnames=_STATIC)


@functools.lru_cache(maxsize=None)
def _sharded_decode(plan: sharding.Plan):
  """`_decode` jitted for one mesh: every output ([B, ...]) split over the batch axes; the
  inputs' shardings are those `generate` placed them on."""
  return jax.jit(_decode, static_argnames=_STATIC,
                 out_shardings=plan.sharding(plan.spec(("batch",))))


def _is_number(x) -> bool:
  return np.isscalar(x) and not isinstance(x, (str, bytes))


def encode_prompts(model: Model, prompts) -> list[list[int]]:
  """Token-id lists from one prompt (a string, or a flat list / 1-D array of token ids)
  or a list of prompts (strings and token-id lists, mixed as you like)."""
  if isinstance(prompts, str) or (
      isinstance(prompts, np.ndarray) and prompts.ndim == 1 and prompts.dtype.kind not in "US"
  ) or (isinstance(prompts, (list, tuple)) and prompts and _is_number(prompts[0])):
    prompts = [prompts]
  if isinstance(prompts, np.ndarray) and prompts.ndim != 2:
    raise ValueError(f"generate() got a {prompts.ndim}-D array of prompts (shape "
                     f"{prompts.shape}): pass one prompt as a 1-D array of token ids, or "
                     "a batch as a 2-D array or a list of prompts.")
  if len(prompts) == 0:
    raise ValueError("generate() got no prompts: pass a prompt or a non-empty list of them.")
  out = []
  for i, pr in enumerate(prompts):
    if isinstance(pr, str):
      if model.tokenizer is None:
        raise ValueError("String prompts need a model with a tokenizer; pass token ids.")
      pr = model.tokenizer.encode(pr)
    elif isinstance(pr, (list, tuple, np.ndarray)) and any(
        isinstance(t, (str, list, tuple, np.ndarray)) for t in pr):
      raise ValueError(f"Prompt {i} is itself a list of prompts ({_show(pr)}): a prompt is "
                       "a string or a flat list of token ids, and generate() takes one "
                       "prompt or a list of them, not a list of lists of prompts.")
    elif not isinstance(pr, (list, tuple, np.ndarray)):
      raise ValueError(f"Prompt {i} is {_show(pr)}: a prompt is a string or a list of "
                       "token ids.")
    arr = np.asarray(pr)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"Prompt {i} holds {arr.dtype} values, not integer token ids "
                       f"(e.g. {arr.reshape(-1)[:3].tolist()}).")
    pr = [int(t) for t in arr.reshape(-1)]
    if not pr:
      raise ValueError(f"Prompt {i} is empty: every prompt needs at least one token.")
    bad = [t for t in pr if not 0 <= t < model.config.vocab_size]
    if bad:
      raise ValueError(f"Prompt {i} has token ids outside [0, {model.config.vocab_size}): "
                       f"{bad[:5]}.")
    out.append(pr)
  return out


def _show(x, limit: int = 60) -> str:
  text = repr(x)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _eos_ids(model: Model, eos) -> tuple[int, ...]:
  """The stop ids `eos` names: "default" (the tokenizer's), None (none), an id or ids."""
  if isinstance(eos, str) and eos == "default":
    return tuple(model.tokenizer.eos_ids) if model.tokenizer is not None else ()
  if eos is None:
    return ()
  if isinstance(eos, np.ndarray):
    ids = list(eos.ravel())
  else:
    ids = list(eos) if isinstance(eos, (list, tuple, set, frozenset)) else [eos]
  if not all(_is_int(e) for e in ids):
    raise ValueError(f"eos must be \"default\" (the tokenizer's stop ids), None (never stop "
                     f"early), a token id or a list of token ids; got {eos!r}.")
  return tuple(int(e) for e in ids)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def context_overflow(prompt_tokens: int, max_new_tokens: int, num_nodes: int,
                     cfg: ModelConfig) -> str | None:
  """Why a prompt cannot be decoded within the model's positions (None if it can)."""
  if prompt_tokens + max_new_tokens + num_nodes > cfg.max_position_embeddings:
    return (f"{prompt_tokens} prompt tokens + max_new_tokens={max_new_tokens} + {num_nodes} "
            f"draft tokens exceed the model's context of {cfg.max_position_embeddings} "
            "positions")
  return None


def cache_size(prompt_tokens: int, max_new_tokens: int, num_nodes: int) -> int:
  """Slots the loop needs: prompt, budget, and room for one overshooting step + a tree."""
  return prompt_tokens + max_new_tokens + 2 * (num_nodes + 1)


# Default cache sizes round up to this: prompts of similar lengths share a compiled program.
CACHE_BUCKET = 256


def bucketed_cache_size(prompt_tokens: int, max_new_tokens: int, num_nodes: int,
                        bucket: int = CACHE_BUCKET) -> int:
  """`cache_size` rounded up to a multiple of `bucket` (the compiled program's size)."""
  return -(-cache_size(prompt_tokens, max_new_tokens, num_nodes) // bucket) * bucket


def setup(model: Model, drafter, stop, acceptance, temperature: float = 0.0,
          top_k: int | None = None, top_p: float | None = None, eos: Any = "default"):
  """(sampling, rule, stop policy, eos ids) for a decode loop, every combination checked
  (`registry.check_combination`) before anything compiles; `generate` and
  `specjax.serve.Engine` share it."""
  eos_ids = _eos_ids(model, eos)
  sampling = Sampling.create(temperature, top_k, top_p)
  rule = None if acceptance is None else verify_lib.get(acceptance)
  registry.check_combination(
      takes_stop_policy=None if drafter is None else bool(drafter.takes_stop_policy),
      has_stop=stop is not None, rule=None if rule is None else rule.name,
      temperatures=[temperature], greedy_only=bool(getattr(drafter, "greedy_only", False)))
  if rule is None:
    rule = verify_lib.get("greedy" if sampling.greedy else "speculative")
  if hasattr(rule, "validate"):
    rule.validate(model.config)
  if rule.name == "rsd" and not sampling.greedy:  # the rule asks for distinct siblings
    sampling = sampling.replace(without_replacement=True)
  if drafter is not None:
    drafter.validate(model.config)
    check_features(model.config, drafter.features)
  stop = stopping.get(stop)
  if drafter is not None:
    stop.check(drafter)
  return sampling, rule, stop, eos_ids


def generate(model: Model, prompts: Sequence[Sequence[int] | str] | str, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos: Any = "default",
             drafter: Any = None, stop: Any = None, acceptance: Any = None,
             max_len: int | None = None, trace: bool = False,
             plan: sharding.Plan | None = None, _compile_only: bool = False) -> Output:
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
    stop: a stop policy for drafters that draft from a distribution, chains and trees alike
      (a name in `registry.STOP_POLICIES`, e.g. "svip", or an instance).
    acceptance: "greedy" (default at temperature 0), "speculative" (default when
      sampling), "rsd" (Recursive SD: tree drafters then draw siblings without
      replacement), or the LOSSY "typical" / "fuzzy" (name or `verify.Acceptance`). Which
      combinations run is decided in one place: `registry.check_combination`.
    max_len: cache slots per sequence (a static shape: calls with one max_len share one
      compiled program whatever their prompt lengths). Default: what the prompts and the
      budget need, rounded up to a multiple of `CACHE_BUCKET`. Too small is an error that
      names the shortfall.
    trace: also return `Output.trace`: every step's draft nodes with their acceptance
      labels and the drafter's hidden states (what `specjax.stopping` predictors train
      on). Memory grows as max_new_tokens x nodes x hidden size.
    plan: a `sharding.Plan` (mesh + logical rules): the whole loop runs as one program
      over the mesh, target and drafter params on their shards (a model loaded with the
      same plan is already there), the batch over the batch axes (padded with copies of
      the first prompt to a multiple of their size; the copies are dropped), the KV cache
      over batch and KV heads. Several processes (`sharding.initialize`): each passes
      its own prompts, the same number, and gets its own rows back.

  Returns:
    Output(tokens [B, max_new_tokens], lengths [B], stats, trace or None).
  """
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1 and an integer; got {max_new_tokens!r}.")
  sampling, rule, stop, eos_ids = setup(model, drafter, stop, acceptance, temperature, top_k,
                                        top_p, eos)
  if trace and drafter is None:
    raise ValueError("trace=True records draft nodes; pass a drafter.")
  tokens = encode_prompts(model, prompts)
  rows = len(tokens)
  if plan is not None:  # pad to an even split over the batch axes (per process)
    per_process = -(-plan.batch_size_multiple // jax.process_count())
    tokens = tokens + [tokens[0]] * (-rows % per_process)
  lens = [len(t) for t in tokens]
  n = 0 if drafter is None else drafter.num_nodes
  longest = max(lens) if plan is None or jax.process_count() == 1 else _process_max(max(lens))
  need = cache_size(longest, max_new_tokens, n)
  if max_len is None:
    max_len = bucketed_cache_size(longest, max_new_tokens, n)
  elif need > max_len:
    raise ValueError(f"Prompt of {longest} tokens + max_new_tokens={max_new_tokens} + tree "
                     f"room {2 * (n + 1)} needs {need} cache slots; max_len is {max_len}.")
  overflow = context_overflow(longest, max_new_tokens, n, model.config)
  if overflow:
    raise ValueError(f"Prompt too long: {overflow}.")
  history_BxL = np.zeros((len(tokens), max_len), np.int32)
  for i, t in enumerate(tokens):
    history_BxL[i, :len(t)] = t
  lens_B, key = np.asarray(lens, np.int32), jax.random.key(seed)
  kwargs = dict(sampling=sampling, rule=rule, max_new_tokens=max_new_tokens,
                eos=eos_ids, trace=trace)
  if plan is None:
    args = (model.config, model.params, drafter, stop, jnp.asarray(history_BxL),
            jnp.asarray(lens_B), key)
    return _generate.lower(*args, **kwargs).compile() if _compile_only else _generate(
        *args, **kwargs)
  params, drafter, stop = (_place_tree(plan, t) for t in (model.params, drafter, stop))
  args = (model.config, params, drafter, stop, plan.global_batch(history_BxL),
          plan.global_batch(lens_B), key)
  if _compile_only:
    return _sharded_decode(plan).lower(*args, plan=plan, **kwargs).compile()
  out = _sharded_decode(plan)(*args, plan=plan, **kwargs)
  return jax.tree.map(lambda x: _local_rows(plan, x)[:rows], out)


def compiled(model: Model, prompts, **kwargs) -> jax.stages.Compiled:
  """The program `generate(model, prompts, **kwargs)` would run, compiled and not run:
  its `memory_analysis()` (what `budget.fit_memory` reads), `cost_analysis()`, HLO."""
  return generate(model, prompts, _compile_only=True, **kwargs)


def program_bytes(model: Model, prompts, **kwargs) -> int:
  """Device bytes the decode program needs (arguments + outputs + temporaries, less what
  outputs alias), from the compiled program's own memory analysis. A drafter's arrays
  that are the target's own (a truncated self-draft shares its layers) are counted once:
  the program takes them twice as arguments, the device holds them once."""
  m = compiled(model, prompts, **kwargs).memory_analysis()
  target_ids = {id(x) for x in jax.tree.leaves(model.params)}
  shared = sum(x.nbytes for x in jax.tree.leaves(kwargs.get("drafter"))
               if id(x) in target_ids)
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes - shared)


def _place_tree(plan: sharding.Plan, tree):
  """A params-like pytree on the plan's shardings (only its arrays move)."""
  if tree is None:
    return None
  def put(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x  # e.g. the target's weights a head shares, placed at load
    if isinstance(x, (jax.Array, np.ndarray)):  # the same host value on every process
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
    return x
  return jax.tree.map(put, tree, plan.param_shardings(tree))


def _process_max(x: int) -> int:
  """The largest `x` over all processes."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(x))))


def _local_rows(plan: sharding.Plan, x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded output, on the host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))[
      plan.local_rows(x.shape[0])]
