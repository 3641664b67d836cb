"""Block-sparse attention on GPU: Pallas kernels through the Triton lowering (forward, fused dq/dk/dv backward).

Tensors keep the (batch, length, heads, head_dim) layout; length is already padded to the tile plan's l_pad.
Each query tile loops over key tiles [kv_lo, kv_hi) only, each key tile (backward) over query tiles [q_lo, q_hi);
tiles outside are never loaded. Within a visited tile the per-row range [row_start, row_end) masks logits.
Logits live in base 2 (scaled by scale*log2(e)) so the softmax uses exp2; lse is stored in the same units.

Why Triton and not Mosaic GPU: see bench/attention_notes.md (the Mosaic GPU path was not finished this session).
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

from himar_jax.kernels.layout import TilePlan

# Finite "minus infinity": exp2(MASK - anything finite) underflows to 0, and MASK - MASK stays finite (no NaN).
MASK_VALUE = -1e30
LOG2E = math.log2(math.e)


def _row_mask(rows_start, rows_end, col0, block_k):
  cols = col0 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  return (cols >= rows_start[:, None]) & (cols < rows_end[:, None])


def _fwd_kernel(q_ref, k_ref, v_ref, rs_ref, re_ref, lo_ref, hi_ref, o_ref, lse_ref, *, qk_scale, block_k):
  block_q, head_dim = q_ref.shape
  q = q_ref[...]
  rows_start, rows_end = rs_ref[...], re_ref[...]
  lo, hi = jnp.min(lo_ref[...]), jnp.max(hi_ref[...])

  def body(j, carry):
    acc, m_prev, l_prev = carry
    col0 = j * block_k
    k = k_ref[pl.ds(col0, block_k), :]
    v = v_ref[pl.ds(col0, block_k), :]
    s = pl.dot(q, k, trans_b=True) * qk_scale
    s = jnp.where(_row_mask(rows_start, rows_end, col0, block_k), s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + pl.dot(p.astype(v.dtype), v)
    return acc, m_new, l_new

  acc = jnp.zeros((block_q, head_dim), jnp.float32)
  m = jnp.full((block_q,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = lax.fori_loop(lo, hi, body, (acc, m, l))
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rs_ref, re_ref, kv_lo_ref, kv_hi_ref, q_lo_ref,
                q_hi_ref, dq_ref, dk_ref, dv_ref, *, qk_scale, scale, block):
  """Program t: dk, dv of key tile t (loop over its query tiles), then dq of query tile t (loop over its keys)."""
  head_dim = q_ref.shape[-1]
  t = pl.program_id(0)
  tile = pl.ds(t * block, block)

  # dK, dV of key tile t.
  k = k_ref[tile, :]
  v = v_ref[tile, :]
  col0 = t * block

  def dkdv_body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * block, block)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    s = pl.dot(q, k, trans_b=True) * qk_scale
    s = jnp.where(_row_mask(rs_ref[rows], re_ref[rows], col0, block), s, MASK_VALUE)
    p = jnp.exp2(s - lse_ref[rows][:, None])
    dv = dv + pl.dot(p.astype(do.dtype), do, trans_a=True)
    dp = pl.dot(do, v, trans_b=True)
    ds = p * (dp - delta_ref[rows][:, None])
    dk = dk + pl.dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros((block, head_dim), jnp.float32)
  q_lo, q_hi = jnp.min(q_lo_ref[...]), jnp.max(q_hi_ref[...])
  dk, dv = lax.fori_loop(q_lo, q_hi, dkdv_body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

  # dQ of query tile t.
  q = q_ref[tile, :]
  do = do_ref[tile, :]
  lse = lse_ref[tile]
  delta = delta_ref[tile]
  rows_start, rows_end = rs_ref[tile], re_ref[tile]

  def dq_body(j, dq):
    c0 = j * block
    k = k_ref[pl.ds(c0, block), :]
    v = v_ref[pl.ds(c0, block), :]
    s = pl.dot(q, k, trans_b=True) * qk_scale
    s = jnp.where(_row_mask(rows_start, rows_end, c0, block), s, MASK_VALUE)
    p = jnp.exp2(s - lse[:, None])
    dp = pl.dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + pl.dot(ds.astype(k.dtype), k)

  kv_lo, kv_hi = jnp.min(kv_lo_ref[...]), jnp.max(kv_hi_ref[...])
  dq = lax.fori_loop(kv_lo, kv_hi, dq_body, zeros)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _per_row(tile_values: np.ndarray, block: int) -> jax.Array:
  """Broadcasts per-tile int32 values to per-row vectors (a tile's rows load one block of them)."""
  return jnp.asarray(np.repeat(tile_values, block).astype(np.int32))


def forward(q, k, v, plan: TilePlan, *, scale: float, num_warps: int = 4, num_stages: int = 2,
            interpret: bool = False):
  """Returns (out (B, L_pad, H, D), lse (B, H, L_pad) float32 in base-2 units of the scaled logits)."""
  batch, l_pad, heads, head_dim = q.shape
  bq, bk = plan.block_q, plan.block_k
  grid = (l_pad // bq, batch, heads)
  q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, l_pad, None, head_dim), lambda i, b, h: (b, 0, h, 0))
  row_spec = pl.BlockSpec((bq,), lambda i, b, h: (i,))
  kernel = functools.partial(_fwd_kernel, qk_scale=scale * LOG2E, block_k=bk)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec, row_spec, row_spec],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, l_pad), jnp.float32)],
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="block_sparse_attention_fwd",
  )(q, k, v, jnp.asarray(plan.row_start), jnp.asarray(plan.row_end), _per_row(plan.kv_lo, bq),
    _per_row(plan.kv_hi, bq))


def backward(q, k, v, out, lse, do, plan: TilePlan, *, scale: float, num_warps: int = 4, num_stages: int = 2,
             interpret: bool = False):
  """Returns (dq, dk, dv). The plan must use one tile size for queries and keys."""
  batch, l_pad, heads, head_dim = q.shape
  if plan.block_q != plan.block_k:
    raise ValueError(f"backward needs block_q == block_k, got {plan.block_q} and {plan.block_k}.")
  block = plan.block_q
  # delta_r = sum_d do * o (the softmax-backward row term), in float32, in XLA: one cheap pass.
  delta = jnp.einsum("blhd,blhd->bhl", do.astype(jnp.float32), out.astype(jnp.float32))
  full_spec = pl.BlockSpec((None, l_pad, None, head_dim), lambda t, b, h: (b, 0, h, 0))
  tile_spec = pl.BlockSpec((None, block, None, head_dim), lambda t, b, h: (b, t, h, 0))
  row_full = pl.BlockSpec((None, None, l_pad), lambda t, b, h: (b, h, 0))
  vec_full = pl.BlockSpec((l_pad,), lambda t, b, h: (0,))
  vec_tile = pl.BlockSpec((block,), lambda t, b, h: (t,))
  kernel = functools.partial(_bwd_kernel, qk_scale=scale * LOG2E, scale=scale, block=block)
  return pl.pallas_call(
      kernel,
      grid=(l_pad // block, batch, heads),
      in_specs=[full_spec] * 4 + [row_full, row_full, vec_full, vec_full] + [vec_tile] * 4,
      out_specs=[tile_spec] * 3,
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
      compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="block_sparse_attention_bwd",
  )(q, k, v, do, lse, delta, jnp.asarray(plan.row_start), jnp.asarray(plan.row_end), _per_row(plan.kv_lo, block),
    _per_row(plan.kv_hi, block), _per_row(plan.q_lo, block), _per_row(plan.q_hi, block))
