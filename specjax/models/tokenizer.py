"""Tokenizers: a thin adapter over Hugging Face transformers' `PreTrainedTokenizerFast`.

transformers builds the tokenizer (vocabulary, merges, split regex, special tokens) and
renders chat templates; this adapter adds only what specjax needs on top: the stop ids of a
chat model (EOS plus the end-of-turn tokens its template writes) and `encode_chat`.

* `Tokenizer.from_gguf(path_or_reader)`: the tokenizer a GGUF file stores in its metadata,
  converted by transformers' own GGUF converter fed from the `gguf.GGUFReader` the model
  loader already opened (transformers' GGUF metadata reader imports torch; this does not).
* `Tokenizer.from_hf_dir(folder)`: `AutoTokenizer` on a local folder (never the hub),
  plus `generation_config.json`'s extra EOS ids.

Both give the ids transformers gives for the same files (tested).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# End-of-turn tokens of common chat formats. Each becomes a stop id when it is in the vocabulary
# and the chat template writes it (ChatML, Llama 3, Phi-3, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
  """Text <-> token ids and chat rendering for one model.

  Attributes:
    hf: the wrapped transformers tokenizer.
    vocab_size: the vocabulary size (added tokens included).
    eos_ids: the ids that end a generation: the EOS id, then the end-of-turn tokens the chat
      template writes (e.g. `<|im_end|>`), then any listed by `generation_config.json`.
  """

  def __init__(self, hf: Any, extra_eos_ids: Iterable[int] = ()):
    self.hf = hf
    self.vocab_size = len(hf)
    ids = [] if hf.eos_token_id is None else [hf.eos_token_id]
    template = str(hf.chat_template or "")  # a string, or a dict of named templates
    for token in END_OF_TURN_TOKENS:
      token_id = hf.convert_tokens_to_ids(token) if token in hf.get_vocab() else None
      if token in template and token_id is not None:
        ids.append(token_id)
    self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in [*ids, *extra_eos_ids]))

  @property
  def bos_id(self) -> int | None:
    return self.hf.bos_token_id

  @property
  def chat_template(self) -> str | None:
    """The template string (the "default" one when the model names several)."""
    template = self.hf.chat_template
    return template.get("default") if isinstance(template, dict) else template

  @property
  def add_bos(self) -> bool:
    """Whether plain `encode` starts with BOS (the tokenizer's post-processor)."""
    return self.bos_id is not None and self.hf.encode("x")[:1] == [self.bos_id]

  def token_to_id(self, token: str) -> int | None:
    return self.hf.get_vocab().get(token)

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; special tokens written in it (e.g. `<|im_start|>`) stay whole.

    add_bos: None applies the tokenizer's own special-token rule (as transformers'
    `encode`); True / False prepend BOS or not, adding nothing else.
    """
    if add_bos is None:
      return list(self.hf.encode(text))
    ids = list(self.hf.encode(text, add_special_tokens=False))
    return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    """The text of `ids` (a list, or a numpy/jax array)."""
    if hasattr(ids, "tolist"):
      ids = ids.tolist()
    ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
    return self.hf.decode(ids, skip_special_tokens=skip_special)

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """The conversation rendered by the model's chat template (transformers renders it).

    Raises ValueError when the tokenizer has no chat template.
    """
    if not self.chat_template:
      raise ValueError("This tokenizer has no chat template; pass plain text or token ids.")
    return self.hf.apply_chat_template(list(messages), tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **kwargs)

  def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                  add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
    """Token ids of the rendered conversation. BOS is prepended only when the tokenizer adds
    one by default and the template did not already write it (as llama.cpp does)."""
    text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
    bos = self.hf.bos_token
    return self.encode(text, add_bos=self.add_bos and not (bos and text.startswith(bos)))

  def __len__(self) -> int:
    return self.vocab_size

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, chat_template={'yes' if self.chat_template else 'no'})")

  @classmethod
  def from_gguf(cls, path_or_reader: str | os.PathLike | Any) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata.

    Args:
      path_or_reader: a `.gguf` path, or an open `gguf.GGUFReader` (reading one parses every
        string in the file, seconds for a large vocabulary, so pass the model loader's).

    Raises:
      FileNotFoundError: no file at the path.
      ValueError: the file has no tokenizer, or one transformers cannot build.
    """
    from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
    from transformers.integrations.gguf import gguf_tokenizer_mapping as conv  # pylint: disable=g-import-not-at-top

    if isinstance(path_or_reader, (str, os.PathLike)):
      path = os.fspath(path_or_reader)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"No GGUF file at {path!r}.")
      from specjax.models.loading import open_gguf  # pylint: disable=g-import-not-at-top
      reader = open_gguf(path)
    else:
      reader = path_or_reader
      path = str(getattr(getattr(reader, "data", None), "filename", None) or "<GGUFReader>")
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.model" not in meta or not meta.get("tokenizer.ggml.tokens"):
      raise ValueError(f"GGUF file {path!r} stores no tokenizer (no 'tokenizer.ggml.model' "
                       "or no tokens).")
    # The metadata, named as transformers' converter expects (its own key table).
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in meta}
               for group, renames in conv.GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, config = grouped["tokenizer"], grouped["tokenizer_config"]
    tokens = tok_dict["tokens"]
    if tok_dict.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece
      config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
      i = meta.get(f"tokenizer.ggml.{key}")
      config[name] = tokens[i] if i is not None and 0 <= int(i) < len(tokens) else None
    arch = reader.fields["general.architecture"].contents()
    try:
      backend, extra = conv.convert_gguf_tokenizer(arch, tok_dict)
    except ValueError as e:
      raise ValueError(f"GGUF file {path!r}: {e}") from e
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
    return cls(hf)

  @classmethod
  def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a local Hugging Face folder (`tokenizer.json` + its config files),
    with the extra stop ids of `generation_config.json`.

    Raises:
      FileNotFoundError: no such folder, or no `tokenizer.json` in it.
    """
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"No tokenizer folder at {path!r}.")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
      raise FileNotFoundError(f"No tokenizer.json in {path!r}.")
    hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    extra = []
    generation = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation):
      with open(generation, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
      extra = [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
    return cls(hf, extra)
