"""Test-only sweep: a tiny random Llama ("random:tiny", byte-level prompt encoding).

`configs/tiny.py:PATH` reads prompts from a local .json/.jsonl file instead of MT-Bench.
Finishes in well under a minute, most of it compiling.
"""

import importlib.util
import os

# Config files are loaded by path, not as a package: load the shared pieces the same way.
_spec = importlib.util.spec_from_file_location(
    "specjax_configs_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg: str | None = None):
  c = common.base()
  c.target = "random:tiny"
  c.methods = [common.method("ar"),
               common.method("prompt_lookup", drafter="prompt_lookup", num_draft=4)]
  c.datasets = (arg,) if arg else ("mt_bench",)
  c.num_prompts = 2
  c.max_new_tokens = 8
  c.pad_to = 1024  # one compiled shape per method: cheap on a tiny model, compiles are not
  c.progress = False
  return c
