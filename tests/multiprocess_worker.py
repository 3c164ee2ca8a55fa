"""One process of `test_sharding.test_two_processes_train_and_decode` (not a test module).

  python multiprocess_worker.py WORKDIR MESH HEAD_DIR

with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set: joins the run
through `sharding.initialize`, trains the tiny EAGLE config on MESH (its share of each
batch), then decodes this process's own prompts with the head at HEAD_DIR and prints one
JSON line: {"process", "devices", "prompts", "tokens"}.
"""

import json
import os
import sys

from specjax import sharding

sharding.initialize()  # from the environment, before anything else touches JAX

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from specjax import decode, models  # pylint: disable=g-import-not-at-top,wrong-import-position
from specjax.drafters import load_drafter  # pylint: disable=g-import-not-at-top,wrong-import-position
from specjax.training import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(__file__))
from test_sharding import TARGET, tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(workdir: str, mesh: str, head_dir: str) -> None:
  trainer.train(tiny_config(mesh), workdir)
  plan = sharding.Plan.create(mesh)
  target = models.load(TARGET, plan=plan)
  rng = np.random.default_rng(10 + jax.process_index())  # each process its own prompts
  prompts = [rng.integers(0, 512, n).tolist() for n in (3, 17)]
  out = decode.generate(target, prompts, max_new_tokens=12, eos=None,
                        drafter=load_drafter(head_dir, target), plan=plan)
  print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                    "prompts": prompts, "tokens": out.token_lists()}))


if __name__ == "__main__":
  main(*sys.argv[1:])
