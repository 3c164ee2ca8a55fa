"""Sweeps: methods x datasets x prompts x temperatures x seeds, timed against AR.

`plan(config)` checks a config before any weights load or anything compiles and returns a
`Plan`; `run(plan, workdir)` measures every row results.jsonl does not hold yet, appending
each as it finishes, so a restarted sweep resumes where it stopped.

Protocol (Spec-Bench): batch size 1; for each prompt the AR baseline runs first, then every
method and peer, in one process, so drift cancels; the first call of each compiled shape
(plus `warmup` more) is not timed; cache sizes round up to `cache_bucket` so prompts of
different lengths share one compiled program (the prompt's width is not a static shape).
Prompts run in order of their cache size, every turn of a prompt at one size, and only the
current size's programs stay compiled (`LivePrograms`): a sweep of any size stays within
Linux's default memory-map limit, and each program compiles once.
Prompts are rendered with the target's chat template; a later turn of a multi-turn prompt
(MT-Bench) follows the AR answer to the earlier turns at the same temperature and
seed, and every turn is its own row ("81/t1", "81/t2").
Drafters that learn across calls (Token Recycling's matrix, SuffixDecoding's corpus) carry
what each timed call taught them to the next prompt of the same method, temperature and
seed (`Method.hot_start`); a resumed sweep restarts them cold at its first missing row.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import tqdm

from specjax import decode, kernels, models, registry, stopping
from specjax import sharding as sharding_lib
from specjax.drafters import budget as budget_lib
from specjax.drafters.heads import medusa
from specjax import verify as verify_lib
from specjax.models import Model

from . import metrics, peers as peers_lib, prompts as prompts_lib, quality, report


@dataclasses.dataclass(frozen=True)
class Method:
  """One decoding method; see `configs/common.py:method` for the fields."""

  name: str
  drafter: str = registry.AR
  drafter_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  stop: str | None = None
  stop_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  acceptance: str | None = None
  acceptance_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # Drafters that learn across calls (`carry`: Token Recycling, SuffixDecoding) start each
  # prompt from what the previous prompt left (per temperature and seed, in the sweep's
  # prompt order); False: every prompt starts cold.
  hot_start: bool = True

  @property
  def lossy(self) -> bool:
    """Whether the acceptance rule, or a drafter that changes the target's own forward
    (SpecEE), may change the output distribution."""
    if self.drafter != registry.AR and registry.DRAFTERS.meta(self.drafter).get("lossy"):
      return True
    return self.acceptance is not None and not self.rule().lossless

  @property
  def greedy_only(self) -> bool:
    """Whether the method is defined for greedy decoding only (SpecEE): a sweep runs it at
    temperature 0 and leaves its sampled cells out."""
    return self.drafter != registry.AR and bool(
        registry.DRAFTERS.meta(self.drafter).get("greedy_only"))

  @property
  def sampled_only(self) -> bool:
    """Whether its acceptance rule is a LOSSY one that reads sampling distributions (would
    be silently greedy at temperature 0): a sweep leaves its greedy cells out."""
    return self.acceptance is not None and bool(
        registry.ACCEPTANCE.meta(self.acceptance).get("sampled_only"))

  def runs_at(self, temperature: float) -> bool:
    """Whether a sweep runs this method at `temperature` (the one place that says so)."""
    return not (self.greedy_only and temperature > 0) and not (
        self.sampled_only and temperature == 0)

  def rule(self) -> verify_lib.Acceptance | None:
    """The explicit acceptance rule, or None for generate's default by temperature."""
    if self.acceptance is None:
      return None
    return verify_lib.get(self.acceptance, **self.acceptance_kwargs)

  def stop_policy(self) -> Any:
    return None if self.stop is None else stopping.get(self.stop, **self.stop_kwargs)

  def build_drafter(self, target: Model) -> Any:
    """The drafter (None for AR), built through the registry; errors before compiling."""
    if self.drafter == registry.AR:
      return None
    drafter = registry.DRAFTERS.build(self.drafter, target, **self.drafter_kwargs)
    drafter.validate(target.config)
    return drafter


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated sweep."""

  target: str
  dtype: str
  methods: tuple[Method, ...]
  datasets: tuple[str, ...]
  num_prompts: int
  temperatures: tuple[float, ...]
  seeds: tuple[int, ...]
  max_new_tokens: int
  warmup: int
  cache_bucket: int
  peers: tuple[str, ...]
  progress: bool
  target_lora: str = ""
  # The mesh every method decodes on (`specjax.sharding`; None: one device).
  sharding: sharding_lib.Plan | None = None
  attention: str = "xla"  # the target's attention (`specjax.kernels.attention`)

  @property
  def target_name(self) -> str:
    """What rows record: the target, marked when a Medusa-2 head's LoRA is merged in."""
    if not self.target_lora:
      return self.target
    return f"{self.target}{medusa.LORA_MARK}{os.path.abspath(self.target_lora)}"

  @property
  def baseline(self) -> Method:
    return next(m for m in self.methods if m.drafter == registry.AR)


