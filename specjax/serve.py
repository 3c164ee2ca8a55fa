"""Continuous batching: the decode step over a fixed number of slots, fed from a queue.

`generate` runs one static batch to its end: a row that finishes early idles until the
longest is done, and a request that arrives meanwhile waits for the whole batch. Here the
same step (`decode.step`, the body of `generate`'s while_loop) runs over `slots` rows that
requests enter and leave:

  Engine.init()                      every slot empty (done)
  Engine.admit(state, slot, ...)     prefill one request into one slot (`decode.start` at
                                     batch 1, its rows written into the slot's rows of every
                                     batch-major leaf: cache, history, drafter state, stats)
  Engine.step(state)                 one draft-and-verify step of every live slot
  serve(engine, requests)            the host scheduler: requests arrive (times in seconds),
                                     wait in a queue, take free slots between steps, and
                                     leave with their tokens when their slot is done

Each row keeps its own positions, cache length and budget, so nothing is realigned when
rows accept different numbers of tokens ("Batch Speculative Decoding Done Right" names the
ragged-tensor problem this sidesteps), and every request's greedy output equals its own AR
output, token for token (tested). A drafter's state leaves that are not per row (Token
Recycling's successor matrix) are shared by the slots and keep learning across requests.

Scheduling policies (`serve(policy=)`):
  fifo     a free slot takes the request that arrived first (continuous batching)
  static   slots are filled only when all are free: today's static batches, for comparison
  exspec   EXSPEC's grouping: of the first `pool` waiting requests, a free slot takes the
           one whose length is closest to the live slots' median, so a batch holds rows of
           like lengths (the paper batches sequences of equal length to avoid realignment;
           rows here never need realigning, so this measures what grouping alone buys)

`python -m specjax.evaluation.stream` runs a request stream (Poisson arrivals or a file)
under each policy and prints throughput, latency percentiles and tau (docs/serving.md).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax import decode
from specjax.models.model import Model

POLICIES = ("fifo", "static", "exspec")


@dataclasses.dataclass(frozen=True)
class Request:
  """A prompt (token ids) with its budget and its arrival, in seconds after the start."""
  tokens: tuple[int, ...]
  max_new_tokens: int
  arrival: float = 0.0
  id: Any = None


@dataclasses.dataclass
class Result:
  """A finished (or refused) request. Times are seconds after the stream's start."""
  id: Any
  tokens: list[int]
  prompt_len: int
  arrival: float
  admitted: float = float("nan")
  finished: float = float("nan")
  target_calls: int = 0
  error: str | None = None  # why it was refused (then it never took a slot)

  @property
  def latency(self) -> float:
    return self.finished - self.arrival

  @property
  def tau(self) -> float:
    return len(self.tokens) / max(self.target_calls, 1)


def _batch_axes(small, big) -> Any:
  """Per leaf, the axis along which the batch-1 and batch-2 shapes differ (the rows), or
  -1 for a leaf shared by all rows."""
  def axis(a, b):
    diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return diff[0] if diff else -1
  return jax.tree.map(axis, small, big)


