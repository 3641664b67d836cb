"""Pieces shared by the Pallas kernels (block-sparse attention on GPU and TPU, the fused dense layer)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from himar_jax.parallel.sharding import mark_varying

# Finite "minus infinity" for masked logits: exp(MASK - finite) underflows to 0 and MASK - MASK stays finite.
MASK_VALUE = -1e30
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def is_hopper() -> bool:
  """Compute capability 9.x on the default device (H100 / H200)."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  return jax.default_backend() == "gpu" and str(capability or "").split(".")[0] == "9"


def sm_count() -> int:
  """Streaming multiprocessors of the default GPU (132 on an H100 SXM when the device does not say)."""
  return int(getattr(jax.devices()[0], "core_count", None) or 132)


def dot(a, b, dims=NN):
  """Matrix product with float32 accumulation."""
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def row_mask(rows_start, rows_end, col0, block_k):
  """(rows, block_k) mask of keys col0 + [0, block_k) inside each row's [start, end); starts/ends are (rows, 1)."""
  cols = col0 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  return (cols >= rows_start) & (cols < rows_end)


def run_steps(step, lo, full_lo, full_hi, hi, carry):
  """A tile's steps: masked [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi); step(masked) is the
  (index, carry) -> carry body with or without the per-row masks."""
  carry = lax.fori_loop(lo, full_lo, step(True), carry)
  carry = lax.fori_loop(full_lo, full_hi, step(False), carry)
  return lax.fori_loop(full_hi, hi, step(True), carry)


def softmax_bwd_delta(out, do, l_pad: int):
  """delta_r = sum_d do * o (the softmax backward's row term), float32 (B, H, l_pad), zero on padding rows."""
  delta = jnp.einsum("blhd,blhd->bhl", do.astype(jnp.float32), out.astype(jnp.float32))
  return jnp.pad(delta, [(0, 0), (0, 0), (0, l_pad - delta.shape[-1])])


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """Output shape carrying `like`'s manual-axis (vma) type, which pallas_call needs inside shard_map."""
  mat = getattr(jax.typeof(like), "mat", None)
  if mat is None or getattr(mat, "empty", True):
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def _varying(x) -> frozenset:
  mat = getattr(jax.typeof(x), "mat", None)
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(jax.typeof(x), "vma", ()) or ())


def match_vma(x, like):
  """x typed as varying over every manual axis `like` varies over (a no-op outside shard_map).

  Mosaic GPU kernels (plgpu.kernel) return values without the manual-axis type of their out_type on jax 0.10, which
  shard_map's type check then rejects (e.g. a custom_vjp backward whose gradients are not varying like the primal
  inputs). Used only inside our custom_vjp rules, so the cast's own transpose (a psum) never enters a gradient.
  """
  missing = _varying(like) - _varying(x)
  if not missing:
    return x
  return mark_varying(x, tuple(sorted(missing)))