# ------------------------------------------------------------------------------------------
# Validation: everything that can be wrong with a config, before weights load.


def _check_model_ref(ref: str, what: str) -> None:
  """A preset or an existing HF folder / .gguf file."""
  if ref in models.PRESETS:
    models.preset_path(ref)  # FileNotFoundError with the install command
  elif not os.path.exists(ref):
    kind = FileNotFoundError if os.sep in ref or ref.endswith(".gguf") else ValueError
    raise kind(f"{what} {ref!r} is neither a preset {sorted(models.PRESETS)} nor an existing "
               "path.")


def _check_dataset(name: str) -> None:
  if name in prompts_lib.names() or name.startswith("hf:"):
    prompts_lib.load(name, limit=1)  # FileNotFoundError with the install command
  elif not os.path.isfile(name):
    kind = FileNotFoundError if name.endswith((".json", ".jsonl")) else ValueError
    raise kind(f"Unknown dataset {name!r}: not a file and not one of "
               f"{prompts_lib.names()}.")
  else:  # a local file: read it all (bad lines, repeated ids) before any weights load
    prompts_lib.load(name)


def _method(spec: Mapping[str, Any], temperatures: Sequence[float]) -> Method:
  fields = {f.name for f in dataclasses.fields(Method)}
  unknown = sorted(set(spec) - fields)
  if unknown or "name" not in spec:
    raise ValueError(f"Method {dict(spec)} has unknown fields {unknown} or no name; "
                     f"fields: {sorted(fields)}.")
  m = Method(**{k: dict(v) if k.endswith("_kwargs") else v for k, v in spec.items()})
  try:
    if m.drafter == registry.AR:
      if m.drafter_kwargs:
        raise ValueError(f"AR decoding takes no drafter_kwargs; got {dict(m.drafter_kwargs)}.")
      takes_stop = None
    else:
      registry.DRAFTERS.check(m.drafter, None, **m.drafter_kwargs)
      takes_stop = registry.DRAFTERS.meta(m.drafter)["takes_stop_policy"]
    m.stop_policy()  # built through the registry: unknown names and knobs fail here
    m.rule()
    if not any(m.runs_at(t) for t in temperatures):
      raise ValueError("it runs at temperature 0 only (greedy-only drafter) or above 0 "
                       "only (a LOSSY rule reading sampling distributions), and this sweep "
                       f"has temperatures {tuple(temperatures)}.")
    temperatures = [t for t in temperatures if m.runs_at(t)]  # the other cells are left out
    registry.check_combination(takes_stop_policy=takes_stop, has_stop=m.stop is not None,
                               rule=m.acceptance, temperatures=temperatures,
                               greedy_only=m.greedy_only)
    if "checkpoint" in m.drafter_kwargs:  # a draft model: check the file exists
      _check_model_ref(m.drafter_kwargs["checkpoint"], "Draft checkpoint")
    if m.drafter_kwargs.get("budget"):  # a cost file: exists and has what budgets need
      budget_lib.read_costs(m.drafter_kwargs["budget"])
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(f"Method {m.name!r}: {e}") from None
  return m


