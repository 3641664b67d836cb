"""Block-sparse attention on GPU: Pallas kernels through the Triton lowering (forward, fused dq/dk/dv backward).

Tensors keep the (batch, length, heads, head_dim) layout, unpadded: the last tile's rows past L are loaded with
masks (as zeros) and never stored, so no padded copy of q, k, v or the outputs is made. Each query tile loops over
key tiles [kv_lo, kv_hi) only, each key tile (backward) over query tiles [q_lo, q_hi); tiles outside are never
loaded. Inside that range, the "full" sub-range runs without masks; the boundary tiles mask logits with the
per-row range [row_start, row_end). Tiles run heaviest-first (last tile first: later scales are larger).
Logits live in base 2 (scaled by scale*log2(e)) so the softmax uses exp2; lse is stored in the same units.

On Hopper, long layouts use the Mosaic GPU forward in pallas_mgpu.py instead, and head_dim 64 its backward
(block_sparse.py dispatches); these kernels serve other GPUs, short layouts (forward: faster there), float32, other
head_dims, interpret mode. Measurements: bench/attention_notes.md.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from himar_jax.kernels.common import MASK_VALUE, NT, TN, dot, out_struct, row_mask, softmax_bwd_delta
from himar_jax.kernels.layout import TilePlan

LOG2E = math.log2(math.e)


def _exp2(x, fast: bool, interpret: bool):
  """exp2 of float32 x <= 0 as (float32, bfloat16). fast: bf16 in and out through ex2.approx.ftz.bf16x2 (sm_90),
  two values per MUFU op (the softmax exponentials bound a head_dim-64 kernel); interpret mode emulates it.
  Forward only: there x = s - running max is near 0 where p matters, so rounding x to bf16 costs little; in the
  backward x = s - lse sits near -log2(L) and the bf16 rounding of x doubled the gradient error (notes)."""
  if not fast:
    p = jnp.exp2(x)
    return p, p.astype(jnp.bfloat16)
  x = x.astype(jnp.bfloat16)
  if interpret:
    p = jnp.exp2(x.astype(jnp.float32)).astype(jnp.bfloat16)
  else:
    [p] = pl_triton.elementwise_inline_asm(
        "ex2.approx.ftz.bf16x2 $0, $1;", args=[x], constraints="=r,r", pack=2,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)])
  return p.astype(jnp.float32), p


def _load_rows(ref, start, block, length, masked):
  """Rows [start, start + block) of a (length, D) ref; rows past `length` read as zeros when masked."""
  if not masked:
    return ref[pl.ds(start, block), :]
  ok = (start + lax.broadcasted_iota(jnp.int32, (block, 1), 0)) < length
  return pl_triton.load(ref.at[pl.ds(start, block), :], mask=ok, other=0.0)


def _store_rows(ref, start, value, length):
  ok = (start + lax.broadcasted_iota(jnp.int32, (value.shape[0], 1), 0)) < length
  pl_triton.store(ref.at[pl.ds(start, value.shape[0]), :], value.astype(ref.dtype), mask=ok)


def _tile_range(lo_ref, hi_ref, rows):
  return jnp.min(lo_ref[rows]), jnp.max(hi_ref[rows])


def _fwd_kernel(q_ref, k_ref, v_ref, rs_ref, re_ref, lo_ref, flo_ref, fhi_ref, hi_ref, o_ref, lse_ref, *,
                qk_scale, block_q, block_k, length, fast_exp, interpret):
  i = pl.num_programs(0) - 1 - pl.program_id(0)
  row0 = i * block_q
  rows = pl.ds(row0, block_q)
  q = _load_rows(q_ref, row0, block_q, length, True)
  rows_start, rows_end = rs_ref[rows], re_ref[rows]
  head_dim = q.shape[-1]

  def body(masked):
    def step(j, carry):
      acc, m_prev, l_prev = carry
      col0 = j * block_k
      k = _load_rows(k_ref, col0, block_k, length, masked)
      v = _load_rows(v_ref, col0, block_k, length, masked)
      s = dot(q, k, NT) * qk_scale
      if masked:
        s = jnp.where(row_mask(rows_start[:, None], rows_end[:, None], col0, block_k), s, MASK_VALUE)
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      alpha = jnp.exp2(m_prev - m_new)
      p, p_low = _exp2(s - m_new[:, None], fast_exp, interpret)
      l_new = alpha * l_prev + jnp.sum(p, axis=1)
      acc = acc * alpha[:, None] + dot(p_low if fast_exp else p.astype(v.dtype), v)
      return acc, m_new, l_new
    return step

  lo, hi = _tile_range(lo_ref, hi_ref, rows)
  full_lo, full_hi = _tile_range(flo_ref, fhi_ref, rows)
  carry = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  carry = lax.fori_loop(lo, full_lo, body(True), carry)
  carry = lax.fori_loop(full_lo, full_hi, body(False), carry)
  acc, m, l = lax.fori_loop(full_hi, hi, body(True), carry)
  _store_rows(o_ref, row0, acc / l[:, None], length)
  lse_ref[rows] = m + jnp.log2(l)


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rs_ref, re_ref, kv_lo_ref, kv_flo_ref, kv_fhi_ref,
                kv_hi_ref, q_lo_ref, q_flo_ref, q_fhi_ref, q_hi_ref, dq_ref, dk_ref, dv_ref, *, qk_scale, scale,
                block, length):
  """Program t: dk, dv of key tile t (loop over its query tiles), then dq of query tile t (loop over its keys)."""
  t = pl.num_programs(0) - 1 - pl.program_id(0)
  tile0 = t * block
  tile = pl.ds(tile0, block)
  k = _load_rows(k_ref, tile0, block, length, True)
  v = _load_rows(v_ref, tile0, block, length, True)
  head_dim = k.shape[-1]
  zeros = jnp.zeros((block, head_dim), jnp.float32)

  # dK, dV of key tile t.
  def dkdv(masked):
    def step(i, carry):
      dk, dv = carry
      row0 = i * block
      rows = pl.ds(row0, block)
      q = _load_rows(q_ref, row0, block, length, masked)
      do = _load_rows(do_ref, row0, block, length, masked)
      s = dot(q, k, NT) * qk_scale
      if masked:
        s = jnp.where(row_mask(rs_ref[rows][:, None], re_ref[rows][:, None], tile0, block), s, MASK_VALUE)
      p = jnp.exp2(s - lse_ref[rows][:, None])
      dv = dv + dot(p.astype(do.dtype), do, TN)
      dp = dot(do, v, NT)
      ds = p * (dp - delta_ref[rows][:, None])
      dk = dk + dot(ds.astype(q.dtype), q, TN)
      return dk, dv
    return step

  lo, hi = _tile_range(q_lo_ref, q_hi_ref, tile)
  full_lo, full_hi = _tile_range(q_flo_ref, q_fhi_ref, tile)
  carry = lax.fori_loop(lo, full_lo, dkdv(True), (zeros, zeros))
  carry = lax.fori_loop(full_lo, full_hi, dkdv(False), carry)
  dk, dv = lax.fori_loop(full_hi, hi, dkdv(True), carry)
  _store_rows(dk_ref, tile0, dk * scale, length)
  _store_rows(dv_ref, tile0, dv, length)

  # dQ of query tile t.
  q = _load_rows(q_ref, tile0, block, length, True)
  do = _load_rows(do_ref, tile0, block, length, True)
  lse = lse_ref[tile]
  delta = delta_ref[tile]
  rows_start, rows_end = rs_ref[tile], re_ref[tile]

  def dq_body(masked):
    def step(j, dq):
      col0 = j * block
      k = _load_rows(k_ref, col0, block, length, masked)
      v = _load_rows(v_ref, col0, block, length, masked)
      s = dot(q, k, NT) * qk_scale
      if masked:
        s = jnp.where(row_mask(rows_start[:, None], rows_end[:, None], col0, block), s, MASK_VALUE)
      p = jnp.exp2(s - lse[:, None])
      dp = dot(do, v, NT)
      ds = p * (dp - delta[:, None])
      return dq + dot(ds.astype(k.dtype), k)
    return step

  lo, hi = _tile_range(kv_lo_ref, kv_hi_ref, tile)
  full_lo, full_hi = _tile_range(kv_flo_ref, kv_fhi_ref, tile)
  dq = lax.fori_loop(lo, full_lo, dq_body(True), zeros)
  dq = lax.fori_loop(full_lo, full_hi, dq_body(False), dq)
  dq = lax.fori_loop(full_hi, hi, dq_body(True), dq)
  _store_rows(dq_ref, tile0, dq * scale, length)


def _per_row(tile_values: np.ndarray, block: int) -> jax.Array:
  """Broadcasts per-tile int32 values to per-row vectors (a tile's rows load one block of them)."""
  return jnp.asarray(np.repeat(tile_values, block).astype(np.int32))


def _full_spec(length, head_dim):
  return pl.BlockSpec((None, length, None, head_dim), lambda t, b, h: (b, 0, h, 0))


def _vec_spec(n):
  return pl.BlockSpec((n,), lambda t, b, h: (0,))


def _call(kernel, inputs, out_shape, *, in_specs, out_specs, grid, num_warps, num_stages, interpret, poison, name):
  """pallas_call; with poison=True the outputs start NaN-filled (aliased inputs), so unwritten rows show up."""
  if poison:
    n_in, n_out = len(inputs), len(out_shape)
    inputs = [*inputs, *(jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape)]
    in_specs = [*in_specs, *out_specs]
    aliases = {n_in + i: i for i in range(n_out)}
    real_kernel = kernel
    kernel = lambda *refs: real_kernel(*refs[:n_in], *refs[n_in + n_out:])
  else:
    aliases = {}
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=name,
  )(*inputs)


