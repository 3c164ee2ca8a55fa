"""Test doubles: tiny random checkpoints in Hugging Face folder layout, with a byte-level
tokenizer and a ChatML template, so that every loader and the sweep run on real files."""

from __future__ import annotations

import os

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_byte_tokenizer(path: str) -> int:
  """A byte-level BPE without merges (256 byte tokens + 3 specials) with a ChatML template
  and <|im_end|> as EOS, saved by transformers. Returns the vocabulary size."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  backend = tokenizers.Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  hf = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=CHATML,
                               bos_token="<|im_start|>", eos_token="<|im_end|>",
                               pad_token="<|endoftext|>",
                               additional_special_tokens=list(SPECIALS))
  hf.save_pretrained(path)
  return len(hf)


def write_tiny_llama(path: str, *, seed: int = 0, layers: int = 2, tokenizer: bool = True,
                     **overrides) -> str:
  """A random Llama checkpoint folder (config.json + model.safetensors [+ tokenizer])."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  os.makedirs(path, exist_ok=True)
  vocab = write_byte_tokenizer(path) if tokenizer else 256
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**{
      "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
      "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
      "max_position_embeddings": 2048, "tie_word_embeddings": True, **overrides})
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  return path
