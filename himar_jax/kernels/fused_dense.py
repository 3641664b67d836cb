"""Matmuls with their elementwise successors in the epilogue (Hopper): dense_gelu, GELU(x @ kernel + bias) (every
MLP's fc1), and dense_gated_residual, residual + gate * (h @ kernel + bias) (the DiT blocks' fc2).

Why: in the MLPs, XLA runs fc1 as a cuBLAS matmul that writes its bfloat16 output, then a separate elementwise
kernel reads it back for the bias add and the GELU and writes the activation again: ~0.22 ms per DiT block at
sampling batch 256 (tanh GELU) and ~0.62 ms per Hi-MAR-B decoder block (exact GELU) on the H100 (bench/notes.md,
sampling profiles v2 and v8), at the memory floor. Here the accumulator gets the bias and the GELU in registers
and is written once. Both forms: the tanh approximation (DiT) and the exact x Phi(x) with the closed-form erf of
nn/activations (timm's default, the backbone's). Likewise the DiT MLP's gated residual x + gate * fc2(h), a pass of
its own after fc2 (~0.17 ms per block at sampling batch 256, bench/notes.md v8): the kernel reads the float32
residual and the gate's column window of the adaLN output by TMA under its matmul and writes the new residual.

The kernel is a Pallas Mosaic GPU matmul: one CTA per SM loops over (tile_m x 2 tile_n) output tiles, a producer
warpgroup streams (tile_m x tile_k) tiles of x and (tile_k x 2 tile_n) tiles of the kernel by TMA through a ring of
`stages` slots (plgpu.emit_pipeline_warp_specialized), two consumer warpgroups accumulate tile_m x tile_n each with
wgmma; the structure follows JAX's Hopper matmul example (jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py,
Copyright 2025 The JAX Authors, Apache License 2.0). What is ours: the epilogues (bias row, residual and gate tiles
loaded by TMA before each tile's matmul, the result stored through the residual's buffer; the tanh-form GELU
0.5 h (1 + tanh u), u = sqrt(2/pi) (h + 0.044715 h^3), with tanh.approx under approx_math, or
the exact form h Phi(h), one rounding to the output dtype) and the dispatch.

Numerics differ from the unfused path by rounding only: it rounds the matmul output and the biased value to
bfloat16 before the GELU (or the gated product); the kernels work on the float32 accumulator plus the float32 bias
and round once.

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
  exp2 and a reciprocal (two); cluster_n: 2 pairs neighbouring CTAs along N into a cluster that loads their shared
  rows of x once, multicast by TMA to both (half of x's shared-memory fills come from L2), or 1."""
  tile_m: int = 128  # defaults: the fastest measured at 65536 x 512 x 2048 (bench/notes.md v7)
  tile_n: int = 128
  tile_k: int = 64
  stages: int = 3
  tanh: bool = True
  cluster_n: int = 1


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
  cluster_cols = 2 * config.tile_n * config.cluster_n
  if rows % config.tile_m or n % cluster_cols or k % config.tile_k:
    return (f"shape rows={rows}, K={k}, N={n} (the kernel needs rows % {config.tile_m}, N % {cluster_cols} "
            f"and K % {config.tile_k} == 0)")
  return None


