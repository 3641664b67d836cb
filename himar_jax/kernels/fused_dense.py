"""dense_gelu: GELU(x @ kernel + bias) with the bias and the GELU in the matmul's epilogue (Hopper).

Why: in the MLPs, XLA runs fc1 as a cuBLAS matmul that writes its bfloat16 output, then a separate elementwise
kernel reads it back for the bias add and the GELU and writes the activation again: ~0.22 ms per DiT block at
sampling batch 256 (tanh GELU) and ~0.62 ms per Hi-MAR-B decoder block (exact GELU) on the H100 (bench/notes.md,
sampling profiles v2 and v8), at the memory floor. Here the accumulator gets the bias and the GELU in registers
and is written once. Both forms: the tanh approximation (DiT) and the exact x Phi(x) with the closed-form erf of
nn/activations (timm's default, the backbone's).

The kernel is a Pallas Mosaic GPU matmul: one CTA per SM loops over (tile_m x 2 tile_n) output tiles, a producer
warpgroup streams (tile_m x tile_k) tiles of x and (tile_k x 2 tile_n) tiles of the kernel by TMA through a ring of
`stages` slots (plgpu.emit_pipeline_warp_specialized), two consumer warpgroups accumulate tile_m x tile_n each with
wgmma; the structure follows JAX's Hopper matmul example (jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py,
Copyright 2025 The JAX Authors, Apache License 2.0). What is ours: the epilogue (bias row from shared memory,
the tanh-form GELU 0.5 h (1 + tanh u), u = sqrt(2/pi) (h + 0.044715 h^3), with tanh.approx under approx_math, or
the exact form h Phi(h), one rounding to the output dtype) and the dispatch.

Numerics differ from the unfused path by rounding only: it rounds the matmul output and the biased value to
bfloat16 before the GELU; this computes the GELU on the float32 accumulator plus the float32 bias and rounds once.

Runs only on a Hopper GPU (jax 0.10's Mosaic GPU interpret mode cannot run warp-specialized pipelines); on CPU the
tests lower it to Mosaic GPU MLIR and check the reference and the dispatch; bench/fused_dense.py checks its numbers
and speed on the H100.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from himar_jax.kernels.common import is_hopper, out_struct, sm_count
from himar_jax.kernels.pallas_mgpu import LOG2E, load_vector
from himar_jax.nn.activations import gelu_erf, normal_cdf_f32
from himar_jax.parallel.sharding import per_shard

try:  # Mosaic GPU ships with jax, but keep this module importable where a jax build lacks it.
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
  pl = plgpu = None

GELU_TANH_C = math.sqrt(2.0 / math.pi)


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Output tile per consumer warpgroup (tile_m x tile_n; a CTA covers tile_m x 2 tile_n), K step, ring slots;
  tanh: the epilogue's GELU through tanh (one MUFU op per element; tanh.approx under approx_math) instead of
  exp2 and a reciprocal (two)."""
  tile_m: int = 128  # defaults: the fastest measured at 65536 x 512 x 2048 (bench/notes.md v7)
  tile_n: int = 128
  tile_k: int = 64
  stages: int = 3
  tanh: bool = True


def gelu_tanh_f32(h, use_tanh: bool = False):
  """The tanh-form GELU in float32: 0.5 h (1 + tanh u), u = sqrt(2/pi) (h + 0.044715 h^3); by default written as
  h * sigmoid(2u) = h / (1 + exp(-2u)) (exp2 and a division), with use_tanh as written."""
  u = GELU_TANH_C * (h + 0.044715 * h * h * h)
  if use_tanh:
    return 0.5 * h * (1.0 + jnp.tanh(u))
  return h / (1.0 + jnp.exp2(u * (-2.0 * LOG2E)))