def plan(config: Any) -> Plan:
  """Validates a sweep config (a ConfigDict or a dict) into a Plan; loads no weights.

  Raises ValueError / FileNotFoundError naming the bad method, drafter, stop policy,
  acceptance rule, dataset, target or checkpoint.
  """
  c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  missing = [f.name for f in dataclasses.fields(Plan)
             if f.name not in c and f.default is dataclasses.MISSING]
  if missing:
    raise ValueError(f"Config lacks {missing}; start from configs/common.py:base().")
  temperatures = tuple(float(t) for t in c["temperatures"])
  if not temperatures or min(temperatures) < 0:
    raise ValueError(f"temperatures must be a non-empty list of values >= 0; got "
                     f"{temperatures}.")
  for field, low in (("max_new_tokens", 1), ("num_prompts", 1), ("cache_bucket", 1),
                     ("warmup", 0)):
    if isinstance(c[field], bool) or not isinstance(c[field], int) or c[field] < low:
      raise ValueError(f"{field} must be an integer >= {low}; got {c[field]!r}.")
  if not c["seeds"] or not c["datasets"]:
    raise ValueError("seeds and datasets must be non-empty.")
  methods = tuple(_method(m, temperatures) for m in c["methods"])
  names = [m.name for m in methods] + list(c["peers"])
  if len(set(names)) != len(names):
    raise ValueError(f"Method and peer names must be unique; got {names}.")
  if sum(m.drafter == registry.AR for m in methods) != 1:
    raise ValueError(f"A sweep needs exactly one method with drafter {registry.AR!r}: the "
                     "baseline of speedup and equal_to_ar.")
  _check_model_ref(c["target"], "Target")
  if c.get("target_lora"):
    if not os.path.isdir(c["target_lora"]):
      raise FileNotFoundError(f"target_lora {c['target_lora']!r} is not a head folder.")
    if c["peers"]:
      raise ValueError("Peers run the original target; a sweep with target_lora (the "
                       "LoRA-merged target of a Medusa-2 head) cannot compare with them.")
  for d in c["datasets"]:
    _check_dataset(d)
  bad_peers = sorted(set(c["peers"]) - set(peers_lib.PEERS))
  if bad_peers:
    raise ValueError(f"Unknown peers {bad_peers}; choose from {sorted(peers_lib.PEERS)}.")
  if c["peers"]:
    peers_lib.check_available()
  return Plan(target=c["target"], dtype=c["dtype"], methods=methods,
              datasets=tuple(c["datasets"]), num_prompts=c["num_prompts"],
              temperatures=temperatures, seeds=tuple(int(s) for s in c["seeds"]),
              max_new_tokens=c["max_new_tokens"], warmup=c["warmup"],
              cache_bucket=c["cache_bucket"],
              peers=tuple(c["peers"]), progress=bool(c["progress"]),
              target_lora=c.get("target_lora", ""), sharding=sharding_lib.from_config(c),
              attention=kernels.check_impl(c.get("attention", "xla")))


# ------------------------------------------------------------------------------------------
# Models and drafters.


def _checkpoint_path(ref: str) -> str:
  """The file or folder behind a preset or path (what the peers load)."""
  return models.preset_path(ref) if ref in models.PRESETS else ref


# ------------------------------------------------------------------------------------------
# Measuring.


@dataclasses.dataclass
class Timer:
  """Times calls; the first call of each shape key (and `warmup` more) is not timed."""

  warmup: int
  seen: set = dataclasses.field(default_factory=set)

  def __call__(self, call: Callable[[], Any], key: tuple) -> tuple[Any, float]:
    if key not in self.seen:
      for _ in range(1 + self.warmup):
        jax.block_until_ready(call())
      self.seen.add(key)
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    return out, time.perf_counter() - start


