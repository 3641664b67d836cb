"""Gated residual + LayerNorm + adaLN modulation in one pass over each row (the DiT block's memory-bound glue).

    x_out = x + mod[gate] * h              (float32; skipped without h)
    y     = LN(x_out) * (1 + mod[scale]) + mod[shift]        (non-affine LN, eps, float32; y in out_dtype)

mod is the block's adaLN output (..., K * W) with chunk j = mod[..., j*W:(j+1)*W] (DiT: shift, scale, gate for the
attention, then for the MLP), read in place: no chunk is sliced out into its own array. XLA computes this as two or
three memory-bound kernels (the residual add, the LayerNorm statistics, the normalise-modulate-cast) that each read
the float32 rows again; the Pallas GPU kernel reads x, h and the three chunks once and writes x_out and y once
(bench/notes.md, v6: the DiT head's elementwise kernels are about half of its sampling time).

Backends ('implementation'): 'xla' (the default: the reference below, which XLA fuses with its neighbours) or
'pallas_gpu' (opt-in; Pallas, Triton lowering; `interpret=True` runs it on the CPU). On the H100 the kernel alone
beats XLA's fusions of this op at width 512 (0.174 vs 0.214 ms without, 0.224 vs 0.256 with the residual, 65536
rows) but loses at 768 (masked 1024-wide rows) and, inside the DiT head, slows the whole pass (13.9 vs 11.8 ms):
as a custom call it stops XLA from fusing the neighbouring bias adds and casts into these passes, so they come back
as kernels of their own (bench/notes.md, v6). Gradients: a custom_vjp whose backward differentiates the reference
(recomputed in XLA from the inputs). Under a mesh set with `jax.sharding.use_abstract_mesh` the kernel runs per
shard of the batch (sharding.per_shard).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from himar_jax.kernels.common import out_struct
from himar_jax.parallel.sharding import per_shard

IMPLEMENTATIONS = ("pallas_gpu", "xla")
BLOCK_ROWS = 16  # rows per program (each program holds BLOCK_ROWS x next_pow2(W) float32 values)


def reference(x, mod, h, *, shift: int, scale: int, gate: int | None, eps: float, out_dtype):
  """(x_out, y) in XLA: float32 statistics (two-pass variance, as PyTorch's LayerNorm)."""
  width = x.shape[-1]
  chunk = lambda j: mod[..., j * width:(j + 1) * width].astype(jnp.float32)
  x = x.astype(jnp.float32)
  if h is not None:
    x = x + chunk(gate) * h.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centered = x - mean
  var = jnp.mean(centered * centered, axis=-1, keepdims=True)
  y = centered * lax.rsqrt(var + eps)
  return x, (y * (1.0 + chunk(scale)) + chunk(shift)).astype(out_dtype)


def modulated_layer_norm(x, mod, *, shift: int, scale: int, h=None, gate: int | None = None, eps: float = 1e-6,
                         out_dtype=jnp.bfloat16, implementation: str = "xla", interpret: bool = False):
  """(x_out float32, y out_dtype) for x (..., W), mod (..., K*W) and optionally h (..., W) with gate (module doc)."""
  width = x.shape[-1]
  if mod.shape[:-1] != x.shape[:-1] or mod.shape[-1] % width:
    raise ValueError(f"mod must be (..., K * {width}) with x's leading shape {x.shape[:-1]}; got {mod.shape}.")
  chunks = mod.shape[-1] // width
  for name, j in (("shift", shift), ("scale", scale), ("gate", gate)):
    if j is not None and not 0 <= j < chunks:
      raise ValueError(f"{name}={j} is not a chunk index of mod's {chunks} chunks of width {width}.")
  if (h is None) != (gate is None) or (h is not None and h.shape != x.shape):
    raise ValueError(f"pass h (shape {x.shape}) and gate together; got h {None if h is None else h.shape}, "
                     f"gate {gate}.")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}.")
  static = dict(shift=shift, scale=scale, gate=gate, eps=float(eps), out_dtype=jnp.dtype(out_dtype))
  if implementation == "xla":
    return reference(x, mod, h, **static)
  frozen = tuple(static.items())

  def run(x, mod, h=None):
    return _fused(x, mod, h, frozen, bool(interpret))
  operands = (x, mod) if h is None else (x, mod, h)
  return per_shard(run, *operands, logical=("batch",) + (None,) * (x.ndim - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x, mod, h, static, interpret):
  return _pallas_forward(x, mod, h, dict(static), interpret)


def _fused_fwd(x, mod, h, static, interpret):
  return _pallas_forward(x, mod, h, dict(static), interpret), (x, mod, h)


def _fused_bwd(static, interpret, residuals, cotangents):
  x, mod, h = residuals
  _, vjp = jax.vjp(lambda x, mod, h: reference(x, mod, h, **dict(static)), x, mod, h)
  return vjp(cotangents)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _next_pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _pallas_forward(x, mod, h, static, interpret):
  shape, width = x.shape, x.shape[-1]
  rows = int(x.size // width)
  cols = _next_pow2(width)
  flat = lambda a: a.reshape(rows, a.shape[-1])
  operands = [flat(x), flat(mod)] + ([] if h is None else [flat(h)])
  kernel = functools.partial(_kernel, width=width, cols=cols, rows=rows, has_residual=h is not None,
                             shift=static["shift"], scale=static["scale"], gate=static["gate"], eps=static["eps"])
  whole = lambda a: pl.BlockSpec(a.shape, lambda i: (0, 0))
  x_out, y = pl.pallas_call(
      kernel, grid=(pl.cdiv(rows, BLOCK_ROWS),), in_specs=[whole(a) for a in operands],
      out_specs=[pl.BlockSpec((rows, width), lambda i: (0, 0))] * 2,
      out_shape=[out_struct((rows, width), jnp.float32, x), out_struct((rows, width), static["out_dtype"], x)],
      compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
      name="modulated_layer_norm",
  )(*operands)
  return x_out.reshape(shape), y.reshape(shape)


def _kernel(*refs, width, cols, rows, has_residual, shift, scale, gate, eps):
  if has_residual:
    x_ref, mod_ref, h_ref, x_out_ref, y_ref = refs
  else:
    (x_ref, mod_ref, x_out_ref, y_ref), h_ref = refs, None
  row0 = pl.program_id(0) * BLOCK_ROWS
  r = row0 + lax.broadcasted_iota(jnp.int32, (BLOCK_ROWS, cols), 0)
  c = lax.broadcasted_iota(jnp.int32, (BLOCK_ROWS, cols), 1)
  ok = (r < rows) & (c < width)
  block = (pl.ds(row0, BLOCK_ROWS), pl.ds(0, cols))

  def load(ref, j=0):
    part = ref.at[pl.ds(row0, BLOCK_ROWS), pl.ds(j * width, cols)]
    return pl_triton.load(part, mask=ok, other=0.0).astype(jnp.float32)

  x = load(x_ref)
  if has_residual:
    x = x + load(mod_ref, gate) * load(h_ref)
  mean = jnp.sum(x, axis=1, keepdims=True) / width
  centered = jnp.where(ok, x - mean, 0.0)
  var = jnp.sum(centered * centered, axis=1, keepdims=True) / width
  y = centered * lax.rsqrt(var + eps) * (1.0 + load(mod_ref, scale)) + load(mod_ref, shift)
  pl_triton.store(x_out_ref.at[block], x, mask=ok)
  pl_triton.store(y_ref.at[block], y.astype(y_ref.dtype), mask=ok)
