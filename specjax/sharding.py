"""Meshes, logical axis rules and shardings: how specjax runs on JAX's SPMD engine.

Every array that matters gets a PartitionSpec from two tables:

  `PARAM_AXES`  a parameter's path -> its logical axes ("vocab", "embed", "heads", ...),
                the same for targets, draft heads and their optimizer states (Adam's
                moments sit under the same path suffixes as the params they follow);
  `rules`       logical axis -> mesh axes (`DEFAULT_RULES`, or a config's `sharding_rules`),
                resolved by `flax.linen.logical_to_mesh_axes`.

The KV cache is [B, KVH, S, Dh] per layer: batch over the batch axes, KV heads over
"tensor" where they divide (GQA targets with fewer KV heads than tensor shards keep them
whole), slots and head dims unsharded. Token batches are [B, ...] over the batch axes.

A `Plan` (mesh + rules) is what the rest of specjax takes: `models.load(..., plan=)` places
each weight on its shards as it is read, `decode.generate(..., plan=)` runs the whole
draft-verify loop as one jitted program over the mesh, and `specjax-train` builds its state
by shape and shards it at creation. A mesh that does not match the devices, or a rule that
would split a dimension unevenly, is an error here, before anything compiles.

Multi-host: `initialize(distributed)` starts `jax.distributed` from a config or from the
environment; each process then feeds its own rows (`Plan.global_batch`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# The mesh axes specjax names (a config may use any subset, in any order).
AXES = ("data", "fsdp", "tensor", "expert")
# Logical axis -> mesh axes. Batches split over data and fsdp; parameters shard their
# model dimension over fsdp (all-gathered per layer) and heads / MLP / vocabulary over
# tensor (Megatron-style column-then-row splits, one all-reduce per block).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),
)
# (regex on a parameter's path, its logical axes). The first match whose rank fits wins;
# anything unmatched (norm scales, fusion layers, small head weights) is replicated.
PARAM_AXES = (
    (r"(embed_tokens|wte)/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"q_proj/kernel$", ("embed", "heads")),
    (r"[kv]_proj/kernel$", ("embed", "kv_heads")),
    (r"q_proj/bias$", ("heads",)),
    (r"[kv]_proj/bias$", ("kv_heads",)),
    (r"(o_proj|attn/c_proj)/kernel$", ("heads", "embed")),
    (r"(gate_proj|up_proj|c_fc)/kernel$", ("embed", "mlp")),
    (r"(gate_proj|up_proj|c_fc)/bias$", ("mlp",)),
    (r"(down_proj|mlp_c_proj)/kernel$", ("mlp", "embed")),
    (r"c_attn/kernel$", ("embed", None)),
    (r"mlp/(gate|up)$", ("experts", "embed", "mlp")),  # stacked experts [E, H, I]
    (r"mlp/down$", ("experts", "mlp", "embed")),
)


class ShardingError(ValueError):
  """A mesh or rule that does not fit the devices or the shapes (raised before compiling)."""


def parse_mesh(spec: str | Mapping[str, int] | Sequence[tuple[str, int]]
               ) -> tuple[tuple[str, int], ...]:
  """Mesh axes from "data=2,tensor=4", a mapping, or (name, size) pairs; one size may be -1
  (whatever the devices leave)."""
  if isinstance(spec, str):
    pairs = []
    for item in filter(None, spec.replace(" ", "").split(",")):
      name, sep, size = item.partition("=")
      if not sep:
        raise ShardingError(f"Bad mesh axis {item!r} in {spec!r}; expected name=size, e.g. "
                            "'data=2,tensor=4'.")
      try:
        pairs.append((name, int(size)))
      except ValueError:
        raise ShardingError(f"Mesh axis {name!r} has size {size!r}, not an integer.") from None
  else:
    pairs = list(spec.items()) if isinstance(spec, Mapping) else [tuple(p) for p in spec]
  names = [n for n, _ in pairs]
  unknown = sorted(set(names) - set(AXES))
  if unknown or len(set(names)) != len(names) or not pairs:
    raise ShardingError(f"Mesh axes {names} must be distinct names from {AXES} (got unknown "
                        f"{unknown}).")
  if sum(int(s) == -1 for _, s in pairs) > 1 or any(int(s) < 1 and int(s) != -1
                                                       for _, s in pairs):
    raise ShardingError(f"Mesh sizes must be positive, with at most one -1; got {pairs}.")
  return tuple((n, int(s)) for n, s in pairs)


def make_mesh(spec, devices: Sequence[Any] | None = None) -> Mesh:
  """A `jax.make_mesh` over all devices (every process's) with the named axes of `spec`."""
  pairs = parse_mesh(spec)
  devices = list(jax.devices() if devices is None else devices)
  known = math.prod(s for _, s in pairs if s != -1)
  sizes = [s if s != -1 else len(devices) // known for _, s in pairs]
  if math.prod(sizes) != len(devices) or 0 in sizes:
    raise ShardingError(
        f"Mesh {dict(pairs)} needs {math.prod(sizes) if 0 not in sizes else known} devices; "
        f"there are {len(devices)} ({devices[0].platform}, {jax.process_count()} process(es)). "
        "Make the sizes multiply to the device count, or give one axis -1.")
  names = tuple(n for n, _ in pairs)
  # Auto axes: XLA's SPMD partitioner propagates shardings from the declared ones.
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def param_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """The logical axes of the parameter at `path` ("layers_0/self_attn/q_proj/kernel").
  A quantized kernel's codes (`kernel/q`, `models.quant`) take the kernel's axes and its
  scales (`kernel/scale`, [in / group, out]) its output axis."""
  if re.search(r"kernel/(q|scale)$", path):
    axes = param_axes(path.rsplit("/", 1)[0], ndim)
    return axes if path.endswith("/q") else (None,) + axes[1:]
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, path) and len(axes) == ndim:
      return axes
  return (None,) * ndim


@dataclasses.dataclass(frozen=True)
class Plan:
  """A mesh and the logical rules over it: every sharding specjax uses comes from here.
  Hashable, so a jitted function can take it as a static argument."""

  mesh: Mesh
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
  # How mixture-of-experts layers run over the mesh: None, the dense form (every expert on
  # every token, the expert axis sharded); `models.moe_parallel.Routed(...)`, tokens
  # dispatched to their experts' devices by all-to-all.
  moe: Any = None

  @classmethod
  def create(cls, mesh, rules=None, moe=None) -> "Plan":
    """From a Mesh (or a mesh spec, see `parse_mesh`), rules (None: `DEFAULT_RULES`) and
    the MoE form (None: dense; `models.moe_parallel.Routed`)."""
    mesh = mesh if isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)) else make_mesh(mesh)
    rules = DEFAULT_RULES if not rules else tuple(
        (str(k), tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in rules)
    known = set(mesh.axis_names)
    for logical, axes in rules:
      for a in (axes if isinstance(axes, tuple) else (axes,)):
        if a is not None and a not in known and a not in AXES:
          raise ShardingError(f"Rule {logical!r} -> {axes!r} names mesh axis {a!r}; the "
                              f"axes are {AXES}.")
    return cls(mesh, rules, moe)

  @property
  def name(self) -> str:
    """The mesh as a spec string, "data=2,tensor=4"."""
    return ",".join(f"{k}={v}" for k, v in self.mesh.shape.items())

  def _rules(self):
    """The rules restricted to this mesh's axes (a rule may name an axis it lacks)."""
    names = set(self.mesh.axis_names)
    keep = lambda axes: (tuple(a for a in axes if a in names) or None
                         if isinstance(axes, tuple) else (axes if axes in names else None))
    return tuple((k, keep(v)) for k, v in self.rules)

  def axis_size(self, axes) -> int:
    if axes is None:
      return 1
    return math.prod(self.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))

  def spec(self, logical: Sequence[str | None]) -> P:
    return nn.logical_to_mesh_axes(tuple(logical), self._rules())

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  @property
  def batch_size_multiple(self) -> int:
    """Batches must split evenly over the batch axes: their size is a multiple of this."""
    return self.axis_size(self.spec(("batch",))[0])

  def checked_spec(self, what: str, shape: Sequence[int], logical, *,
                   uneven: str = "error") -> P:
    """The spec of `logical` for `shape`; a dimension its mesh axes do not divide is an
    error (uneven="error") or left whole (uneven="replicate")."""
    spec = list(self.spec(logical)) + [None] * (len(shape) - len(logical))
    for i, (dim, axes) in enumerate(zip(shape, spec)):
      n = self.axis_size(axes)
      if dim % n:
        if uneven == "replicate":
          spec[i] = None
          continue
        raise ShardingError(
            f"{what} has shape {tuple(shape)}: dimension {i} ({logical[i]!r}, size {dim}) "
            f"does not split over mesh axes {axes!r} of size {n} (mesh {dict(self.mesh.shape)}"
            "). Change the mesh, or map that logical axis to another mesh axis (or None) in "
            "the sharding rules.")
    return P(*spec)

  # ---- pytrees -------------------------------------------------------------------------

  def param_shardings(self, tree: Any) -> Any:
    """NamedShardings for a params-like pytree (target or head params, optimizer or train
    state, a drafter): by `PARAM_AXES` on each leaf's path; scalars replicate."""
    def one(path, leaf):
      shape = np.shape(leaf)
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      return self.sharding(self.checked_spec(f"Parameter {name!r}", shape,
                                             param_axes(name, len(shape))))
    return jax.tree_util.tree_map_with_path(one, tree)

  def cache_shardings(self, cache: Any) -> Any:
    """The KV cache's shardings: [B, KVH, S, Dh] per layer, lengths [B]."""
    def one(leaf):
      shape = np.shape(leaf)
      if len(shape) == 4:
        batch = self.checked_spec("The KV cache", shape, ("batch",))
        heads = self.checked_spec("The KV cache", shape, (None, "kv_heads"), uneven="replicate")
        return self.sharding(P(batch[0], heads[1], None, None))
      return self.sharding(self.checked_spec("The KV cache lengths", shape, ("batch",)))
    return jax.tree.map(one, cache)

  def batch_sharding(self, shape: Sequence[int], what: str = "The batch") -> NamedSharding:
    """[B, ...] split over the batch axes."""
    return self.sharding(self.checked_spec(what, shape, ("batch",)))

  def replicated(self) -> NamedSharding:
    return self.sharding(P())

  def global_batch(self, local: np.ndarray) -> jax.Array:
    """A global [B, ...] array from this process's rows (its share of B, in process order):
    `jax.make_array_from_process_local_data`, so each host feeds only its own data."""
    local = np.asarray(local)
    shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    return jax.make_array_from_process_local_data(self.batch_sharding(shape), local, shape)

  def local_rows(self, global_rows: int) -> slice:
    """The rows of a global batch this process feeds (`global_batch` order)."""
    n = global_rows // jax.process_count()
    if n * jax.process_count() != global_rows:
      raise ShardingError(f"A batch of {global_rows} rows does not split over "
                          f"{jax.process_count()} processes.")
    return slice(jax.process_index() * n, (jax.process_index() + 1) * n)