def _measure_method(plan: Plan, timer: Timer, target: Model, method: Method, drafter: Any,
                    ids: list[int], temperature: float, seed: int, max_len: int,
                    carried: dict | None = None) -> dict[str, Any]:
  """One timed call. A drafter that learns across calls starts from `carried`'s entry for
  (method, temperature, seed) and leaves there what the timed call taught it."""
  num_nodes = 0 if drafter is None else drafter.num_nodes
  chain = (method.name, temperature, seed)
  hot = carried is not None and method.hot_start and decode.carries(drafter)
  if hot:
    drafter = carried.get(chain, drafter)
  call = functools.partial(
      decode.generate, target, [ids], max_new_tokens=plan.max_new_tokens,
      temperature=temperature, seed=seed, drafter=drafter, stop=method.stop_policy(),
      acceptance=method.rule(), max_len=max_len, plan=plan.sharding)
  out, seconds = timer(call, (method.name, max_len, temperature))
  if hot:
    carried[chain] = drafter.carry(out)
  return {"tokens": out.token_lists()[0], "target_calls": int(out.stats.target_calls[0]),
          "draft_calls": int(out.stats.draft_calls[0]), "seconds": seconds,
          "verified": int(out.stats.verified[0]),
          "accepted_hist": metrics.accepted_histogram(
              out.stats.gained[0].tolist(), num_nodes)}


def _measure_peer(plan: Plan, timer: Timer, hf: Any, name: str, ids: list[int],
                  temperature: float, seed: int, max_len: int,
                  eos_ids: Sequence[int]) -> dict[str, Any]:
  del max_len  # transformers sizes its own cache
  call = functools.partial(peers_lib.generate, hf, name, ids,
                           max_new_tokens=plan.max_new_tokens, temperature=temperature,
                           seed=seed, eos_ids=eos_ids)
  out, seconds = timer(call, (name,))
  return {"tokens": out.tokens, "target_calls": out.target_calls, "draft_calls": 0,
          "seconds": seconds, "accepted_hist": None}


def make_row(plan: Plan, spec: Mapping[str, Any], cell: Mapping[str, Any], prompt_tokens: int,
             measured: Mapping[str, Any], ar_tokens: list[int]) -> dict[str, Any]:
  """One results.jsonl row: the method spec, the cell, the numbers and the tokens."""
  new = len(measured["tokens"])
  greedy = cell["temperature"] == 0
  return {
      **spec, **cell, "target": plan.target_name, "max_new_tokens": plan.max_new_tokens,
      **_setup(plan), "prompt_tokens": prompt_tokens, "new_tokens": new,
      "target_calls": measured["target_calls"],
      "draft_calls": measured["draft_calls"],
      "tau": metrics.tau(new, measured["target_calls"]),
      "seconds": measured["seconds"],
      "tokens_per_s": metrics.tokens_per_s(new, measured["seconds"]),
      "target_per_token": metrics.per_token(measured["target_calls"], new),
      "draft_per_token": metrics.per_token(measured["draft_calls"], new),
      # The draft length the step verified (its width past the root), the length decision
      # of a stop policy or a drafter that cuts its own drafts (DSpark); None for peers.
      "drafted_per_step": (None if measured.get("verified") is None else metrics.per_token(
          measured["verified"] - measured["target_calls"], measured["target_calls"])),
      "equal_to_ar": measured["tokens"] == ar_tokens if greedy else None,
      **dict(zip(("match_ar", "diverge_at"), metrics.agreement(measured["tokens"], ar_tokens)
                 if greedy else (None, None))),
      "accepted_hist": measured["accepted_hist"], "tokens": measured["tokens"],
  }


def _quality(target: Model, prompt: prompts_lib.Prompt | None, ids: list[int],
             new: list[int], max_len: int) -> dict[str, Any]:
  """A row's quality columns (`quality`): the target's mean log-prob per generated token,
  and the task score where the (single-turn) prompt can be checked."""
  text = target.tokenizer.decode([i for i in new if i not in target.tokenizer.eos_ids])
  return {"logprob": quality.target_logprob(target, ids, new, max_len),
          "score": None if prompt is None else quality.task_score(
              prompt.dataset, prompt.reference, text)}


