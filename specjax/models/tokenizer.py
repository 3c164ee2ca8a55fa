"""Tokenizers for specjax models, built on the Hugging Face `tokenizers` library.

`Tokenizer.from_gguf(path_or_reader)` rebuilds the tokenizer a GGUF file describes in its
metadata (`tokenizer.ggml.*`) the way Hugging Face transformers does for the same file, so the
ids match `AutoTokenizer.from_pretrained(folder, gguf_file=name)`:

* `gpt2` (byte-level BPE: GPT-2, SmolLM, Llama 3, Qwen 2, ...): vocab and merges from the file,
  GPT-2's byte-level pre-tokenizer, or a split regex picked by `tokenizer.ggml.pre`.
* `llama` (sentencepiece BPE: Llama 1/2, Mistral, Phi-3, ...): byte-fallback BPE with the
  merges from the file, or derived from the token scores when the file has none.

Tokens the file marks as control (token_type 3) become special tokens, so `<|im_start|>` in a
text encodes to one id. `Tokenizer.from_hf_dir(folder)` reads a `tokenizer.json` and, when
present, `tokenizer_config.json`, `chat_template.jinja` and `generation_config.json`.

Chat templates are rendered with jinja2 in a sandbox set up like transformers' own.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

# End-of-turn tokens of common chat formats. Each becomes a stop id when it is in the vocabulary
# and the chat template writes it (ChatML, Llama 3, Phi-3, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

# GGUF token_type values (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Split regexes by `tokenizer.ggml.pre`, as transformers' GGUF converter has them. A byte-level
# vocabulary whose pre type is not listed keeps GPT-2's ByteLevel regex (that includes 'gpt2' and
# 'smollm': SmolLM's vocabulary has no multi-digit tokens or digit merges, so splitting digits
# one by one, as its original tokenizer.json does, gives the same ids).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# Architectures whose sentencepiece ('llama') vocabulary needs a builder we do not have.
_UNSUPPORTED_SPM_ARCHS = ("gemma", "gemma2", "gemma3", "gemma3n")


class Tokenizer:
  """A text <-> token-id codec plus the model's chat template.

  Attributes:
    backend: the wrapped `tokenizers.Tokenizer`.
    vocab_size: one more than the largest token id (added tokens included).
    bos_id: the beginning-of-sequence id, or None.
    eos_ids: the ids that end a generation: the EOS id, then the end-of-turn tokens the chat
      template writes (e.g. `<|im_end|>`), then any listed by `generation_config.json`.
    pad_id: the padding id, or None.
    unk_id: the unknown-token id, or None.
    chat_template: the jinja chat template, or None.
    add_bos: whether `encode` prepends `bos_id` by default.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None = None,
               eos_ids: Iterable[int] = (), pad_id: int | None = None,
               unk_id: int | None = None, chat_template: str | None = None,
               add_bos: bool = False, vocab_size: int | None = None):
    self.backend = backend
    self.bos_id = bos_id
    self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_ids))
    self.pad_id = pad_id
    self.unk_id = unk_id
    self.chat_template = chat_template
    self.add_bos = bool(add_bos and bos_id is not None)
    if vocab_size is None:
      vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    self.vocab_size = int(vocab_size)

  # ---------------------------------------------------------------------------------------
  # Special tokens.

  @property
  def eos_id(self) -> int | None:
    """The first (primary) EOS id, or None."""
    return self.eos_ids[0] if self.eos_ids else None

  @property
  def bos_token(self) -> str | None:
    return self.id_to_token(self.bos_id)

  @property
  def eos_token(self) -> str | None:
    return self.id_to_token(self.eos_id)

  @property
  def pad_token(self) -> str | None:
    return self.id_to_token(self.pad_id)

  @property
  def unk_token(self) -> str | None:
    return self.id_to_token(self.unk_id)

  def token_to_id(self, token: str) -> int | None:
    """The id of a token (vocabulary spelling, e.g. 'Ġthe'), or None."""
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int | None) -> str | None:
    """The vocabulary spelling of an id, or None."""
    return None if token_id is None else self.backend.id_to_token(int(token_id))

  # ---------------------------------------------------------------------------------------
  # Encoding and decoding.

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; special tokens written in it (e.g. `<|im_start|>`) become one id.

    Args:
      text: the string to encode.
      add_bos: prepend `bos_id`; None uses the tokenizer's default (`self.add_bos`).
    """
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
    """`encode` for many strings at once (in parallel in the Rust backend)."""
    out = self.backend.encode_batch(list(texts), add_special_tokens=False)
    bos = (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None
    return [([self.bos_id] if bos else []) + e.ids for e in out]

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    """The text of `ids` (a list, or a 1-D numpy/jax array).

    Args:
      ids: token ids.
      skip_special: leave out special tokens (BOS, EOS, `<|im_start|>`, ...).
    """
    if hasattr(ids, "tolist"):  # numpy / jax arrays
      ids = ids.tolist()
    if isinstance(ids, int):
      ids = [ids]
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  # ---------------------------------------------------------------------------------------
  # Chat.

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Renders a conversation with the chat template, as transformers does.

    Args:
      messages: dicts with at least 'role' and 'content'. Keys whose value is None are dropped.
      add_generation_prompt: end with the header that starts an assistant turn.
      **kwargs: more template variables (e.g. `tools`, `enable_thinking`); they override the
        special-token strings (`bos_token`, `eos_token`, `unk_token`, `pad_token`).

    Raises:
      ValueError: the tokenizer has no chat template.
      jinja2.TemplateError: the template rejected the conversation (`raise_exception`).
    """
    if not self.chat_template:
      raise ValueError("This tokenizer has no chat template; pass plain text or token ids.")
    messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    variables = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "unk_token": self.unk_token, "pad_token": self.pad_token}
    variables = {k: v for k, v in variables.items() if v is not None}
    variables.update(kwargs)
    return _compile_template(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables)

  def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                  add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
    """Token ids of the rendered conversation.

    BOS is prepended only when the tokenizer adds one by default and the rendered text does not
    already start with it (templates such as Llama's write `{{ bos_token }}` themselves).
    """
    text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
    bos = self.bos_token
    return self.encode(text, add_bos=self.add_bos and not (bos and text.startswith(bos)))

  def __len__(self) -> int:
    return self.vocab_size

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, pad_id={self.pad_id}, add_bos={self.add_bos}, "
            f"chat_template={'yes' if self.chat_template else 'no'})")

  # ---------------------------------------------------------------------------------------
  # Loading.

  @classmethod
  def from_gguf(cls, path_or_reader: str | os.PathLike | Any) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata.

    Args:
      path_or_reader: a `.gguf` path, or an open `gguf.GGUFReader` (reading one parses every
        string in the file, seconds for a large vocabulary, so pass the model loader's).

    Raises:
      FileNotFoundError: no file at the path.
      ValueError: the file has no tokenizer, or one of a kind not supported here.
    """
    if isinstance(path_or_reader, (str, os.PathLike)):
      path = os.fspath(path_or_reader)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"No GGUF file at {path!r}.")
      import gguf  # pylint: disable=g-import-not-at-top
      reader = gguf.GGUFReader(path)
    else:
      reader = path_or_reader
      path = str(getattr(getattr(reader, "data", None), "filename", None) or "<GGUFReader>")
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
      field = fields.get(key)
      return default if field is None else field.contents()

    kind = get("tokenizer.ggml.model")
    if kind is None:
      raise ValueError(f"GGUF file {path!r} stores no tokenizer (no 'tokenizer.ggml.model').")
    arch = get("general.architecture")
    tokens = list(get("tokenizer.ggml.tokens") or ())
    if not tokens:
      raise ValueError(f"GGUF file {path!r} has no 'tokenizer.ggml.tokens'.")
    token_types = list(get("tokenizer.ggml.token_type") or ())
    merges = get("tokenizer.ggml.merges")

    if kind == "gpt2":
      backend, spelled = _byte_level_bpe(tokens, merges, get("tokenizer.ggml.pre"))
      add_bos_default = False
    elif kind == "llama":
      if arch in _UNSUPPORTED_SPM_ARCHS:
        raise ValueError(f"GGUF sentencepiece tokenizer of architecture {arch!r} ({path!r}) is "
                         "not supported; use its Hugging Face folder (from_hf_dir) instead.")
      backend = _sentencepiece_bpe(tokens, merges, get("tokenizer.ggml.scores"), arch)
      spelled = None
      add_bos_default = True  # llama.cpp's default for sentencepiece vocabularies.
    else:
      raise ValueError(f"GGUF tokenizer model {kind!r} ({path!r}) is not supported; supported: "
                       "'gpt2' (byte-level BPE) and 'llama' (sentencepiece BPE).")

    def token_id(key: str) -> int | None:
      value = get(f"tokenizer.ggml.{key}")
      # Ids past the vocabulary (e.g. 0xFFFFFFFF written for "none") count as absent.
      return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
    unk_id, pad_id = token_id("unknown_token_id"), token_id("padding_token_id")

    # Control tokens are special (matched whole, skippable on decode). In a byte-level vocabulary
    # a "control" token spelled outside the byte alphabet is a llama.cpp mislabel: skipped, as
    # transformers does. User-defined tokens (e.g. `<think>`) are matched whole but not special.
    control = [t for t, ty in zip(tokens, token_types)
               if ty == _TOKEN_TYPE_CONTROL and (spelled is None or set(t) <= spelled)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = backend.get_vocab(with_added_tokens=False)
    user = [t for t, ty in zip(tokens, token_types) if ty == _TOKEN_TYPE_USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    named = [tokens[i] for i in (bos_id, eos_id, unk_id, pad_id) if i is not None]
    backend.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(named)
                                if t not in control])

    template = get("tokenizer.chat_template")
    add_bos = get("tokenizer.ggml.add_bos_token")
    return cls(backend, bos_id=bos_id,
               eos_ids=_stop_ids(backend, eos_id, template),
               pad_id=pad_id, unk_id=unk_id, chat_template=template,
               add_bos=add_bos_default if add_bos is None else bool(add_bos),
               vocab_size=len(tokens))

  @classmethod
  def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face folder.

    Reads `tokenizer.json`, and when present `tokenizer_config.json` (bos/eos/pad/unk tokens,
    `add_bos_token`, `chat_template`), `special_tokens_map.json`, `chat_template.jinja` (or
    `chat_template.json`) and `generation_config.json` (extra `eos_token_id`s). Without an
    `add_bos_token` entry, BOS is added by default iff `tokenizer.json`'s post-processor adds it.

    Raises:
      FileNotFoundError: no such folder, or no `tokenizer.json` in it.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"No tokenizer folder at {path!r}.")
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
      raise FileNotFoundError(f"No tokenizer.json in {path!r} (expected {tokenizer_file!r}).")
    backend = tokenizers.Tokenizer.from_file(tokenizer_file)
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(path, "special_tokens_map.json"))

    def token_id(name: str) -> int | None:
      token = _token_content(config.get(name, special_map.get(name)))
      return None if token is None else backend.token_to_id(token)

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    pad_id, unk_id = token_id("pad_token"), token_id("unk_token")

    template = _read_chat_template(path, config)
    generation = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
    extra = generation if isinstance(generation, list) else [generation]
    eos_ids = _stop_ids(backend, eos_id, template, [i for i in extra if isinstance(i, int)])

    add_bos = config.get("add_bos_token")
    if add_bos is None:  # Whatever tokenizer.json's post-processor does.
      add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    return cls(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id, unk_id=unk_id,
               chat_template=template, add_bos=bool(add_bos))


# -----------------------------------------------------------------------------------------
# GGUF vocabularies -> tokenizers backends.


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable-character table that byte-level vocabularies are spelled in."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def _split_merges(merges: Iterable[str]) -> list[tuple[str, str]]:
  return [tuple(m.split(" ", 1)) for m in merges]  # type: ignore[misc]


def _byte_level_bpe(tokens: list[str], merges: list[str] | None,
                    pre: str | None) -> tuple[tokenizers.Tokenizer, set[str]]:
  """A byte-level BPE like transformers' GPT2Tokenizer; returns it and the byte alphabet."""
  if not merges:
    raise ValueError("GGUF byte-level ('gpt2') tokenizer has no 'tokenizer.ggml.merges'.")
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  # Tokens spelled outside the byte alphabet (some converters store raw text) are respelled.
  vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
           for i, t in enumerate(tokens)}
  backend = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=_split_merges(merges), dropout=None, continuing_subword_prefix="",
      end_of_word_suffix="", fuse_unk=False))
  split = GGUF_PRE_TOKENIZER_SPLITS.get(pre or "")
  if split is None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  return backend, alphabet


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
  """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
  best score first (transformers' `generate_merges`)."""
  vocab = {t: i for i, t in enumerate(tokens)}
  found = []
  for token, score in zip(tokens, scores):
    local = [(token[:k], token[k:], score) for k in range(1, len(token))
             if token[:k] in vocab and token[k:] in vocab]
    local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
    found.extend(local)
  found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(a, b) for a, b, _ in found]


