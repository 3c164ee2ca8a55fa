"""Peers: Hugging Face transformers (PyTorch CPU) decoding the same target weights.

"hf_ar" is plain `generate`; "hf_prompt_lookup" is assisted generation with
`prompt_lookup_num_tokens=10`. Both get the sweep's prompt token ids, temperature and EOS
ids, so their rows compare like for like. A forward hook counts target calls, so tau is
known for both (the prefill forward yields the first token, as a specjax step does).
torch and transformers are imported only when a sweep asks for peers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, NamedTuple, Sequence

# peer -> prompt_lookup_num_tokens (None = plain autoregressive generate)
PEERS: dict[str, int | None] = {"hf_ar": None, "hf_prompt_lookup": 10}


class PeerOutput(NamedTuple):
  tokens: list[int]
  target_calls: int


def check_available() -> None:
  """ImportError naming what to install when torch or transformers is missing."""
  missing = [p for p in ("torch", "transformers") if importlib.util.find_spec(p) is None]
  if missing:
    raise ImportError(f"Peers need {' and '.join(missing)}; install them with "
                      "`pip install -e .[dev]` or drop `peers` from the config.")


@dataclasses.dataclass
class HFTarget:
  """A transformers model plus the count of its forward calls."""

  model: Any
  calls: int = 0

  def __call__(self, *unused) -> None:  # forward hook
    self.calls += 1


def load(path: str) -> HFTarget:
  """The target at `path` (a .gguf file or a HF folder) as a float32 transformers model."""
  check_available()
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

  if path.endswith(".gguf"):
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path) or ".", gguf_file=os.path.basename(path), dtype=torch.float32)
  else:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  hf = HFTarget(model.eval())
  model.register_forward_hook(hf)
  return hf


def generate(hf: HFTarget, peer: str, ids: Sequence[int], *, max_new_tokens: int,
             temperature: float, seed: int, eos_ids: Sequence[int]) -> PeerOutput:
  """Decodes one prompt; the output tokens include the EOS that stopped it, like specjax."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import GenerationConfig  # pylint: disable=g-import-not-at-top

  sample = temperature > 0
  config = GenerationConfig(
      max_new_tokens=max_new_tokens, do_sample=sample,
      temperature=temperature if sample else None, top_k=0 if sample else None,
      top_p=1.0 if sample else None, eos_token_id=list(eos_ids) or None,
      pad_token_id=eos_ids[0] if eos_ids else 0,
      prompt_lookup_num_tokens=PEERS[peer])
  torch.manual_seed(seed)
  hf.calls = 0
  with torch.inference_mode():
    out = hf.model.generate(torch.tensor([list(ids)]), generation_config=config,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
  return PeerOutput(out[0, len(ids):].tolist(), hf.calls)