def _spec(method: Method, drafter: Any) -> dict[str, Any]:
  spec = {"method": method.name, "drafter": method.drafter,
          "drafter_kwargs": dict(method.drafter_kwargs),
          "num_nodes": 0 if drafter is None else drafter.num_nodes, "stop": method.stop,
          "acceptance": method.acceptance, "lossy": method.lossy}
  if decode.carries(drafter):  # a cold-started sweep of a learning drafter is another method
    spec["hot_start"] = method.hot_start
  checkpoint = method.drafter_kwargs.get("checkpoint")
  if checkpoint:  # a retrained head in the same folder is another method
    spec["checkpoint_sha"] = _fingerprint(checkpoint)
  if method.acceptance_kwargs:  # a rule's knobs, and a trained judge's weights
    spec["acceptance_kwargs"] = dict(method.acceptance_kwargs)
    if method.acceptance_kwargs.get("checkpoint"):
      spec["acceptance_sha"] = _fingerprint(method.acceptance_kwargs["checkpoint"])
  stop_checkpoint = method.stop_kwargs.get("checkpoint")
  if stop_checkpoint:  # likewise a retrained stop predictor
    spec["stop_kwargs"] = dict(method.stop_kwargs)
    spec["stop_sha"] = _fingerprint(stop_checkpoint)
  return spec