def _sentencepiece_bpe(tokens: list[str], merges: list[str] | None,
                       scores: list[float] | None, arch: str | None) -> tokenizers.Tokenizer:
  """A byte-fallback BPE like transformers' LlamaTokenizer (legacy=False) for a GGUF file.

  Like transformers, this ignores `tokenizer.ggml.add_space_prefix`: a space is prepended to
  the first word of every text.
  """
  vocab = {t: i for i, t in enumerate(tokens)}
  if merges:
    pairs = _split_merges(merges)
  elif scores:
    pairs = merges_from_scores(tokens, scores)
  else:
    raise ValueError("GGUF sentencepiece ('llama') tokenizer has neither merges nor scores.")
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True,
                                            byte_fallback=True, dropout=None))
  if arch == "phi3":  # Phi-3 prepends the space with a normalizer, not Metaspace.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
  else:
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=False)
  backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                       decoders.Fuse(), decoders.Strip(content=" ", left=1)])
  return backend


def _stop_ids(backend: tokenizers.Tokenizer, eos_id: int | None, template: str | None,
              extra: Iterable[int] = ()) -> tuple[int, ...]:
  """EOS, the end-of-turn tokens the chat template writes, then `extra`; no repeats."""
  ids = [] if eos_id is None else [eos_id]
  for token in END_OF_TURN_TOKENS:
    token_id = backend.token_to_id(token)
    if template and token in template and token_id is not None:
      ids.append(token_id)
  ids.extend(extra)
  return tuple(dict.fromkeys(ids))