def _smem_transforms(dtype, minor: int):
  """TMA / wgmma-friendly shared-memory tiling of (rows, minor) tiles of dtype: 8-row tiles, swizzled."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * itemsize * 8)
  return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _persistent_matmul(a, b, *, config: TileConfig, programs: int | None, out_dtype, epilogue, vectors=(),
                       tiles=(), store_through: int | None = None):
  """a (M, K) @ b (K, N) with a per-tile epilogue: the Mosaic GPU kernel both fused layers share.

  One CTA per SM loops over (tile_m x 2 tile_n) output tiles, N fastest (a's rows stay in L2); a producer warpgroup
  streams a and b through `config.stages` ring slots, two consumer warpgroups each accumulate tile_m x tile_n.
  Per consumer tile the epilogue inputs are brought by TMA before its matmul starts, so their latency hides
  under it: `vectors`, float32 (N,) rows (a bias), and `tiles`, (array (M, G), col0) pairs whose tile is the
  window array[rows, col0 + cols] (a residual stream, a column chunk of an adaLN output read in place).
  epilogue(acc, vectors, tiles) gets the float32 accumulator and the loaded inputs (vectors broadcast over rows,
  tiles in the accumulator's layout) and returns the (tile_m, tile_n) output tile; it is stored by TMA through
  shared memory: a buffer of its own, or, with store_through = i, tiles[i]'s buffer (same dtype; saves the
  shared memory a float32 output tile needs, at the price of waiting for the previous tile's store before the
  next tile's loads)."""
  m, k = a.shape
  n = b.shape[1]
  tile_m, tile_n, tile_k, stages = config.tile_m, config.tile_n, config.tile_k, config.stages
  if config.cluster_n not in (1, 2):
    raise ValueError(f"cluster_n={config.cluster_n}: the kernel pairs CTAs (2) or not (1).")
  clustered = config.cluster_n == 2
  cta_n = 2 * tile_n
  m_iters, n_iters, k_iters = m // tile_m, n // (cta_n * config.cluster_n), k // tile_k  # n_iters: per cluster
  operand_transforms = _smem_transforms(a.dtype, tile_k)
  n_programs = min((programs or sm_count()) // config.cluster_n, m_iters * n_iters)  # CTAs or clusters
  n_vec = len(vectors)
  tile_cols = tuple(col0 for _, col0 in tiles)

  def body(a_gmem, b_gmem, *refs):
    vec_gmem, tile_gmem, out_gmem = refs[:n_vec], refs[n_vec:-1], refs[-1]

    def pipeline(step_body, compute_context):
      return plgpu.emit_pipeline_warp_specialized(
          step_body, grid=(k_iters,), memory_registers=40,
          in_specs=[plgpu.BlockSpec((tile_m, tile_k), lambda kk: (0, kk), transforms=operand_transforms,
                                    memory_space=plgpu.SMEM, collective_axes=("cluster",) if clustered else ()),
                    plgpu.BlockSpec((tile_k, cta_n), lambda kk: (kk, 0), transforms=operand_transforms,
                                    memory_space=plgpu.SMEM)],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages, compute_context=compute_context)

    ignore = lambda *_, **__: None
    scratch = dict(
        vec_smem=tuple(plgpu.SMEM((2, tile_n), jnp.float32) for _ in vec_gmem),
        tile_smem=tuple(plgpu.SMEM((2, tile_m, tile_n), g.dtype, transforms=_smem_transforms(g.dtype, tile_n))
                        for g in tile_gmem),
        ready=tuple(plgpu.Barrier(num_barriers=2) for _ in range(len(refs) - 1)))
    if store_through is None:
      scratch["out_smem"] = plgpu.SMEM((2, tile_m, tile_n), out_dtype,
                                       transforms=_smem_transforms(out_dtype, tile_n))

    @functools.partial(pl.run_scoped, allocations=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
                       collective_axes="wg", **scratch)
    def scope(allocations, vec_smem, tile_smem, ready, out_smem=None):
      wg = lax.axis_index("wg")
      out_buffer = out_smem if store_through is None else tile_smem[store_through]

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="program")
      def _tiles(info):
        (tile,) = info.index
        m_idx, n_idx = lax.div(tile, jnp.int32(n_iters)), lax.rem(tile, jnp.int32(n_iters))  # N fastest: a in L2
        if clustered:
          n_idx = n_idx * 2 + lax.axis_index("cluster")
        rows = pl.ds(m_idx * tile_m, tile_m)
        cta_cols = pl.ds(n_idx * cta_n, cta_n)
        wg_cols = pl.ds(wg * tile_n, tile_n)

        def compute_context(run_pipeline):
          if store_through is not None:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read the buffer
          for src, dst, barrier in zip(vec_gmem, vec_smem, ready):
            plgpu.copy_gmem_to_smem(src.at[cta_cols].at[wg_cols], dst.at[wg], barrier.at[wg])
          for src, col0, dst, barrier in zip(tile_gmem, tile_cols, tile_smem, ready[n_vec:]):
            window = src.at[rows, pl.ds(col0 + n_idx * cta_n, cta_n)].at[:, wg_cols]
            plgpu.copy_gmem_to_smem(window, dst.at[wg], barrier.at[wg])

          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
          def _acc(acc_ref):
            run_pipeline(acc_ref)
            for barrier in ready:
              plgpu.barrier_wait(barrier.at[wg])
            row_vectors = [lax.broadcast_in_dim(load_vector(v.at[wg], plgpu.Layout.WGMMA.reduce(0)),
                                                (tile_m, tile_n), [1]) for v in vec_smem]
            tile_values = [t[wg] for t in tile_smem]
            out = epilogue(acc_ref[...], row_vectors, tile_values).astype(out_dtype)
            if store_through is None:
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
            out_buffer[wg] = out
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_buffer.at[wg], out_gmem.at[rows, cta_cols].at[:, wg_cols])

        def step(_, a_smem, b_smem, acc_ref):
          plgpu.wgmma(acc_ref, a_smem, b_smem.at[:, wg_cols])
          plgpu.wgmma_wait(0)
          return acc_ref

        pipeline(step, compute_context)(a_gmem.at[rows, :], b_gmem.at[:, cta_cols], allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  operands = (a, b, *vectors, *(t for t, _ in tiles))
  cluster = dict(cluster=(2,), cluster_names=("cluster",)) if clustered else {}
  return plgpu.kernel(body, out_type=out_struct((m, n), out_dtype, a), grid=(n_programs,), grid_names=("program",),
                      num_threads=3, thread_name="wg", **cluster,
                      compiler_params=plgpu.CompilerParams(approx_math=True))(*operands)


def dense_gelu(x, kernel, bias, *, approximate: bool = True, config: TileConfig = TileConfig(),
               programs: int | None = None):
  """gelu(x @ kernel + bias), tanh form (approximate) or exact: x (..., K) bfloat16/float16, kernel (K, N) (cast
  to x's dtype), bias (N,) (float32 in the epilogue); returns (..., N) in x's dtype. Raises ValueError where
  unsupported_reason says."""
  reason = unsupported_reason(x, kernel, config)
  if reason is not None:
    raise ValueError(f"dense_gelu: {reason}.")
  lead, k = x.shape[:-1], x.shape[-1]

  def epilogue(acc, vectors, _):
    return _gelu_f32(acc + vectors[0], approximate, config.tanh)
  out = _persistent_matmul(x.reshape(-1, k), kernel.astype(x.dtype), config=config, programs=programs,
                           out_dtype=x.dtype, epilogue=epilogue, vectors=(bias.astype(jnp.float32),))
  return out.reshape(*lead, kernel.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# fc2 + bias + gated residual (the DiT blocks' MLP output)
# ----------------------------------------------------------------------------------------------------------------

# 65536 x 2048 -> 512 on the H100: 0.308 ms with 4 stages, 0.344 with 3, 0.341 - 0.391 for 64 x 128, 128 x 64 x 128
# and 64 x 64 tiles (bench/notes.md v10). A CTA tile of 128 x 128 leaves shared memory for the float32 residual
# tiles, which the result goes back through.
RESIDUAL_TILES = TileConfig(tile_m=128, tile_n=64, tile_k=64, stages=4)


def gate_window(modulation, gate_col: int, n: int, gate_bias=None):
  """modulation[..., gate_col : gate_col + n] (+ gate_bias, added in modulation's dtype): the gated residuals' gate
  without the kernel."""
  gate = modulation[..., gate_col:gate_col + n]
  return gate if gate_bias is None else gate + gate_bias.astype(gate.dtype)


def gated_residual_unfused(h, kernel, bias, residual, modulation, gate_col: int, gate_bias=None):
  """What the DiT block computes without the kernel: residual + f32(gate) * f32(h @ kernel + bias), the Linear in
  h's dtype (matmul output and bias add rounded to it), gate = modulation[..., gate_col : gate_col + N] (+ gate_bias,
  added in modulation's dtype)."""
  out = jnp.dot(h, kernel.astype(h.dtype)) + bias.astype(h.dtype)
  gate = gate_window(modulation, gate_col, kernel.shape[1], gate_bias)
  return residual + gate.astype(jnp.float32) * out.astype(jnp.float32)


def gated_residual_reference(h, kernel, bias, residual, modulation, gate_col: int, gate_bias=None):
  """What the kernel computes, in XLA: residual + (gate + gate_bias) * (float32 accumulation + bias), the biases
  added in float32, one rounding to the residual's dtype."""
  n = kernel.shape[1]
  acc = jnp.einsum("...k,kn->...n", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
  gate = modulation[..., gate_col:gate_col + n].astype(jnp.float32)
  if gate_bias is not None:
    gate = gate + gate_bias.astype(jnp.float32)
  return (residual.astype(jnp.float32) + gate * (acc + bias.astype(jnp.float32))).astype(residual.dtype)


def gated_residual_unsupported_reason(h, kernel, residual, modulation, gate_col: int,
                                      config: TileConfig = RESIDUAL_TILES) -> str | None:
  """Why dense_gated_residual cannot take these operands (then callers use XLA), or None."""
  reason = unsupported_reason(h, kernel, config)
  if reason is not None:
    return reason
  n = kernel.shape[1]
  if residual.shape != h.shape[:-1] + (n,) or modulation.shape[:-1] != h.shape[:-1]:
    return (f"shapes residual {residual.shape} and modulation {modulation.shape} for h {h.shape} (they need h's "
            f"leading dims and the residual {n} columns)")
  if residual.dtype != jnp.float32:
    return f"residual dtype {residual.dtype} (the kernel takes a float32 residual stream)"
  if modulation.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return f"modulation dtype {modulation.dtype}"
  itemsize = jnp.dtype(modulation.dtype).itemsize
  width = modulation.shape[-1]
  if gate_col < 0 or gate_col + n > width or (gate_col * itemsize) % 16 or (width * itemsize) % 16:
    return (f"gate columns [{gate_col}, {gate_col + n}) of a modulation {width} wide (TMA needs them inside it, "
            f"16-byte aligned)")
  return None


def dense_gated_residual(h, kernel, bias, residual, modulation, gate_col: int, gate_bias=None, *,
                         config: TileConfig = RESIDUAL_TILES, programs: int | None = None):
  """residual + gate * (h @ kernel + bias) in one kernel: h (..., K) bfloat16/float16, kernel (K, N) (cast to h's
  dtype), bias (N,), residual (..., N) float32, gate = modulation[..., gate_col : gate_col + N] + gate_bias (N,),
  the window read in place (the DiT block's adaLN matmul output, no slice copy; its bias comes apart, so that XLA
  does not write the biased modulation for this kernel alone); returns (..., N) float32. Removes the separate
  residual pass and the matmul output's round trip (bench/notes.md v10). Raises ValueError where
  gated_residual_unsupported_reason says."""
  reason = gated_residual_unsupported_reason(h, kernel, residual, modulation, gate_col, config)
  if reason is not None:
    raise ValueError(f"dense_gated_residual: {reason}.")
  lead, k = h.shape[:-1], h.shape[-1]
  n = kernel.shape[1]

  gate_bias = jnp.zeros((n,), jnp.float32) if gate_bias is None else gate_bias.astype(jnp.float32)

  def epilogue(acc, vectors, tiles):
    (res, gate), (bias_row, gate_bias_row) = tiles, vectors
    return res + (gate.astype(jnp.float32) + gate_bias_row) * (acc + bias_row)
  out = _persistent_matmul(h.reshape(-1, k), kernel.astype(h.dtype), config=config, programs=programs,
                           out_dtype=residual.dtype, epilogue=epilogue,
                           vectors=(bias.astype(jnp.float32), gate_bias),
                           tiles=((residual.reshape(-1, n), 0),
                                  (modulation.reshape(-1, modulation.shape[-1]), gate_col)),
                           store_through=0)
  return out.reshape(*lead, n)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch: the kernels at inference, the unfused layers' forward and gradients under differentiation
# ----------------------------------------------------------------------------------------------------------------

def _with_unfused_grads(fused, unfused_fn, *args):
  """fused(*args), whose forward under differentiation (training) and gradients are unfused_fn's: training
  computes exactly what it did without the kernels; only inference (sampling) runs them."""
  @jax.custom_vjp
  def f(*args):
    return fused(*args)

  def fwd(*args):
    return jax.vjp(unfused_fn, *args)

  def bwd(vjp, d_out):
    return vjp(d_out)
  f.defvjp(fwd, bwd)
  return f(*args)


def fused_or_none(x, kernel, bias, approximate: bool = True):
  """gelu(x @ kernel + bias) by the kernel where it runs (a Hopper GPU, bfloat16 / float16), else None: the caller
  then keeps its unfused path. Under a mesh (sharding.per_shard) the kernel runs on each device's rows; a shard
  whose shapes it does not take (unsupported_reason) computes `unfused`. Under differentiation the forward and its
  gradients are `unfused`'s."""
  if not is_hopper() or _dtype_reason(x) is not None:
    return None
  unfused_fn = functools.partial(unfused, approximate=approximate)

  def run(x):
    if unsupported_reason(x, kernel) is not None:
      return unfused_fn(x, kernel, bias)
    fused = lambda x, kernel, bias: dense_gelu(x, kernel, bias, approximate=approximate)
    return _with_unfused_grads(fused, unfused_fn, x, kernel, bias)
  return per_shard(run, x, logical=("batch",) + (None,) * (x.ndim - 1))


def gated_residual_or_none(h, kernel, bias, residual, modulation, gate_col: int, gate_bias=None):
  """residual + (gate + gate_bias) * (h @ kernel + bias) by dense_gated_residual where it runs (a Hopper GPU,
  bfloat16 / float16 h), else None: the caller keeps its unfused path. Per device under a mesh; a shard the kernel
  does not take computes gated_residual_unfused, as does differentiation (forward and gradients)."""
  if not is_hopper() or _dtype_reason(h) is not None:
    return None
  unfused_fn = lambda h, kernel, bias, residual, modulation, gate_bias: gated_residual_unfused(
      h, kernel, bias, residual, modulation, gate_col, gate_bias)

  def run(h, residual, modulation):
    if gated_residual_unsupported_reason(h, kernel, residual, modulation, gate_col) is not None:
      return unfused_fn(h, kernel, bias, residual, modulation, gate_bias)
    fused = lambda h, kernel, bias, residual, modulation, gate_bias: dense_gated_residual(
        h, kernel, bias, residual, modulation, gate_col, gate_bias)
    return _with_unfused_grads(fused, unfused_fn, h, kernel, bias, residual, modulation, gate_bias)
  return per_shard(run, h, residual, modulation, logical=("batch",) + (None,) * (h.ndim - 1))
