"""Sweeps: methods x datasets x prompts x temperatures x seeds, timed against AR.

`plan(config)` checks a config before any weights load or anything compiles and returns a
`Plan`; `run(plan, workdir)` measures every row results.jsonl does not hold yet, appending
each as it finishes, so a restarted sweep resumes where it stopped.

Protocol (Spec-Bench): batch size 1; for each prompt the AR baseline runs first, then every
method and peer, in one process, so drift cancels; the first call of each compiled shape
(plus `warmup` more) is not timed; prompt widths round up to `pad_to` so prompts share
shapes. Prompts are rendered with the target's chat template; a later turn of a multi-turn
prompt (MT-Bench) follows the AR answer to the earlier turns at the same temperature and
seed, and every turn is its own row ("81/t1", "81/t2").
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import tqdm

from specjax import decode, models, stopping
from specjax import verify as verify_lib
from specjax.drafters import DraftModel, PromptLookup
from specjax.models import Model, ModelConfig

from . import metrics, peers as peers_lib, prompts as prompts_lib, report

DRAFTERS = ("ar", "prompt_lookup", "self_draft", "draft_model")
RANDOM_PREFIX = "random:"
# Random-weight targets for tests: "random:<name>" builds one with no checkpoint.
RANDOM_MODELS = {
    "tiny": ModelConfig(arch="llama", vocab_size=256, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        tie_embeddings=True, max_position_embeddings=2048),
}


@dataclasses.dataclass(frozen=True)
class Method:
  """One decoding method; see `configs/common.py:method` for the fields."""

  name: str
  drafter: str = "ar"
  num_draft: int = 4
  layers: int | None = None
  stop: str | None = None
  stop_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  acceptance: str | None = None
  acceptance_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  checkpoint: str | None = None

  @property
  def lossy(self) -> bool:
    """Whether the acceptance rule may change the output distribution."""
    return self.acceptance is not None and not self.rule().lossless

  def rule(self) -> verify_lib.Acceptance | None:
    """The explicit acceptance rule, or None for generate's default by temperature."""
    if self.acceptance is None:
      return None
    return verify_lib.get(self.acceptance, **self.acceptance_kwargs)

  def stop_policy(self) -> Any:
    return None if self.stop is None else stopping.get(self.stop, **self.stop_kwargs)


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
  pad_to: int
  peers: tuple[str, ...]
  progress: bool

  @property
  def baseline(self) -> Method:
    return next(m for m in self.methods if m.drafter == "ar")


# ------------------------------------------------------------------------------------------
# Validation: everything that can be wrong with a config, before weights load.


def _check_model_ref(ref: str, what: str) -> None:
  """A preset, a random model, or an existing HF folder / .gguf file."""
  if ref.startswith(RANDOM_PREFIX):
    if ref[len(RANDOM_PREFIX):] not in RANDOM_MODELS:
      raise ValueError(f"Unknown random {what} {ref!r}; choose from "
                       f"{[RANDOM_PREFIX + n for n in RANDOM_MODELS]}.")
  elif ref in models.PRESETS:
    models.preset_path(ref)  # FileNotFoundError with the install command
  elif not os.path.exists(ref):
    kind = FileNotFoundError if os.sep in ref or ref.endswith(".gguf") else ValueError
    raise kind(f"{what} {ref!r} is neither a preset {sorted(models.PRESETS)}, a random "
               f"model {[RANDOM_PREFIX + n for n in RANDOM_MODELS]} nor an existing path.")


def _check_dataset(name: str) -> None:
  if name in prompts_lib.names() or name.startswith("hf:"):
    prompts_lib.load(name, limit=1)  # FileNotFoundError with the install command
  elif not os.path.isfile(name):
    kind = FileNotFoundError if name.endswith((".json", ".jsonl")) else ValueError
    raise kind(f"Unknown dataset {name!r}: not a file and not one of "
               f"{prompts_lib.names()}.")


