"""Test-only sweep on a tiny checkpoint folder the tests make (a random Llama with a
byte-level tokenizer): `configs/tiny.py:target=DIR,prompts=FILE.jsonl`.

Finishes in well under a minute, most of it compiling.
"""

from specjax.configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, target="smollm2-135m", prompts="mt_bench")
  c = common.base()
  c.target = a.target
  c.methods = [common.method("ar"),
               common.method("prompt_lookup", drafter="prompt_lookup", depth=4)]
  c.datasets = (a.prompts,)
  c.num_prompts = 2
  c.max_new_tokens = 8
  c.cache_bucket = 1024  # one compiled program per method: cheap on a tiny model, compiles are not
  c.progress = False
  return c