class Engine:
  """`decode.step` over `slots` rows of `max_len` cache slots each, jitted once.

  Args:
    model: the target.
    slots: rows decoded together.
    max_len: cache slots per row; a request whose prompt + budget + draft room does not fit
      is refused (`refusal`) before it takes a slot.
    max_new_tokens: the largest budget a request may ask for (sizes the per-step stats).
    drafter, stop, temperature, top_k, top_p, acceptance, eos: as in `decode.generate`.
    seed: the stream's PRNG seed (each step folds in the step count).
  """

  def __init__(self, model: Model, *, slots: int, max_len: int, max_new_tokens: int,
               drafter=None, stop=None, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, acceptance=None, eos: Any = "default",
               seed: int = 0):
    if not decode._is_int(slots) or slots < 1:  # pylint: disable=protected-access
      raise ValueError(f"slots must be a positive integer; got {slots!r}.")
    if not decode._is_int(max_new_tokens) or max_new_tokens < 1:  # pylint: disable=protected-access
      raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
    self.model, self.drafter = model, drafter
    self.slots, self.max_len, self.max_new_tokens = slots, max_len, max_new_tokens
    self.sampling, self.rule, self.stop, self.eos = decode.setup(
        model, drafter, stop, acceptance, temperature, top_k, top_p, eos)
    self.num_nodes = 0 if drafter is None else drafter.num_nodes
    if decode.cache_size(1, 1, self.num_nodes) > max_len:
      raise ValueError(f"max_len={max_len} holds no request: even a 1-token prompt with a "
                       f"budget of 1 needs {decode.cache_size(1, 1, self.num_nodes)} slots.")
    self.key = jax.random.key(seed)
    start = functools.partial(decode.start, model.config, sampling=self.sampling,
                              max_new_tokens=max_new_tokens)
    self._start = start
    shape = lambda b: jax.eval_shape(lambda: self._empty(model.params, drafter, b))
    self._axes = _batch_axes(shape(1), shape(2))
    self._init = jax.jit(functools.partial(self._empty, b=slots))
    self._admit = jax.jit(self._admit_fn, donate_argnums=(2,))
    self._step = jax.jit(self._step_fn, donate_argnums=(2,))

  # The jitted functions take the params and the drafter as arguments (not constants).
  def _empty(self, params, drafter, b: int):
    """`b` empty rows: 1-token prompts with no budget (done)."""
    return self._start(params, drafter, self.stop, jnp.zeros((b, self.max_len), jnp.int32),
                       jnp.ones((b,), jnp.int32), jnp.zeros((b,), jnp.int32), self.key)

  def _admit_fn(self, params, drafter, state, slot, history_L, prompt_len, budget):
    fresh = self._start(params, drafter, self.stop, history_L[None], prompt_len[None],
                        budget[None], self.key)

    def put(axis, old, new):
      if axis < 0:  # shared by the slots (a drafter's learnt table; the step count)
        return old
      return jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), slot, axis)
    return jax.tree.map(put, self._axes, state, fresh)

  def _step_fn(self, params, drafter, state):
    return decode.step(self.model.config, params, drafter, self.stop, state, self.key,
                       sampling=self.sampling, rule=self.rule, eos=self.eos)

  def init(self) -> decode.State:
    """The engine's state with every slot empty."""
    return self._init(self.model.params, self.drafter)

  def refusal(self, tokens: Sequence[int], max_new_tokens: int) -> str | None:
    """Why a request cannot be served by this engine (None if it can)."""
    if not decode._is_int(max_new_tokens) or not 1 <= max_new_tokens <= self.max_new_tokens:  # pylint: disable=protected-access
      return (f"max_new_tokens={max_new_tokens!r} is outside 1..{self.max_new_tokens} (the "
              "engine's max_new_tokens)")
    if not tokens:
      return "the prompt is empty"
    bad = [t for t in tokens if not 0 <= t < self.model.config.vocab_size]
    if bad:
      return f"token ids outside [0, {self.model.config.vocab_size}): {bad[:5]}"
    need = decode.cache_size(len(tokens), max_new_tokens, self.num_nodes)
    if need > self.max_len:
      return (f"{len(tokens)} prompt tokens + max_new_tokens={max_new_tokens} + draft room "
              f"{2 * (self.num_nodes + 1)} need {need} cache slots; each slot has "
              f"{self.max_len}")
    return decode.context_overflow(len(tokens), max_new_tokens, self.num_nodes,
                                   self.model.config)

  def admit(self, state: decode.State, slot: int, tokens: Sequence[int],
            max_new_tokens: int) -> decode.State:
    """`state` with `tokens` prefilled into `slot` (which must be free). Donates `state`."""
    if not decode._is_int(slot) or not 0 <= slot < self.slots:  # pylint: disable=protected-access
      raise ValueError(f"slot {slot!r} is not one of this engine's slots 0..{self.slots - 1}.")
    why = self.refusal(tokens, max_new_tokens)
    if why:
      raise ValueError(f"Request refused: {why}.")
    history = np.zeros((self.max_len,), np.int32)
    history[:len(tokens)] = tokens
    return self._admit(self.model.params, self.drafter, state, jnp.int32(slot),
                       jnp.asarray(history), jnp.int32(len(tokens)), jnp.int32(max_new_tokens))

  def step(self, state: decode.State) -> decode.State:
    """One step of every live slot. Donates `state`."""
    return self._step(self.model.params, self.drafter, state)

  def warmup(self) -> None:
    """Compiles init, admit and step (a 1-token request through one step)."""
    state = self.admit(self.init(), 0, [0], 1)
    jax.block_until_ready(self.step(state))


def _pick(policy: str, waiting: collections.deque, live_lengths: list[int], pool: int,
          requests: Sequence[Request]) -> int:
  """The waiting request (its index) a free slot takes under `policy`, removed from
  `waiting`."""
  if policy == "exspec" and live_lengths:
    target = float(np.median(live_lengths))
    window = list(waiting)[:pool]
    best = min(range(len(window)),
               key=lambda j: (abs(len(requests[window[j]].tokens) - target), j))
    del waiting[best]
    return window[best]
  return waiting.popleft()