def _method(spec: Mapping[str, Any], temperatures: Sequence[float]) -> Method:
  fields = {f.name for f in dataclasses.fields(Method)}
  unknown = sorted(set(spec) - fields)
  if unknown or "name" not in spec:
    raise ValueError(f"Method {dict(spec)} has unknown fields {unknown} or no name; "
                     f"fields: {sorted(fields)}.")
  m = Method(**spec)
  where = f"Method {m.name!r}"
  if m.drafter not in DRAFTERS:
    raise ValueError(f"{where}: unknown drafter {m.drafter!r}; choose from {DRAFTERS}.")
  if m.drafter == "ar" and (m.stop or m.acceptance):
    raise ValueError(f"{where}: AR decoding takes no stop policy or acceptance rule.")
  if m.drafter != "ar" and m.num_draft < 1:
    raise ValueError(f"{where}: num_draft must be >= 1; got {m.num_draft}.")
  if m.stop is not None and m.drafter not in ("self_draft", "draft_model"):
    raise ValueError(f"{where}: stop policies apply to model drafters only, not "
                     f"{m.drafter!r}.")
  try:
    m.stop_policy()
    rule = m.rule()
  except TypeError as e:  # a knob the policy or rule does not have
    raise ValueError(f"{where}: bad stop_kwargs or acceptance_kwargs: {e}") from e
  if rule is not None and rule.name == "greedy" and any(t > 0 for t in temperatures):
    raise ValueError(f"{where}: acceptance 'greedy' needs temperature 0; leave it None "
                     "to pick greedy / speculative by temperature.")
  if rule is not None and rule.name == "fuzzy" and 0 in temperatures:
    raise ValueError(f"{where}: acceptance 'fuzzy' needs temperatures > 0.")
  if m.drafter == "self_draft" and (not isinstance(m.layers, int) or m.layers < 1):
    raise ValueError(f"{where}: self_draft needs layers >= 1; got {m.layers!r}.")
  if m.drafter == "draft_model":
    if not m.checkpoint:
      raise ValueError(f"{where}: draft_model needs a checkpoint (preset or path).")
    _check_model_ref(m.checkpoint, f"{where}: draft checkpoint")
  return m


def plan(config: Any) -> Plan:
  """Validates a sweep config (a ConfigDict or a dict) into a Plan; loads no weights.

  Raises ValueError / FileNotFoundError naming the bad method, drafter, stop policy,
  acceptance rule, dataset, target or checkpoint.
  """
  c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  missing = [f.name for f in dataclasses.fields(Plan) if f.name not in c]
  if missing:
    raise ValueError(f"Config lacks {missing}; start from configs/common.py:base().")
  temperatures = tuple(float(t) for t in c["temperatures"])
  if not temperatures or min(temperatures) < 0:
    raise ValueError(f"temperatures must be a non-empty list of values >= 0; got "
                     f"{temperatures}.")
  for field in ("max_new_tokens", "num_prompts", "pad_to"):
    if c[field] < 1:
      raise ValueError(f"{field} must be >= 1; got {c[field]}.")
  if c["warmup"] < 0 or not c["seeds"] or not c["datasets"]:
    raise ValueError("warmup must be >= 0, seeds and datasets non-empty.")
  methods = tuple(_method(m, temperatures) for m in c["methods"])
  names = [m.name for m in methods] + list(c["peers"])
  if len(set(names)) != len(names):
    raise ValueError(f"Method and peer names must be unique; got {names}.")
  if sum(m.drafter == "ar" for m in methods) != 1:
    raise ValueError("A sweep needs exactly one method with drafter 'ar': the baseline "
                     "of speedup and equal_to_ar.")
  _check_model_ref(c["target"], "Target")
  for d in c["datasets"]:
    _check_dataset(d)
  bad_peers = sorted(set(c["peers"]) - set(peers_lib.PEERS))
  if bad_peers:
    raise ValueError(f"Unknown peers {bad_peers}; choose from {sorted(peers_lib.PEERS)}.")
  if c["peers"]:
    if c["target"].startswith(RANDOM_PREFIX):
      raise ValueError("Peers load the target's checkpoint; a random target has none.")
    peers_lib.check_available()
  return Plan(target=c["target"], dtype=c["dtype"], methods=methods,
              datasets=tuple(c["datasets"]), num_prompts=c["num_prompts"],
              temperatures=temperatures, seeds=tuple(int(s) for s in c["seeds"]),
              max_new_tokens=c["max_new_tokens"], warmup=c["warmup"], pad_to=c["pad_to"],
              peers=tuple(c["peers"]), progress=bool(c["progress"]))


