"""Logical axis rules and meshes: the one table that maps model axes to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded parameters and
optimizer state), `tensor` (tensor/model parallel over heads, mlp and vocab).
Flax assigns each logical axis the first listed mesh axis not already used by another dim of
the same array, so activations [batch, length, embed] take `fsdp` for batch and leave embed
replicated, while a parameter [embed, mlp] shards embed over `fsdp`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, object], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv", None),  # K is 1 for StarCoder: the shared kv head stays replicated
  ("head_dim", None),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("layers", None),
)


def parse_mesh_spec(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  """'fsdp=4,tensor=2' -> {'data': 1, 'fsdp': 4, 'tensor': 2}; one axis may be -1 (the rest).

  The default puts every device on `fsdp`. Raises ValueError with a one-line reason.
  """
  if spec is None or spec == "":
    sizes = {"fsdp": -1}
  elif isinstance(spec, str):
    sizes = {}
    for part in spec.split(","):
      name, eq, val = part.partition("=")
      name = name.strip()
      if not eq or name not in MESH_AXES:
        raise ValueError(f"bad mesh entry {part!r}: expected AXIS=SIZE with AXIS in {MESH_AXES}")
      try:
        sizes[name] = int(val)
      except ValueError:
        raise ValueError(f"bad mesh entry {part!r}: size {val!r} is not an integer") from None
  else:
    sizes = dict(spec)
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axis {unknown[0]!r}; axes are {MESH_AXES}")
  free = [a for a, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError("at most one mesh axis may be -1")
  for a, v in sizes.items():
    if v == 0 or v < -1:
      raise ValueError(f"mesh axis {a}={v} must be positive (or -1 for the rest)")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {spec!r} does not divide {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  full = {a: sizes.get(a, 1) for a in MESH_AXES}
  if math.prod(full.values()) != num_devices:
    raise ValueError(
      f"mesh {','.join(f'{a}={v}' for a, v in full.items())} has "
      f"{math.prod(full.values())} devices, "
      f"but there are {num_devices}"
    )
  return full


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:  # topology-aware assignment on real TPU slices
    from jax.experimental import mesh_utils

    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001  (CPU devices, abstract topologies without coordinates)
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """A tree of logical PartitionSpecs (or boxed params) -> NamedShardings on `mesh`."""
  specs = nn.get_partition_spec(logical_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=LOGICAL_RULES) -> NamedSharding:
  """Sharding for a [batch, length, ...] input array."""
  axes = ("batch",) + (None,) * (ndim - 1)
  return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules))