def _gelu_f32(h, approximate: bool, use_tanh: bool = False):
  """The epilogue's GELU of float32 h: tanh form (gelu_tanh_f32) or exact, h Phi(h)."""
  return gelu_tanh_f32(h, use_tanh) if approximate else h * normal_cdf_f32(h)


def unfused(x, kernel, bias, approximate: bool = True):
  """The unfused layer as nnx.Linear(dtype=x.dtype) + the Mlp's GELU compute it: the matmul output and the bias add
  rounded to x's dtype, then nnx.gelu(approximate=True) or nn/activations.gelu_erf."""
  h = jnp.dot(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)
  return jax.nn.gelu(h, approximate=True) if approximate else gelu_erf(h)


def reference(x, kernel, bias, out_dtype=jnp.bfloat16, approximate: bool = True):
  """What the kernel computes, in XLA: float32 accumulation of the (compute-dtype) operands, float32 bias, GELU,
  one rounding."""
  h = jnp.einsum("...k,kn->...n", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
  return _gelu_f32(h + bias.astype(jnp.float32), approximate).astype(out_dtype)


def _dtype_reason(x) -> str | None:
  """Why no shape of x's dtype runs here (the build lacks Mosaic GPU, or the dtype), or None."""
  if plgpu is None:
    return "jax.experimental.pallas.mosaic_gpu is not importable"
  if x.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {x.dtype} (the kernel takes bfloat16 / float16)"
  return None


def unsupported_reason(x, kernel, config: TileConfig = TileConfig()) -> str | None:
  """Why the kernel cannot take these operands (then callers use XLA), or None."""
  reason = _dtype_reason(x)
  if reason is not None:
    return reason
  rows = math.prod(x.shape[:-1])
  k, n = kernel.shape
  if rows % config.tile_m or n % (2 * config.tile_n) or k % config.tile_k:
    return (f"shape rows={rows}, K={k}, N={n} (the kernel needs rows % {config.tile_m}, N % {2 * config.tile_n} "
            f"and K % {config.tile_k} == 0)")
  return None


def dense_gelu(x, kernel, bias, *, approximate: bool = True, config: TileConfig = TileConfig(),
               programs: int | None = None):
  """gelu(x @ kernel + bias), tanh form (approximate) or exact: x (..., K) bfloat16/float16, kernel (K, N) (cast
  to x's dtype), bias (N,) (float32 in the epilogue); returns (..., N) in x's dtype. Raises ValueError where
  unsupported_reason says."""
  reason = unsupported_reason(x, kernel, config)
  if reason is not None:
    raise ValueError(f"dense_gelu: {reason}.")
  lead, k = x.shape[:-1], x.shape[-1]
  n = kernel.shape[1]
  a = x.reshape(-1, k)
  b = kernel.astype(x.dtype)
  bias = bias.astype(jnp.float32)
  m = a.shape[0]
  dtype = x.dtype
  tile_m, tile_n, tile_k, stages = config.tile_m, config.tile_n, config.tile_k, config.stages
  cta_n = 2 * tile_n
  m_iters, n_iters, k_iters = m // tile_m, n // cta_n, k // tile_k
  swizzle = plgpu.find_swizzle(tile_k * jnp.dtype(dtype).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
  out_swizzle = plgpu.find_swizzle(tile_n * jnp.dtype(dtype).itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dtype).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))
  n_programs = min(programs or sm_count(), m_iters * n_iters)

  def body(a_gmem, b_gmem, bias_gmem, out_gmem):
    def pipeline(step_body, compute_context):
      return plgpu.emit_pipeline_warp_specialized(
          step_body, grid=(k_iters,), memory_registers=40,
          in_specs=[plgpu.BlockSpec((tile_m, tile_k), lambda kk: (0, kk), transforms=transforms,
                                    memory_space=plgpu.SMEM),
                    plgpu.BlockSpec((tile_k, cta_n), lambda kk: (kk, 0), transforms=transforms,
                                    memory_space=plgpu.SMEM)],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages, compute_context=compute_context)

    ignore = lambda *_, **__: None

    @functools.partial(pl.run_scoped,
                       allocations=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
                       out_smem=plgpu.SMEM((2, tile_m, tile_n), dtype, transforms=out_transforms),
                       bias_smem=plgpu.SMEM((2, tile_n), jnp.float32),
                       bias_ready=plgpu.Barrier(num_barriers=2),
                       collective_axes="wg")
    def scope(allocations, out_smem, bias_smem, bias_ready):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="program")
      def _tiles(info):
        (tile,) = info.index
        m_idx, n_idx = lax.div(tile, jnp.int32(n_iters)), lax.rem(tile, jnp.int32(n_iters))  # N fastest: x in L2
        rows = pl.ds(m_idx * tile_m, tile_m)
        cta_cols = pl.ds(n_idx * cta_n, cta_n)
        wg_cols = pl.ds(wg * tile_n, tile_n)

        def compute_context(run_pipeline):
          plgpu.copy_gmem_to_smem(bias_gmem.at[cta_cols].at[wg_cols], bias_smem.at[wg], bias_ready.at[wg])

          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
          def _acc(acc_ref):
            run_pipeline(acc_ref)
            plgpu.barrier_wait(bias_ready.at[wg])
            row_bias = load_vector(bias_smem.at[wg], plgpu.Layout.WGMMA.reduce(0))
            h = acc_ref[...] + lax.broadcast_in_dim(row_bias, (tile_m, tile_n), [1])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
            out_smem[wg] = _gelu_f32(h, approximate, config.tanh).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[rows, cta_cols].at[:, wg_cols])

        def step(_, a_smem, b_smem, acc_ref):
          plgpu.wgmma(acc_ref, a_smem, b_smem.at[:, wg_cols])
          plgpu.wgmma_wait(0)
          return acc_ref

        pipeline(step, compute_context)(a_gmem.at[rows, :], b_gmem.at[:, cta_cols], allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out = plgpu.kernel(body, out_type=out_struct((m, n), dtype, a), grid=(n_programs,), grid_names=("program",),
                     num_threads=3, thread_name="wg",
                     compiler_params=plgpu.CompilerParams(approx_math=True))(a, b, bias)
  return out.reshape(*lead, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_with_unfused_grads(x, kernel, bias, approximate):
  # Not differentiated (inference): the kernel on each device's rows under a mesh (sharding.per_shard), the
  # unfused layer on a shard whose shapes it does not take.
  def run(x):
    if unsupported_reason(x, kernel) is not None:
      return unfused(x, kernel, bias, approximate)
    return dense_gelu(x, kernel, bias, approximate=approximate)
  return per_shard(run, x, logical=("batch",) + (None,) * (x.ndim - 1))


def _fused_fwd(x, kernel, bias, approximate):
  # Under differentiation (training) the layer is the unfused one, so training computes exactly what it did
  # without the kernel; only inference (sampling) runs the kernel.
  return jax.vjp(functools.partial(unfused, approximate=approximate), x, kernel, bias)


def _fused_bwd(approximate, vjp, d_out):
  del approximate
  return vjp(d_out)


_fused_with_unfused_grads.defvjp(_fused_fwd, _fused_bwd)


def fused_or_none(x, kernel, bias, approximate: bool = True):
  """gelu(x @ kernel + bias) by the kernel where it runs (a Hopper GPU, bfloat16 / float16), else None: the caller
  then keeps its unfused path. Under a mesh (sharding.per_shard) the kernel runs on each device's rows; a shard
  whose shapes it does not take (unsupported_reason) computes `unfused`. Under differentiation (training) the
  forward and its gradients are `unfused`'s, with no kernel and no per-device wrapper: the training program is the
  one without the flag."""
  if not is_hopper() or _dtype_reason(x) is not None:
    return None
  return _fused_with_unfused_grads(x, kernel, bias, approximate)