def forward(q, k, v, plan: TilePlan, *, scale: float, num_warps: int = 4, num_stages: int = 3,
            interpret: bool = False, poison: bool = False, fast_exp: bool = False):
  """q, k, v (B, L, H, D), unpadded. Returns out (B, L, H, D) and lse (B, H, L_pad) float32 (base-2 units)."""
  batch, length, heads, head_dim = q.shape
  l_pad, bq, bk = plan.l_pad, plan.block_q, plan.block_k
  spec = _full_spec(length, head_dim)
  kernel = functools.partial(_fwd_kernel, qk_scale=scale * LOG2E, block_q=bq, block_k=bk, length=length,
                             fast_exp=fast_exp, interpret=interpret)
  rows = [jnp.asarray(plan.row_start), jnp.asarray(plan.row_end)]
  ranges = [_per_row(x, bq) for x in (plan.kv_lo, plan.kv_full_lo, plan.kv_full_hi, plan.kv_hi)]
  return _call(
      kernel, [q, k, v, *rows, *ranges],
      [out_struct(q.shape, q.dtype, q), out_struct((batch, heads, l_pad), jnp.float32, q)],
      in_specs=[spec] * 3 + [_vec_spec(l_pad)] * 6,
      out_specs=[spec, pl.BlockSpec((None, None, l_pad), lambda t, b, h: (b, h, 0))],
      grid=(l_pad // bq, batch, heads), num_warps=num_warps, num_stages=num_stages, interpret=interpret,
      poison=poison, name="block_sparse_attention_fwd")


def backward(q, k, v, out, lse, do, plan: TilePlan, *, scale: float, num_warps: int = 4, num_stages: int = 3,
             interpret: bool = False, poison: bool = False):
  """Returns (dq, dk, dv), each (B, L, H, D). The plan must use one tile size for queries and keys."""
  batch, length, heads, head_dim = q.shape
  if plan.block_q != plan.block_k:
    raise ValueError(f"backward needs block_q == block_k, got {plan.block_q} and {plan.block_k}.")
  block, l_pad = plan.block_q, plan.l_pad
  delta = softmax_bwd_delta(out, do, l_pad)  # in XLA: one cheap pass
  spec = _full_spec(length, head_dim)
  stat_spec = pl.BlockSpec((None, None, l_pad), lambda t, b, h: (b, h, 0))
  kernel = functools.partial(_bwd_kernel, qk_scale=scale * LOG2E, scale=scale, block=block, length=length)
  rows = [jnp.asarray(plan.row_start), jnp.asarray(plan.row_end)]
  ranges = [_per_row(x, block) for x in (plan.kv_lo, plan.kv_full_lo, plan.kv_full_hi, plan.kv_hi, plan.q_lo,
                                         plan.q_full_lo, plan.q_full_hi, plan.q_hi)]
  return _call(
      kernel, [q, k, v, do, lse, delta, *rows, *ranges],
      [out_struct(x.shape, x.dtype, x) for x in (q, k, v)],
      in_specs=[spec] * 4 + [stat_spec] * 2 + [_vec_spec(l_pad)] * 10, out_specs=[spec] * 3,
      grid=(l_pad // block, batch, heads), num_warps=num_warps, num_stages=num_stages, interpret=interpret,
      poison=poison, name="block_sparse_attention_bwd")
