"""Training data: token rows from Hugging Face `datasets`, tensorflow-datasets or a
self-distillation folder, served as fixed-shape batches in an order that is a pure
function of (seed, step), so a resumed run sees exactly the batches it would have.

Sources (`config.data.source`):
  path                  a .json/.jsonl/.parquet file, or a folder of them (e.g. the output
                        of `specjax-distill`), read with `datasets`
  hf:NAME[:SPLIT]       a hub dataset, only when a hub is reachable (clear error otherwise)
  tfds:NAME[:SPLIT]     a tensorflow-datasets dataset already prepared in its data_dir
  random:ROWS:LEN       deterministic random token rows
  self:ROWS:LEN         the target's own sampled continuations of random 4-token prompts,
                        generated at load time (self-distillation for tokenizer-free
                        targets: smoke runs and tests on random targets)
  stdlib:ROWS:CHARS     plain text on every machine: ROWS chunks of CHARS characters of
                        the Python standard library's source, in a fixed order (a draft
                        LM's pretraining text; no evaluation set draws on it)

Rows need `input_ids` (token ids; `loss_mask` optional, 1 = train on that token) or a text
field (`text`, `content`; tokenized with the target's tokenizer, every token trained on).
Each row becomes one sequence of `seq_len` tokens (cut or padded; padding is masked out).
The last `eval_rows` rows (after a seeded shuffle) are held out for evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import Any, Callable

import numpy as np

TEXT_FIELDS = ("text", "content")


def check_source(source: str) -> None:
  """Errors for a source that names nothing readable (see the module docstring), before
  any target loads: a mistyped kind, a bad ROWS:LEN, a missing path."""
  if source.startswith(("random:", "self:", "stdlib:")):
    _rows_and_length(source)
  elif not source.startswith(("hf:", "tfds:")) and not os.path.exists(source):
    raise FileNotFoundError(f"Data source {source!r} is not a file, a folder, "
                            "hf:NAME[:SPLIT], tfds:NAME[:SPLIT], random:ROWS:LEN, "
                            "self:ROWS:LEN or stdlib:ROWS:CHARS.")


def _rows_and_length(source: str) -> tuple[str, int, int]:
  try:
    kind, rows, length = source.split(":")
    return kind, int(rows), int(length)
  except ValueError:
    raise ValueError(f"Bad data source {source!r}: expected {source.split(':')[0]}:ROWS:LEN."
                     ) from None


def _read(source: str, target, seed: int):
  """A `datasets.Dataset` (or a list of dicts for tfds/random/self) of raw rows."""
  import datasets  # pylint: disable=g-import-not-at-top

  if source.startswith("stdlib:"):
    return stdlib_text(*_rows_and_length(source)[1:])
  if source.startswith(("random:", "self:")):
    kind, rows, length = _rows_and_length(source)
    if kind == "random":
      return [{"random": True, "index": i, "length": length} for i in range(rows)]
    from specjax import decode  # pylint: disable=g-import-not-at-top
    prompts = np.random.default_rng(seed).integers(0, target.config.vocab_size, (rows, 4))
    out = decode.generate(target, prompts.tolist(), max_new_tokens=length - 4,
                          temperature=1.0, seed=seed, eos=None)
    return [{"input_ids": p.tolist() + r, "loss_mask": [0] * 4 + [1] * len(r)}
            for p, r in zip(prompts, out.token_lists())]
  if source.startswith("hf:"):
    name, _, split = source[3:].partition(":")
    try:
      return datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown name or split: say which and why
      raise ValueError(f"Could not load hub dataset {name!r} (split {split or 'train'!r}): "
                       f"{type(e).__name__}: {e}. Without a hub, pass a local file or "
                       "folder.") from e
  if source.startswith("tfds:"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name, _, split = source[5:].partition(":")
    try:
      ds = tfds.load(name, split=split or "train", download=False)
    except Exception as e:
      raise ValueError(f"Could not load tensorflow-datasets {name!r}: {type(e).__name__}: "
                       f"{e}. Prepare it in its data_dir first (no download here).") from e
    return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in row.items()}
            for row in tfds.as_numpy(ds)]
  if os.path.isdir(source):
    files = sorted(f for ext in ("jsonl", "json", "parquet")
                   for f in glob.glob(os.path.join(source, f"*.{ext}"))
                   if os.path.basename(f) != "manifest.json")  # specjax-distill's settings
    if not files:
      raise FileNotFoundError(f"Data folder {source!r} has no .jsonl/.json/.parquet files.")
  elif os.path.isfile(source):
    files = [source]
  else:
    check_source(source)  # raises: names nothing readable
  if all(os.path.getsize(f) == 0 for f in files):
    raise ValueError(f"Data source {source!r} is empty.")
  kind = "parquet" if files[0].endswith(".parquet") else "json"
  try:
    return datasets.load_dataset(kind, data_files=files, split="train")
  except Exception as e:  # malformed rows: name the source
    raise ValueError(f"Could not read {source!r} with datasets: {type(e).__name__}: {e}") from e


def stdlib_text(rows: int, chars: int) -> list[dict[str, str]]:
  """`rows` text chunks of `chars` characters from the standard library's .py files
  (sorted; tests, idlelib and site-packages left out)."""
  import sysconfig  # pylint: disable=g-import-not-at-top
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, files in sorted(os.walk(root)):
    dirnames[:] = sorted(d for d in dirnames if d not in (
        "test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"))
    for name in sorted(f for f in files if f.endswith(".py")):
      with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
        text = f.read()
      out += [{"text": text[i:i + chars]} for i in range(0, len(text), chars)
              if text[i:i + chars].strip()]
      if len(out) >= rows:
        return out[:rows]
  return out


def _tokens(row: dict[str, Any], i: int, source: str, encode: Callable | None, vocab: int,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
  if row.get("random"):
    rng = np.random.default_rng((seed, row["index"]))
    ids = rng.integers(0, vocab, row["length"])
    return ids, np.ones_like(ids)
  if row.get("input_ids") is not None:
    ids = np.asarray(row["input_ids"])
    # A column read as floats (one row held a float): whole numbers are exact ids; any
    # other value would be truncated into a wrong id.
    whole = np.issubdtype(ids.dtype, np.integer) or (
        np.issubdtype(ids.dtype, np.floating) and np.all(np.mod(ids, 1) == 0))
    if ids.ndim != 1 or (ids.size and not whole):
      flat = ids.reshape(-1).tolist()
      bad = ([x for x in flat if not float(x).is_integer()] if ids.ndim == 1 and
             ids.dtype.kind == "f" else flat)
      raise ValueError(f"{source}: row {i} has input_ids that are not a list of integer "
                       f"token ids (e.g. {bad[:3]}).")
    ids = ids.astype(np.int64)
    mask = np.asarray(row["loss_mask"] if row.get("loss_mask") is not None
                      else np.ones_like(ids))
    if mask.shape != ids.shape:
      raise ValueError(f"{source}: row {i} has {len(ids)} input_ids but {len(mask)} "
                       "loss_mask entries.")
  else:
    text = next((row[k] for k in TEXT_FIELDS if row.get(k) is not None), None)
    if text is None:
      raise ValueError(f"{source}: row {i} has no 'input_ids' and none of the text fields "
                       f"{TEXT_FIELDS}; its fields are {sorted(row)}.")
    if encode is None:
      raise ValueError(f"{source} holds text but the target has no tokenizer: give token ids.")
    ids = np.asarray(encode(text), np.int64)
    mask = np.ones_like(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab):
    raise ValueError(f"{source}: row {i} has token ids outside the target's vocabulary "
                     f"[0, {vocab}).")
  return ids, mask


@dataclasses.dataclass(eq=False)
class Data:
  """Tokenized rows as fixed-width arrays; batches by step.

  Each epoch is a seeded permutation cut into batches of rows of similar length (sorted
  within groups of `GROUP` batches, then the batches shuffled), each batch cut to the
  longest row rounded up to `bucket` tokens: a few compiled widths, and far less padding
  than every row at `seq_len` (distilled rows are ~55% of 512 tokens on average).
  """

  tokens: np.ndarray  # int32[N, T]
  mask: np.ndarray  # float32[N, T]
  lengths: np.ndarray  # int32[N]: tokens before the padding
  eval_tokens: np.ndarray
  eval_mask: np.ndarray
  eval_lengths: np.ndarray
  seed: int
  bucket: int = 128
  # A `fraction` of the rows: the whole split it was cut from, and each row's index there
  # (training rows, then held-out rows), so offline features are stored once for all.
  whole: "Data | None" = None
  origin: np.ndarray | None = None

  GROUP = 16

  @property
  def train_tokens(self) -> int:
    """Tokens trained on per epoch (mask sum)."""
    return int(self.mask.sum())

  def batches_per_epoch(self, batch_size: int) -> int:
    return max(1, len(self.tokens) // batch_size)

  def batch_rows(self, step: int, batch_size: int) -> tuple[np.ndarray, int]:
    """(row indices, width) of micro-step `step`, a pure function of (seed, step)."""
    epoch, i = divmod(step, self.batches_per_epoch(batch_size))
    idx = self._epoch(epoch, batch_size)[i]
    return idx, self.width(self.lengths[idx])

  def batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) of micro-step `step`."""
    idx, width = self.batch_rows(step, batch_size)
    return self.tokens[idx, :width], self.mask[idx, :width]

  def width(self, lengths) -> int:
    """Batch width for rows of these lengths: the longest, rounded up to `bucket`."""
    return min(self.tokens.shape[1], -(-int(lengths.max()) // self.bucket) * self.bucket)

  @functools.lru_cache(maxsize=4)
  def _epoch(self, epoch: int, batch_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng((self.seed, epoch))
    perm = rng.permutation(len(self.tokens))
    batches = []
    group = batch_size * self.GROUP
    for g in range(0, self.batches_per_epoch(batch_size) * batch_size, group):
      rows = perm[g:min(g + group, self.batches_per_epoch(batch_size) * batch_size)]
      rows = rows[np.argsort(self.lengths[rows], kind="stable")]
      batches += [rows[j:j + batch_size] for j in range(0, len(rows), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]

  def eval_batches(self, batch_size: int):
    """(tokens, mask, row indices counted after the training rows, width) per batch."""
    for i in range(0, len(self.eval_tokens), batch_size):
      idx = np.arange(i, min(i + batch_size, len(self.eval_tokens)))
      width = self.width(self.eval_lengths[idx])
      yield (self.eval_tokens[idx, :width], self.eval_mask[idx, :width],
             len(self.tokens) + idx, width)


def load(source: str, *, seq_len: int, vocab: int, encode: Callable | None = None,
         eval_rows: int = 16, seed: int = 0, min_trained: int = 2, target=None,
         bucket: int = 128, fraction: float = 1.0) -> Data:
  """Reads, tokenizes and shapes a data source (see the module docstring).

  Rows with fewer than `min_trained` trained tokens inside the first `seq_len` are
  dropped; no rows left, or fewer than needed for the held-out split, is an error.
  `fraction` keeps that share of the training rows (the held-out rows stay the same
  whatever it is: the split comes first), for data-scaling curves.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"data.fraction must be in (0, 1]; got {fraction}.")
  rows = _read(source, target, seed)
  if len(rows) == 0:
    raise ValueError(f"Data source {source!r} is empty.")
  toks, masks, lens = [], [], []
  for i in range(len(rows)):
    ids, mask = _tokens(rows[i], i, source, encode, vocab, seed)
    ids, mask = ids[:seq_len], mask[:seq_len]
    if mask.sum() < min_trained:
      continue
    pad = seq_len - len(ids)
    lens.append(len(ids))
    toks.append(np.pad(ids, (0, pad)).astype(np.int32))
    masks.append(np.pad(mask, (0, pad)).astype(np.float32))
  if len(toks) <= eval_rows:
    raise ValueError(f"Data source {source!r} has {len(toks)} usable rows (with >= "
                     f"{min_trained} trained tokens in the first {seq_len}); need more than "
                     f"eval_rows={eval_rows}.")
  order = np.random.default_rng(seed).permutation(len(toks))
  toks, masks, lens = np.stack(toks)[order], np.stack(masks)[order], np.asarray(lens)[order]
  cut = len(toks) - eval_rows
  whole = Data(toks[:cut], masks[:cut], lens[:cut], toks[cut:], masks[cut:], lens[cut:],
               seed, min(bucket, seq_len))
  if fraction == 1:
    return whole
  keep = max(1, round(fraction * cut))
  return dataclasses.replace(
      whole, tokens=toks[:keep], mask=masks[:keep], lengths=lens[:keep], whole=whole,
      origin=np.concatenate([np.arange(keep), cut + np.arange(eval_rows)]))


def describe(data: Data) -> str:
  return (f"{len(data.tokens)} training rows ({data.train_tokens} trained tokens an epoch), "
          f"{len(data.eval_tokens)} held out")
