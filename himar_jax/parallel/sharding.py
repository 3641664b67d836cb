"""The one table mapping logical axis names to mesh axes, and helpers that shard param trees and batches.

Logical names used by every model (annotate params with `nnx.with_partitioning(init, names)`):
  batch      leading batch dimension of activations and data
  embed      model width (residual stream)
  mlp        hidden width of MLPs and of adaLN projections
  heads      fused attention projections (q, k, v, out) along the heads*head_dim axis
  vocab      codebook / class / output-vocabulary dimension
  conv_in / conv_out   input / output channels of convolutions
  length     sequence / position dimension of position embeddings
  None       replicated (norm scales, biases, small tensors)
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Data parallelism spans data x fsdp (FSDP is data parallel with sharded state); tensor parallelism splits
# MLP hidden and attention heads. A logical name may map to several mesh axes; axes already used by an earlier
# dimension of the same array are skipped, and a dimension that does not divide evenly stays replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("length", None),
)


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh_spec(logical: Sequence[str | None] | P | None, shape: Sequence[int] | None, mesh: Mesh,
                         rules=LOGICAL_AXIS_RULES) -> P:
  """Maps one array's logical axis names to a mesh PartitionSpec (divisibility-checked when `shape` is given)."""
  if logical is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for dim, name in enumerate(tuple(logical)):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis name {name!r} has no rule in LOGICAL_AXIS_RULES; add one to "
                     "himar_jax/parallel/sharding.py.")
    axes = [a for a in _as_tuple(table[name]) if a not in used and mesh.shape.get(a, 1) > 1]
    if shape is not None:
      # Keep the longest prefix of mesh axes whose product divides the dimension.
      kept, size = [], 1
      for a in axes:
        if shape[dim] % (size * mesh.shape[a]) == 0:
          kept.append(a)
          size *= mesh.shape[a]
      axes = kept
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*out)


def _logical_names(leaf) -> tuple | None:
  if isinstance(leaf, nnx.Variable):
    return leaf.get_metadata().get("out_sharding") or leaf.get_metadata().get("sharding_names")
  return None


def state_shardings(state, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for an nnx.State (or any tree of Variables / arrays), from the params' logical names."""

  def one(leaf):
    names = _logical_names(leaf)
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    shape = getattr(value, "shape", None)
    spec = logical_to_mesh_spec(names, shape, mesh, rules) if names else P()
    sharding = NamedSharding(mesh, spec)
    return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(abstract_params, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> dict:
  """Pure dict (the layout of `nnx.to_pure_dict`) of NamedShardings for an nnx.State of params."""
  return nnx.to_pure_dict(state_shardings(abstract_params, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Global batches split their leading dimension over data x fsdp; other dimensions replicated."""
  return NamedSharding(mesh, logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1), None, mesh))


def use_mesh_for_tracing(mesh: Mesh | None):
  """Context under which a jitted function is traced for `mesh` (jax.sharding.use_abstract_mesh): constrain and
  per_shard below refer to it. A no-op context for None."""
  return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _partitioned_mesh():
  """The enclosing `jax.sharding.use_abstract_mesh` mesh when XLA partitions over it: None when none is set, it
  has one device, or the caller is inside a shard_map (every value there is already local)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 or mesh.manual_axes else mesh


def constrain(x, logical: Sequence[str | None] = ("batch",)):
  """x with its sharding pinned to the logical axes (remaining dimensions replicated) under the mesh of the
  enclosing `jax.sharding.use_abstract_mesh` (the train step sets it); unchanged when none is set or it has one
  device.

  Activations are pinned at block boundaries so that the SPMD partitioner keeps them batch-sharded under FSDP
  (and gathers the fsdp-sharded weights) instead of sharding the activations' embedding dimension like the
  weights' and all-reducing every matmul output over the fsdp axis.
  """
  mesh = _partitioned_mesh()
  if mesh is None:
    return x
  logical = tuple(logical) + (None,) * (x.ndim - len(logical))
  return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical, x.shape, mesh))


def per_shard(fn, *xs, logical: Sequence[str | None]):
  """fn(*xs) run on each device's shard (xs all sharded alike by the logical axes) through jax.shard_map under the
  mesh of the enclosing `jax.sharding.use_abstract_mesh`; a plain call when none is set, it has one device, or the
  caller is already inside a shard_map.

  For custom calls XLA's SPMD partitioner cannot split (our Pallas kernels): left to the partitioner, their operands
  are all-gathered and every device computes the whole global batch.
  """
  mesh = _partitioned_mesh()
  if mesh is None:
    return fn(*xs)
  spec = logical_to_mesh_spec(logical, xs[0].shape, mesh)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(xs), out_specs=spec)(*xs)


def mark_varying(tree, axes: Sequence[str]):
  """tree with every leaf typed as varying over the manual mesh `axes` (inside jax.shard_map). Marking replicated
  params once at the top of a per-device loss makes their gradients local sums that one explicit reduction
  averages, instead of a psum at every place a param meets per-device values."""
  axes = tuple(axes)
  if hasattr(jax.lax, "pcast"):  # jax >= 0.10; older versions spell it pvary
    return jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), tree)
  return jax.tree.map(lambda x: jax.lax.pvary(x, axes), tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh):
  """Assembles a global, batch-sharded jax.Array tree from this process's slice of the global batch.

  Each process passes its local rows (global_batch / process_count); on one host this is the whole batch.
  """
  shardings = jax.tree.map(lambda x: batch_sharding(mesh, x.ndim), batch)
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)  # one transfer call for the whole tree
  return jax.tree.map(jax.make_array_from_process_local_data, shardings, batch)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