# ------------------------------------------------------------------------------------------
# Models and drafters.


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """TEST-ONLY stand-in for targets without a tokenizer (random models): token ids are
  the UTF-8 bytes of the text mod the vocabulary, the chat template a plain transcript."""

  vocab_size: int
  eos_ids: tuple[int, ...] = ()

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = True) -> str:
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")

  def encode(self, text: str) -> list[int]:
    return [b % self.vocab_size for b in text.encode("utf-8")]

  def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
    return self.encode(self.apply_chat_template(messages))

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


def load_model(ref: str, dtype: str) -> Model:
  """A preset / path via `specjax.models.load`, or a "random:<name>" model (tests).
  Models without a tokenizer get the test-only `ByteTokenizer`."""
  if ref.startswith(RANDOM_PREFIX):
    cfg = RANDOM_MODELS[ref[len(RANDOM_PREFIX):]]
    params = models.init_params(cfg, jax.random.key(0), models.parse_dtype(dtype))
    return Model(cfg, params, ByteTokenizer(cfg.vocab_size), name=ref)
  model = models.load(ref, dtype)
  if model.tokenizer is None:
    model = dataclasses.replace(model, tokenizer=ByteTokenizer(model.config.vocab_size))
  return model


def _checkpoint_path(ref: str) -> str:
  """The file or folder behind a preset or path (what the peers load)."""
  return models.preset_path(ref) if ref in models.PRESETS else ref


def build_drafter(method: Method, target: Model, dtype: str) -> Any:
  """The drafter of a method (None for AR); errors (layer count, vocab) before compiling."""
  if method.drafter == "ar":
    return None
  if method.drafter == "prompt_lookup":
    drafter = PromptLookup(num_draft=method.num_draft)
  elif method.drafter == "self_draft":
    drafter = DraftModel.truncated(target, method.layers, method.num_draft)
  else:
    drafter = DraftModel.from_model(load_model(method.checkpoint, dtype), method.num_draft)
  drafter.validate(target.config)
  return drafter


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


def _padded(width: int, pad_to: int) -> int:
  return -(-width // pad_to) * pad_to


def _measure_method(plan: Plan, timer: Timer, target: Model, method: Method, drafter: Any,
                    ids: list[int], temperature: float, seed: int) -> dict[str, Any]:
  call = functools.partial(
      decode.generate, target, [ids], max_new_tokens=plan.max_new_tokens,
      temperature=temperature, seed=seed, drafter=drafter, stop=method.stop_policy(),
      acceptance=method.rule(), pad_to=plan.pad_to)
  out, seconds = timer(call, (method.name, _padded(len(ids), plan.pad_to), temperature))
  num_nodes = 0 if drafter is None else drafter.num_nodes
  return {"tokens": out.token_lists()[0], "target_calls": int(out.stats.target_calls[0]),
          "draft_calls": int(out.stats.draft_calls[0]), "seconds": seconds,
          "accepted_hist": metrics.accepted_histogram(
              out.stats.gained[0].tolist(), num_nodes)}


def _measure_peer(plan: Plan, timer: Timer, hf: Any, name: str, ids: list[int],
                  temperature: float, seed: int, eos_ids: Sequence[int]) -> dict[str, Any]:
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
      **spec, **cell, "target": plan.target, "max_new_tokens": plan.max_new_tokens,
      "prompt_tokens": prompt_tokens, "new_tokens": new, "target_calls": measured["target_calls"],
      "draft_calls": measured["draft_calls"],
      "tau": metrics.tau(new, measured["target_calls"]),
      "seconds": measured["seconds"],
      "tokens_per_s": metrics.tokens_per_s(new, measured["seconds"]),
      "target_per_token": metrics.per_token(measured["target_calls"], new),
      "draft_per_token": metrics.per_token(measured["draft_calls"], new),
      "equal_to_ar": measured["tokens"] == ar_tokens if greedy else None,
      "accepted_hist": measured["accepted_hist"], "tokens": measured["tokens"],
  }


def _spec(method: Method) -> dict[str, Any]:
  return {"method": method.name, "drafter": method.drafter,
          "num_draft": 0 if method.drafter == "ar" else method.num_draft,
          "layers": method.layers, "stop": method.stop, "acceptance": method.acceptance,
          "checkpoint": method.checkpoint, "lossy": method.lossy}