# -----------------------------------------------------------------------------------------
# Hugging Face folders.


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  return data if isinstance(data, dict) else {}


def _token_content(token: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
  if isinstance(token, Mapping):
    token = token.get("content")
  return token if isinstance(token, str) else None


def _pick_template(template: Any) -> str | None:
  """A template string, or the 'default' one of a list of {'name', 'template'} entries."""
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    template = named.get("default", next(iter(named.values()), None))
  return template if isinstance(template, str) else None


def _read_chat_template(path: str, config: Mapping[str, Any]) -> str | None:
  jinja_file = os.path.join(path, "chat_template.jinja")
  if os.path.isfile(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      return f.read()
  template = _pick_template(config.get("chat_template"))
  if template is None:
    template = _pick_template(_read_json(os.path.join(path, "chat_template.json"))
                              .get("chat_template"))
  return template


# -----------------------------------------------------------------------------------------
# Chat templates: a jinja2 sandbox configured like transformers' `_compile_jinja_template`.


@functools.lru_cache(maxsize=16)
def _compile_template(template: str) -> Any:
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext, nodes  # pylint: disable=g-import-not-at-top
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  def raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(template)


__all__ = ["END_OF_TURN_TOKENS", "GGUF_PRE_TOKENIZER_SPLITS", "Tokenizer", "bytes_to_unicode",
           "merges_from_scores"]
