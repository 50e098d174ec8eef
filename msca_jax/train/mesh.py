"""The device mesh, the logical-axis rules that map the model onto it, and global batches.

Mesh axes (config.mesh.shape; one size may be -1, "the rest of the devices"):
  data   pure data parallelism: the batch is split, weights are replicated;
  fsdp   the batch is split and the weights' `embed` dimension too (ZeRO-3 style);
  model  tensor parallelism: attention heads and MLP hidden units are split.
The model names its dimensions (models.LOGICAL_AXES); config.mesh.rules says which mesh axes
each name is split over, MaxText style.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Defined without JAX so that configs load without it; part of this module's API too.
from msca_jax.defaults import DEFAULT_RULES, mesh_config  # noqa: F401

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(shape_cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes for MESH_AXES with a -1 resolved; errors name config.mesh.shape."""
  sizes = [int(shape_cfg[axis]) for axis in MESH_AXES]
  unknown = [axis for axis, size in zip(MESH_AXES, sizes) if size == -1]
  if len(unknown) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f"config.mesh.shape: sizes must be positive, with at most one -1; got "
                     f"{dict(zip(MESH_AXES, sizes))}")
  known = math.prod(size for size in sizes if size != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f"config.mesh.shape: {num_devices} devices cannot be split into "
                       f"{dict(zip(MESH_AXES, sizes))}")
    sizes[MESH_AXES.index(unknown[0])] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh.shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices; there are {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg.shape, len(devices))
  # Auto axes: shardings propagate from the annotated inputs and the logical constraints.
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  except NotImplementedError as e:  # a TPU torus whose sides the axis sizes do not tile
    first = str(e).split(". ")[0]
    raise ValueError(f"config.mesh.shape {dict(zip(MESH_AXES, shape))} does not fit the "
                     f"{len(devices)} devices' physical mesh: each axis must be a product of some "
                     f"of its sides ({first})") from None


def rules(mesh_cfg) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  out = []
  for rule in mesh_cfg.rules:
    name, axes = rule
    for axis in (axes if isinstance(axes, (tuple, list)) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"config.mesh.rules: {name!r} maps to unknown mesh axis {axis!r}; "
                         f"mesh axes are {MESH_AXES}")
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)


def tree_shardings(abstract_boxed, mesh: Mesh, logical_rules) -> object:
  """NamedShardings for a tree of nn.LogicallyPartitioned (or plain, replicated) leaves."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension over data and fsdp; the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's numpy batch -> global jax.Arrays sharded over the batch axes.

  Each process passes its own slice (its share of the global batch, in process order); the
  global batch is the concatenation over processes.
  """
  return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), value)
          for name, value in local.items()}


def process_rows(mesh: Mesh, global_batch_size: int) -> np.ndarray:
  """(process_count, local batch): the global batch row of each process's local rows.

  `global_batch` places a process's rows where its devices sit on the batch axes, in index order;
  host-side fields gathered from the processes are put in the same order with this.
  """
  index_map = batch_sharding(mesh).devices_indices_map((global_batch_size,))
  rows: dict[int, set[int]] = {}
  for device, (index,) in index_map.items():
    rows.setdefault(device.process_index, set()).update(range(*index.indices(global_batch_size)))
  return np.array([sorted(rows[p]) for p in sorted(rows)], np.int64)


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "config.train.batch_size") -> None:
  shards = batch_shards(mesh)
  if global_batch_size % shards or global_batch_size % jax.process_count():
    raise ValueError(f"{field} = {global_batch_size} must be divisible by the {shards} batch shards "
                     f"(mesh data x fsdp) and the {jax.process_count()} processes")