_ACTIVE: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("plan", default=None)


@contextlib.contextmanager
def use(plan: Plan | None):
  """Makes `plan` the one `active()` returns while a sharded program traces (kernels read
  it to run per device under `jax.shard_map`)."""
  token = _ACTIVE.set(plan)
  try:
    yield plan
  finally:
    _ACTIVE.reset(token)


def active() -> Plan | None:
  return _ACTIVE.get()


def constrain(tree: Any, shardings: Any) -> Any:
  """`jax.lax.with_sharding_constraint` inside a jitted program (None: unchanged)."""
  return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes of `tree` (arrays or ShapeDtypeStructs) on its most loaded device."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    total += math.prod(s.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def from_config(c: Any) -> Plan | None:
  """The Plan of a config's `mesh` ("data=-1,tensor=2"; "" or absent = no sharding) and
  `sharding_rules` (pairs; empty = `DEFAULT_RULES`)."""
  spec = c.get("mesh", "") if hasattr(c, "get") else getattr(c, "mesh", "")
  if not spec:
    return None
  rules = c.get("sharding_rules", ()) if hasattr(c, "get") else ()
  return Plan.create(spec, rules or None)


def initialize(distributed: Any = None) -> bool:
  """Starts `jax.distributed` (before any other JAX call) when asked: from a config's
  `distributed` block (coordinator "host:port", num_processes, process_id), or from the
  environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; on Cloud TPU,
  SLURM or Open MPI `auto=True` lets JAX find them). Returns whether it started.

  Every process then sees all processes' devices (on CPU they talk over gloo).
  """
  d = dict(distributed or {})
  env = os.environ
  coordinator = d.get("coordinator") or env.get("JAX_COORDINATOR_ADDRESS", "")
  if not coordinator and not d.get("auto"):
    return False
  if jax.distributed.is_initialized():
    return True
  num = int(d.get("num_processes") or env.get("JAX_NUM_PROCESSES", 0)) or None
  pid = d.get("process_id", -1)
  pid = int(pid if pid is not None and int(pid) >= 0 else env.get("JAX_PROCESS_ID", -1))
  if coordinator and (num is None or pid < 0):
    raise ShardingError(f"jax.distributed with coordinator {coordinator!r} needs "
                        "num_processes and process_id (config distributed.* or "
                        "JAX_NUM_PROCESSES / JAX_PROCESS_ID).")
  jax.distributed.initialize(coordinator_address=coordinator or None, num_processes=num,
                             process_id=None if pid < 0 else pid)
  return True