def serve(engine: Engine, requests: Sequence[Request], *, policy: str = "fifo",
          pool: int = 48, clock: Callable[[], float] = time.perf_counter,
          progress: bool = False) -> list[Result]:
  """Runs `requests` through `engine` as they arrive (their `arrival`, in seconds of
  `clock` after the start; all at 0 = a closed batch) and returns one `Result` per request,
  in the given order. A request the engine cannot hold is refused with its reason
  (`Result.error`) before it takes a slot; the others go on."""
  if policy not in POLICIES:
    raise ValueError(f"Unknown scheduling policy {policy!r}; expected one of {POLICIES}.")
  order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
  results: list[Result | None] = [None] * len(requests)
  pending = collections.deque(order)
  waiting: collections.deque = collections.deque()  # indices into `requests`
  owner: list[int | None] = [None] * engine.slots
  lengths = [0] * engine.slots  # host copy of each slot's length when exspec needs it
  state = engine.init()
  t0 = clock()
  done_count, last_print = 0, 0.0
  while pending or waiting or any(o is not None for o in owner):
    now = clock() - t0
    while pending and requests[pending[0]].arrival <= now:
      i = pending.popleft()
      r = requests[i]
      why = engine.refusal(list(r.tokens), r.max_new_tokens)
      if why:
        results[i] = Result(r.id, [], len(r.tokens), r.arrival, error=why)
        done_count += 1
        continue
      waiting.append(i)
    free = [s for s, o in enumerate(owner) if o is None]
    if waiting and free and (policy != "static" or len(free) == engine.slots):
      if policy == "exspec":
        lengths = np.asarray(state.length).tolist()
      for s in free:
        if not waiting:
          break
        live = [lengths[k] for k, o in enumerate(owner) if o is not None]
        i = _pick(policy, waiting, live, pool, requests)
        r = requests[i]
        state = engine.admit(state, s, list(r.tokens), r.max_new_tokens)
        owner[s], lengths[s] = i, len(r.tokens)
        results[i] = Result(r.id, [], len(r.tokens), r.arrival, admitted=clock() - t0)
    if all(o is None for o in owner):
      if pending:  # idle until the next arrival
        time.sleep(max(0.0, requests[pending[0]].arrival - (clock() - t0)))
      continue
    state = engine.step(state)
    done = np.asarray(state.done)
    finished = [s for s, o in enumerate(owner) if o is not None and done[s]]
    if finished:
      now = clock() - t0
      new, calls = np.asarray(state.new), np.asarray(state.stats.target_calls)
      for s in finished:
        res = results[owner[s]]
        row = np.asarray(state.history[s])
        n = int(min(new[s], requests[owner[s]].max_new_tokens))
        res.tokens = row[res.prompt_len:res.prompt_len + n].tolist()
        res.finished, res.target_calls = now, int(calls[s])
        owner[s] = None
        done_count += 1
    if progress and clock() - t0 - last_print > 5.0:
      last_print = clock() - t0
      print(f"  [{last_print:6.1f} s] {done_count}/{len(requests)} requests done, "
            f"{len(waiting)} waiting", flush=True)
  return results  # type: ignore[return-value]


def summary(results: Sequence[Result]) -> dict[str, float]:
  """Throughput (generated tokens per second from the first arrival to the last finish),
  latency percentiles (finish - arrival) and tau (tokens over target calls) of a stream."""
  ok = [r for r in results if r.error is None]
  if not ok:
    return {"requests": 0, "refused": len(results)}
  tokens = sum(len(r.tokens) for r in ok)
  span = max(r.finished for r in ok) - min(r.arrival for r in ok)
  lat = np.asarray([r.latency for r in ok])
  return {"requests": len(ok), "refused": len(results) - len(ok), "tokens": tokens,
          "seconds": span, "tokens_per_s": tokens / span,
          "p50_latency_s": float(np.percentile(lat, 50)),
          "p99_latency_s": float(np.percentile(lat, 99)),
          "tau": tokens / max(sum(r.target_calls for r in ok), 1)}


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
  """Arrival times (seconds) of `n` requests from a Poisson process of `rate` per second
  (rate 0 or inf: all at once)."""
  if not rate or np.isinf(rate):
    return np.zeros(n)
  return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))
