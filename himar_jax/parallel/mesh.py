"""Device mesh from config: axes (data, fsdp, tensor), -1 fills the rest, multi-host aware."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 in `shape` so that the product equals `num_devices`; validates the rest."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(
        f"config.mesh.shape={shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}; "
        "set e.g. --config.mesh.shape='(-1,1,1)' for pure data parallelism.")
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f"config.mesh.shape={shape} has more than one -1; at most one axis may be inferred.")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh.shape={shape} has a size that is 0 or below -1; use positive sizes or -1.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f"config.mesh.shape={shape}: {num_devices} devices are not divisible by the fixed axes' product "
          f"{known}; choose sizes whose product divides {num_devices}.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
        f"config.mesh.shape={shape} uses {int(np.prod(shape))} devices but {num_devices} are present; "
        "use -1 on one axis to fill the rest.")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh over `devices` (default: all devices of all hosts) with Auto axis types.

  Auto axes let XLA's sharding propagation place intermediates, with parameters and batches pinned by explicit
  in/out shardings; `jax.make_mesh` picks a device order that keeps the inner axes (fsdp, tensor) on fast links
  (within a host / slice) when it can.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def mesh_from_config(config) -> Mesh:
  return make_mesh(tuple(config.mesh.shape))