def _peer_spec(name: str) -> dict[str, Any]:
  return {"method": name, "drafter": name, "num_draft": peers_lib.PEERS[name] or 0,
          "layers": None, "stop": None, "acceptance": None, "checkpoint": None,
          "lossy": False}


# ------------------------------------------------------------------------------------------
# The sweep.


def _cells(plan: Plan, prompt_sets: Sequence[Sequence[prompts_lib.Prompt]]
           ) -> Iterator[tuple[prompts_lib.Prompt, float, int]]:
  for prompts in prompt_sets:
    for p in prompts:
      for temperature in plan.temperatures:
        for seed in plan.seeds:
          yield p, temperature, seed


def _turn_id(p: prompts_lib.Prompt, turn: int) -> str:
  return p.id if len(p.turns) == 1 else f"{p.id}/t{turn + 1}"


def _key(cell: Mapping[str, Any], method: str) -> tuple:
  return report.row_key({"method": method, **cell})


def _check_resumable(rows: Sequence[Mapping[str, Any]], plan: Plan, workdir: str) -> None:
  for r in rows:
    if (r["target"], r["max_new_tokens"]) != (plan.target, plan.max_new_tokens):
      raise ValueError(
          f"{workdir} holds results of target={r['target']!r}, max_new_tokens="
          f"{r['max_new_tokens']}, not of this sweep; use another --workdir.")


def run(plan: Plan, workdir: str) -> list[dict[str, Any]]:
  """Measures every row missing from `workdir`/results.jsonl; returns the new rows.

  Rows are keyed by (method, dataset, prompt_id, temperature, seed) and appended (and
  fsynced) as they finish; stored rows supply the AR tokens of the cells they cover.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, report.RESULTS)
  stored = report.read_rows(path)
  _check_resumable(stored, plan, workdir)
  done = {report.row_key(r): r for r in stored}
  prompt_sets = [prompts_lib.load(d, limit=plan.num_prompts) for d in plan.datasets]
  specs = [_spec(m) for m in plan.methods] + [_peer_spec(n) for n in plan.peers]
  keys = [(s["method"], p.dataset, _turn_id(p, t), temp, seed)
          for p, temp, seed in _cells(plan, prompt_sets) for t in range(len(p.turns))
          for s in specs]
  todo = [k for k in keys if k not in done]
  if not todo:
    return []
  target = load_model(plan.target, plan.dtype)
  tok = target.tokenizer
  timer = Timer(plan.warmup)
  base = plan.baseline
  jobs = [(_spec(m), functools.partial(_measure_method, plan, timer, target, m,
                                       build_drafter(m, target, plan.dtype)))
          for m in [base] + [m for m in plan.methods if m is not base]]
  if plan.peers:
    hf = peers_lib.load(_checkpoint_path(plan.target))
    jobs += [(_peer_spec(n), functools.partial(_measure_peer, plan, timer, hf, n,
                                               eos_ids=tok.eos_ids)) for n in plan.peers]
  new_rows = []
  with open(path, "a", encoding="utf-8") as f, tqdm.tqdm(
          total=len(keys), initial=len(keys) - len(todo), unit="row", desc="sweep",
          disable=not plan.progress) as bar:
    for p, temperature, seed in _cells(plan, prompt_sets):
      messages: list[dict[str, str]] = []
      for t, turn in enumerate(p.turns):  # AR, then every method and peer, per turn
        cell = {"dataset": p.dataset, "prompt_id": _turn_id(p, t),
                "temperature": temperature, "seed": seed}
        messages.append({"role": "user", "content": turn})
        ids = tok.encode_chat(messages)
        for spec, measure in jobs:
          if _key(cell, spec["method"]) in done:
            continue
          bar.set_postfix_str(f"{spec['method']} {cell['prompt_id']}")
          m = measure(ids, temperature, seed)
          ar = done.get(_key(cell, base.name), m)["tokens"]  # AR runs first
          row = make_row(plan, spec, cell, len(ids), m, ar)
          report.append_row(f, row)
          done[report.row_key(row)] = row
          new_rows.append(row)
          bar.update(1)
        answer = [i for i in done[_key(cell, base.name)]["tokens"] if i not in tok.eos_ids]
        messages.append({"role": "assistant", "content": tok.decode(answer)})
  return new_rows