def _fingerprint(path: str) -> str:
  """sha256 (12 hex digits) of a checkpoint file or of every file in its folder."""
  h = hashlib.sha256()
  files = ([path] if os.path.isfile(path) else
           sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs))
  for name in files:
    h.update(os.path.relpath(name, path).encode())
    with open(name, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()[:12]


def _check_specs(stored: Sequence[Mapping[str, Any]], specs: Sequence[Mapping[str, Any]],
                 workdir: str) -> None:
  """Stored rows must come from the methods as configured now (same knobs, same weights)."""
  by_name = {s["method"]: json.loads(json.dumps(s)) for s in specs}  # tuples as stored
  for r in stored:
    spec = by_name.get(r["method"])
    if spec is None:
      continue
    diff = sorted(k for k in spec if r.get(k) != spec[k])
    if diff:
      raise ValueError(
          f"{workdir} holds rows of method {r['method']!r} measured with other {diff} "
          f"({ {k: r.get(k) for k in diff} } vs now { {k: spec[k] for k in diff} }); use "
          "another --workdir or delete it.")


def _peer_spec(name: str) -> dict[str, Any]:
  return {"method": name, "drafter": name, "drafter_kwargs": {},
          "num_nodes": peers_lib.PEERS[name] or 0, "stop": None, "acceptance": None,
          "lossy": False}


# ------------------------------------------------------------------------------------------
# The sweep.


def _cells(plan: Plan, prompts: Sequence[prompts_lib.Prompt]
           ) -> Iterator[tuple[prompts_lib.Prompt, float, int]]:
  for p in prompts:
    for temperature in plan.temperatures:
      for seed in plan.seeds:
        yield p, temperature, seed


def _prompt_cache_size(plan: Plan, tok, p: prompts_lib.Prompt, room: int) -> int:
  """The cache size every turn of prompt `p` decodes with (one compiled program per method
  for all of them): its user turns, room for the answers before the last (re-encoded,
  give or take a few tokens), the budget and the widest tree, rounded up to a bucket."""
  messages = []
  for turn in p.turns[:-1]:
    messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": ""}]
  messages.append({"role": "user", "content": p.turns[-1]})
  answers = (len(p.turns) - 1) * (plan.max_new_tokens + 16)
  return decode.bucketed_cache_size(len(tok.encode_chat(messages)) + answers,
                                    plan.max_new_tokens, room, plan.cache_bucket)


@dataclasses.dataclass
class LivePrograms:
  """Keeps the compiled decode programs of one cache size alive at a time: XLA:CPU maps
  thousands of memory regions per program of a real model, and a process holding the
  programs of every method for several sizes passes Linux's default vm.max_map_count
  and aborts. Prompts run ordered by size, so each program compiles once."""

  timer: Timer
  size: int | None = None

  def use(self, max_len: int) -> None:
    if max_len != self.size:
      if self.size is not None:
        jax.clear_caches()  # the previous size's programs; their timing warm-up goes too
        self.timer.seen.clear()
      self.size = max_len


def _turn_id(p: prompts_lib.Prompt, turn: int) -> str:
  return p.id if len(p.turns) == 1 else f"{p.id}/t{turn + 1}"


def _key(cell: Mapping[str, Any], method: str) -> tuple:
  return report.row_key({"method": method, **cell})


def _setup(plan: Plan) -> dict[str, str]:
  """How rows were run: the mesh ("" = one device) and the target's attention."""
  return {"mesh": "" if plan.sharding is None else plan.sharding.name,
          "attention": plan.attention}


def _check_resumable(rows: Sequence[Mapping[str, Any]], plan: Plan, workdir: str) -> None:
  mine = {"target": plan.target_name, "max_new_tokens": plan.max_new_tokens, **_setup(plan)}
  for r in rows:
    theirs = {"target": r["target"], "max_new_tokens": r["max_new_tokens"],
              "mesh": r.get("mesh", ""), "attention": r.get("attention", "xla")}
    if theirs != mine:
      show = lambda d: ", ".join(f"{k}={v!r}" for k, v in d.items())
      raise ValueError(f"{workdir} holds results of {show(theirs)}, not of this sweep "
                       f"({show(mine)}); use another --workdir.")


def _check_methods(rows: Sequence[Mapping[str, Any]], plan: Plan, workdir: str) -> None:
  """Stored rows must be of methods (and peers) this sweep runs: one summary per sweep."""
  names = [m.name for m in plan.methods] + list(plan.peers)
  other = sorted({r["method"] for r in rows} - set(names))
  if other:
    raise ValueError(f"{workdir} holds rows of methods {other} that this sweep does not "
                     f"run (it runs {names}); their rows would mix into its summary. Use "
                     "another --workdir, or add them back to the config's methods.")


def run(plan: Plan, workdir: str) -> list[dict[str, Any]]:
  """Measures every row missing from `workdir`/results.jsonl; returns the new rows.

  Rows are keyed by (method, dataset, prompt_id, temperature, seed) and appended (and
  fsynced) as they finish; stored rows supply the AR tokens of the cells they cover.
  Rows of a method whose knobs or head weights (`checkpoint_sha`) changed since, or of a
  method this sweep does not run, are refused, not mixed in.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, report.RESULTS)
  stored = report.read_rows(path)
  _check_resumable(stored, plan, workdir)
  _check_methods(stored, plan, workdir)
  done = {report.row_key(r): r for r in stored}
  prompts = [p for d in plan.datasets for p in prompts_lib.load(d, limit=plan.num_prompts)]
  names = [m.name for m in plan.methods] + list(plan.peers)
  by_name = {m.name: m for m in plan.methods}
  runs = lambda name, temperature: name not in by_name or by_name[name].runs_at(temperature)
  keys = [(name, p.dataset, _turn_id(p, t), temp, seed)
          for p, temp, seed in _cells(plan, prompts) for t in range(len(p.turns))
          for name in names if runs(name, temp)]
  todo = [k for k in keys if k not in done]
  target = models.load(plan.target, plan.dtype, plan=plan.sharding).with_attention(
      plan.attention)
  if plan.target_lora:  # Medusa-2: every method, AR included, decodes the merged model
    target = medusa.merged_target(plan.target_lora, target)
  if target.tokenizer is None:
    raise ValueError(f"Target {plan.target!r} has no tokenizer: sweeps render chat prompts.")
  tok = target.tokenizer
  timer = Timer(plan.warmup)
  base = plan.baseline
  jobs, carried = [], {}
  for m in [base] + [m for m in plan.methods if m is not base]:
    drafter = m.build_drafter(target)
    jobs.append((_spec(m, drafter), functools.partial(
        _measure_method, plan, timer, target, m, drafter, carried=carried)))
  _check_specs(stored, [spec for spec, _ in jobs], workdir)
  if not todo:
    return []
  if plan.peers:
    hf = peers_lib.load(_checkpoint_path(plan.target))
    jobs += [(_peer_spec(n), functools.partial(_measure_peer, plan, timer, hf, n,
                                               eos_ids=tok.eos_ids)) for n in plan.peers]
  room = max([0] + [spec["num_nodes"] for spec, _ in jobs])  # tree nodes past the budget
  long = [f"{p.dataset}/{p.id}" for p in prompts
          if decode.context_overflow(
              len(tok.encode_chat([{"role": "user", "content": p.turns[0]}])),
              plan.max_new_tokens, room, target.config)]
  if long:
    print(f"{len(long)} prompts do not fit the target's context with max_new_tokens="
          f"{plan.max_new_tokens}; they are skipped with a recorded reason: {long[:10]}")
  # Prompts in order of their cache size: each size's programs compile once, and only one
  # size's are held at a time.
  sizes = {id(p): _prompt_cache_size(plan, tok, p, room) for p in prompts}
  prompts = sorted(prompts, key=lambda p: sizes[id(p)])
  live = LivePrograms(timer)
  new_rows = []
  # Every process measures every row (they decode together); process 0 writes them.
  with open(path if jax.process_index() == 0 else os.devnull, "a", encoding="utf-8") as f, tqdm.tqdm(
          total=len(keys), initial=len(keys) - len(todo), unit="row", desc="sweep",
          disable=not plan.progress) as bar:
    for p, temperature, seed in _cells(plan, prompts):
      messages: list[dict[str, str]] = []
      skipped = False
      for t, turn in enumerate(p.turns):  # AR, then every method and peer, per turn
        cell = {"dataset": p.dataset, "prompt_id": _turn_id(p, t),
                "temperature": temperature, "seed": seed}
        messages.append({"role": "user", "content": turn})
        ids = tok.encode_chat(messages)
        reason = decode.context_overflow(len(ids), plan.max_new_tokens, room, target.config)
        if reason or skipped:  # recorded, so a resumed sweep does not try it again
          reason = reason or "an earlier turn of this prompt was skipped"
          bar.write(f"skipping {p.dataset}/{cell['prompt_id']}: {reason}")
          for spec, _ in jobs:
            if _key(cell, spec["method"]) not in done and runs(spec["method"], temperature):
              row = {**spec, **cell, "target": plan.target_name, "skipped": reason,
                     **_setup(plan),
                     "max_new_tokens": plan.max_new_tokens, "prompt_tokens": len(ids)}
              report.append_row(f, row)
              done[report.row_key(row)] = row
              bar.update(1)
          skipped = True
          continue
        # Re-encoded answers can run a few tokens past the estimate: then a larger size.
        max_len = max(sizes[id(p)], decode.bucketed_cache_size(
            len(ids), plan.max_new_tokens, room, plan.cache_bucket))
        for spec, measure in jobs:
          if _key(cell, spec["method"]) in done or not runs(spec["method"], temperature):
            continue
          bar.set_postfix_str(f"{spec['method']} {cell['prompt_id']}")
          live.use(max_len)
          m = measure(ids, temperature, seed, max_len)
          ar = done.get(_key(cell, base.name), m)["tokens"]  # AR runs first
          row = {**make_row(plan, spec, cell, len(ids), m, ar),
                 **_quality(target, p if len(p.turns) == 1 else None, ids, m["tokens"],
                            max_len)}
          report.append_row(f, row)
          done[report.row_key(row)] = row
          new_rows.append(row)
          bar.update(1)
        answer = [i for i in done[_key(cell, base.name)]["tokens"] if i not in tok.eos_ids]
        messages.append({"role": "assistant", "content": tok.decode(answer)})
  return new_rows
