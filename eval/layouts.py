"""Per-device memory of large targets under specjax's sharding rules, without allocating.

  python -m specjax.evaluation.layouts          # the README's table

For each layout: the target's bfloat16 params (`jax.eval_shape` of its init) and a KV
cache of `batch` sequences x `context` slots, laid out by `sharding.Plan` on an abstract
mesh of 256 devices (`jax.sharding.AbstractMesh`: no devices needed), and the bytes of the
most loaded device, against the HBM of one TPU v5e (16 GiB) and v6e (32 GiB) chip.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from specjax import models, sharding
from specjax.models import ModelConfig

# Architecture facts from the models' published config.json files.
CONFIGS = {
    "llama2-7b": ModelConfig("llama", vocab_size=32000, hidden_size=4096,
                             intermediate_size=11008, num_layers=32, num_heads=32,
                             num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
    "llama3-70b": ModelConfig("llama", vocab_size=128256, hidden_size=8192,
                              intermediate_size=28672, num_layers=80, num_heads=64,
                              num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                              max_position_embeddings=8192),
}
# (model, mesh over 256 devices, batch, context): the 70B's 8 KV heads split over
# tensor=8, the 7B's weights over fsdp x tensor = 16.
LAYOUTS = (
    ("llama2-7b", "data=16,fsdp=4,tensor=4", 256, 4096),
    ("llama3-70b", "data=8,fsdp=4,tensor=8", 256, 4096),
)
HBM = {"TPU v5e": 16 * 2**30, "TPU v6e": 32 * 2**30}


def abstract_plan(mesh: str) -> sharding.Plan:
  pairs = sharding.parse_mesh(mesh)
  return sharding.Plan.create(jax.sharding.AbstractMesh(tuple(s for _, s in pairs),
                                                        tuple(n for n, _ in pairs)))


def layout(model: str, mesh: str, batch: int, context: int, dtype=jnp.bfloat16) -> dict:
  """One row: per-device and total bytes of params and cache for `model` on `mesh`."""
  cfg = CONFIGS[model]
  plan = abstract_plan(mesh)
  params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), dtype))
  cache = jax.eval_shape(lambda: models.KVCache.for_config(cfg, batch, context, dtype))
  total = lambda tree: sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                           for x in jax.tree.leaves(tree))
  return {"model": model, "mesh": mesh, "devices": math.prod(plan.mesh.shape.values()),
          "batch": batch, "context": context,
          "total_param_bytes": total(params), "total_cache_bytes": total(cache),
          "param_bytes": sharding.per_device_bytes(params, plan.param_shardings(params)),
          "cache_bytes": sharding.per_device_bytes(cache, plan.cache_shardings(cache))}


def table() -> list[dict]:
  return [layout(*row) for row in LAYOUTS]


def markdown(rows: list[dict]) -> str:
  gib = lambda b: f"{b / 2**30:.2f}"
  out = ["| model | mesh (256 devices) | batch x context | params / device (GiB) | "
         "KV cache / device (GiB) | total / device (GiB) | "
         + " | ".join(f"fits {k} ({v // 2**30} GiB)" for k, v in HBM.items()) + " |",
         "|---|---|---|---|---|---|" + "---|" * len(HBM)]
  for r in rows:
    per = r["param_bytes"] + r["cache_bytes"]
    fits = " | ".join("yes" if per < hbm else "no" for hbm in HBM.values())
    out.append(f"| {r['model']} ({gib(r['total_param_bytes'])} GiB bf16) | {r['mesh']} | "
               f"{r['batch']} x {r['context']} | {gib(r['param_bytes'])} | "
               f"{gib(r['cache_bytes'])} | {gib(per)} | {fits} |")
  return "\n".join(out)


if __name__ == "__main__":
  print(markdown(table()))
