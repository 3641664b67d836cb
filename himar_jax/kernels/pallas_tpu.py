"""Block-sparse attention on TPU: Pallas Mosaic TPU kernels (forward, dq, dk/dv) that skip empty tiles.

Kernels work in (batch, heads, length, head_dim) so blocks are (tile, head_dim) matrices (Mosaic wants the last
two block dims to be whole or (8, 128)-aligned); the wrapper in block_sparse.py transposes. The innermost grid
axis walks the visited tiles of a row of tiles: its length is the longest visited range, the block index is
clamped to the tile's own range (so a step past it re-uses the resident block: no DMA), and the compute is
skipped with pl.when. Tile ranges come in through scalar prefetch (SMEM). Softmax in natural-log units.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from himar_jax.kernels.common import MASK_VALUE, NT, TN, dot, out_struct, row_mask
from himar_jax.kernels.layout import TilePlan


def _fwd_kernel(lo_ref, n_ref, q_ref, k_ref, v_ref, rs_ref, re_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale,
                block_k):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j < n_ref[i])
  def _step():
    col0 = (lo_ref[i] + j) * block_k
    s = dot(q_ref[...], k_ref[...], NT) * scale
    s = jnp.where(row_mask(rs_ref[...], re_ref[...], col0, block_k), s, MASK_VALUE)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + dot(p.astype(v_ref.dtype), v_ref[...])
    m_sc[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _dq_kernel(lo_ref, n_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rs_ref, re_ref, dq_ref, dq_sc, *,
               scale, block_k):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(j < n_ref[i])
  def _step():
    col0 = (lo_ref[i] + j) * block_k
    k = k_ref[...]
    s = dot(q_ref[...], k, NT) * scale
    s = jnp.where(row_mask(rs_ref[...], re_ref[...], col0, block_k), s, MASK_VALUE)
    p = jnp.exp(s - lse_ref[...])
    dp = dot(do_ref[...], v_ref[...], NT)
    ds = p * (dp - delta_ref[...])
    dq_sc[...] += dot(ds.astype(k.dtype), k)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkdv_kernel(lo_ref, n_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rs_ref, re_ref, dk_ref, dv_ref,
                 dk_sc, dv_sc, *, scale, block_k):
  t, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(j < n_ref[t])
  def _step():
    q, do = q_ref[...], do_ref[...]
    s = dot(q, k_ref[...], NT) * scale
    s = jnp.where(row_mask(rs_ref[...], re_ref[...], t * block_k, block_k), s, MASK_VALUE)
    p = jnp.exp(s - lse_ref[...])
    dv_sc[...] += dot(p.astype(do.dtype), do, TN)
    dp = dot(do, v_ref[...], NT)
    ds = p * (dp - delta_ref[...])
    dk_sc[...] += dot(ds.astype(q.dtype), q, TN)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _ranges(lo, hi):
  lo, hi = np.asarray(lo, np.int32), np.asarray(hi, np.int32)
  return jnp.asarray(lo), jnp.asarray(hi - lo), int(np.max(hi - lo))


def _rows(plan: TilePlan):
  return (jnp.asarray(plan.row_start.reshape(-1, 1)), jnp.asarray(plan.row_end.reshape(-1, 1)))


def _params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def forward(q, k, v, plan: TilePlan, *, scale: float, interpret=False):
  """q, k, v: (B, H, L_pad, D). Returns out (B, H, L_pad, D) and lse (B, H, L_pad, 1) float32 (natural log)."""
  batch, heads, l_pad, head_dim = q.shape
  bq, bk = plan.block_q, plan.block_k
  lo, n, steps = _ranges(plan.kv_lo, plan.kv_hi)
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, lo, n: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, head_dim),
                         lambda b, h, i, j, lo, n: (b, h, lo[i] + jnp.minimum(j, n[i] - 1), 0))
  row_spec = pl.BlockSpec((bq, 1), lambda b, h, i, j, lo, n: (i, 0))
  lse_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, lo, n: (b, h, i, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(batch, heads, l_pad // bq, steps),
      in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec], out_specs=[q_spec, lse_spec],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, head_dim), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, block_k=bk), grid_spec=grid_spec,
      out_shape=[out_struct(q.shape, q.dtype, q), out_struct((batch, heads, l_pad, 1), jnp.float32, q)],
      compiler_params=_params(), interpret=interpret, name="block_sparse_attention_fwd_tpu",
  )(lo, n, q, k, v, *_rows(plan))


def backward(q, k, v, out, lse, do, plan: TilePlan, *, scale: float, interpret=False):
  """All (B, H, L_pad, D) except lse (B, H, L_pad, 1). Returns (dq, dk, dv)."""
  batch, heads, l_pad, head_dim = q.shape
  bq, bk = plan.block_q, plan.block_k
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  rows = _rows(plan)

  # dq: query tile i visits key tiles [kv_lo, kv_hi), like the forward.
  lo, n, steps = _ranges(plan.kv_lo, plan.kv_hi)
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, lo, n: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, head_dim),
                         lambda b, h, i, j, lo, n: (b, h, lo[i] + jnp.minimum(j, n[i] - 1), 0))
  stat_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, lo, n: (b, h, i, 0))
  row_spec = pl.BlockSpec((bq, 1), lambda b, h, i, j, lo, n: (i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=bk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(batch, heads, l_pad // bq, steps),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec, row_spec, row_spec],
          out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)]),
      out_shape=out_struct(q.shape, q.dtype, q),
      compiler_params=_params(), interpret=interpret, name="block_sparse_attention_dq_tpu",
  )(lo, n, q, k, v, do, lse, delta, *rows)

  # dk, dv: key tile t visits query tiles [q_lo, q_hi).
  lo, n, steps = _ranges(plan.q_lo, plan.q_hi)

  def q_tile(b, h, t, j, lo, n):
    return lo[t] + jnp.minimum(j, n[t] - 1)

  qt_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, t, j, lo, n: (b, h, q_tile(b, h, t, j, lo, n), 0))
  qstat_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, t, j, lo, n: (b, h, q_tile(b, h, t, j, lo, n), 0))
  qrow_spec = pl.BlockSpec((bq, 1), lambda b, h, t, j, lo, n: (q_tile(b, h, t, j, lo, n), 0))
  k_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, t, j, lo, n: (b, h, t, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=scale, block_k=bk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(batch, heads, l_pad // bk, steps),
          in_specs=[qt_spec, k_spec, k_spec, qt_spec, qstat_spec, qstat_spec, qrow_spec, qrow_spec],
          out_specs=[k_spec, k_spec],
          scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)]),
      out_shape=[out_struct(k.shape, k.dtype, k), out_struct(v.shape, v.dtype, v)],
      compiler_params=_params(), interpret=interpret, name="block_sparse_attention_dkdv_tpu",
  )(lo, n, q, k, v, do, lse, delta, *rows)
  return dq, dk, dv
