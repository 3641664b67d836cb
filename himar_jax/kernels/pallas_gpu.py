"""Block-sparse attention on GPU: Pallas kernels through the Triton lowering (forward, fused dq/dk/dv backward).

Tensors keep the (batch, length, heads, head_dim) layout, unpadded: rows past L are loaded with masks (as zeros)
and never stored, so no padded copy of q, k, v or the outputs is made. Work comes from per-tile tables
(layout.RowTiles): a tile computes block rows from row0 and stores only the rows it owns; it steps over the keys
(forward, dq) or queries (dk/dv) from the first one any owned row sees, never loading what lies outside. Steps in
the table's "full" sub-range run without masks; the others mask with the per-row ranges. Tiles cut at scale
starts (short layouts) visit only their own scales' keys. Tiles run heaviest first.
Logits live in base 2 (scaled by scale*log2(e)) so the softmax uses exp2; lse is stored in the same units.

On Hopper, long layouts use the Mosaic GPU forward in pallas_mgpu.py instead, and its backward except at short
block-diagonal layouts (block_sparse.py dispatches); these kernels serve those, other GPUs, float32, other
head_dims and interpret mode. Measurements: bench/attention_notes.md.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from himar_jax.kernels.common import (MASK_VALUE, NT, TN, dot, out_struct, row_mask, run_steps,
                                      softmax_bwd_delta)
from himar_jax.kernels.layout import TABLE_WIDTH, TILE_FIELDS, RowTiles

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


def _store_rows(ref, start, value, end):
  """Stores rows [start, start + len(value)) of value that lie before row `end`."""
  ok = (start + lax.broadcasted_iota(jnp.int32, (value.shape[0], 1), 0)) < end
  pl_triton.store(ref.at[pl.ds(start, value.shape[0]), :], value.astype(ref.dtype), mask=ok)


def _tile_fields(table_ref, i):
  """Tile i's (row0, row_end, col0, steps, full_lo, full_hi) from a flat RowTiles table (TABLE_WIDTH per tile)."""
  entry = table_ref[pl.ds(i * TABLE_WIDTH, TABLE_WIDTH)]
  lane = lax.broadcasted_iota(jnp.int32, (TABLE_WIDTH,), 0)
  return tuple(jnp.sum(jnp.where(lane == f, entry, 0)) for f in range(len(TILE_FIELDS)))


def _fwd_kernel(q_ref, k_ref, v_ref, rs_ref, re_ref, table_ref, o_ref, lse_ref, *, qk_scale, block_q, block_k,
                length, fast_exp, interpret):
  row0, row_end, col0, steps, full_lo, full_hi = _tile_fields(table_ref, pl.program_id(0))
  rows = pl.ds(row0, block_q)
  q = _load_rows(q_ref, row0, block_q, length, True)
  rows_start, rows_end = rs_ref[rows], re_ref[rows]
  head_dim = q.shape[-1]

  def body(masked):
    def step(j, carry):
      acc, m_prev, l_prev = carry
      key0 = col0 + j * block_k
      k = _load_rows(k_ref, key0, block_k, length, masked)
      v = _load_rows(v_ref, key0, block_k, length, masked)
      s = dot(q, k, NT) * qk_scale
      if masked:
        s = jnp.where(row_mask(rows_start[:, None], rows_end[:, None], key0, block_k), s, MASK_VALUE)
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      alpha = jnp.exp2(m_prev - m_new)
      p, p_low = _exp2(s - m_new[:, None], fast_exp, interpret)
      l_new = alpha * l_prev + jnp.sum(p, axis=1)
      acc = acc * alpha[:, None] + dot(p_low if fast_exp else p.astype(v.dtype), v)
      return acc, m_new, l_new
    return step

  carry = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  acc, m, l = run_steps(body, 0, full_lo, full_hi, steps, carry)
  _store_rows(o_ref, row0, acc / l[:, None], row_end)
  owned = (row0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)) < row_end
  pl_triton.store(lse_ref.at[rows], m + jnp.log2(l), mask=owned)


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rs_ref, re_ref, q_table_ref, k_table_ref,
                dq_ref, dk_ref, dv_ref, *, qk_scale, scale, block, length):
  """Program t: dk, dv of key tile t (steps over its queries), then dq of query tile t (steps over its keys)."""
  t = pl.program_id(0)
  key0, key_end, qrow0, steps, full_lo, full_hi = _tile_fields(k_table_ref, t)
  k = _load_rows(k_ref, key0, block, length, True)
  v = _load_rows(v_ref, key0, block, length, True)
  head_dim = k.shape[-1]
  zeros = jnp.zeros((block, head_dim), jnp.float32)

  # dK, dV of key tile t. Masked steps may hold rows past L (zeros, and an lse the forward never wrote): their p
  # is selected away, not just pushed to exp2(MASK_VALUE - lse).
  def dkdv(masked):
    def step(i, carry):
      dk, dv = carry
      row0 = qrow0 + i * block
      rows = pl.ds(row0, block)
      q = _load_rows(q_ref, row0, block, length, masked)
      do = _load_rows(do_ref, row0, block, length, masked)
      s = dot(q, k, NT) * qk_scale
      p = jnp.exp2(s - lse_ref[rows][:, None])
      if masked:
        p = jnp.where(row_mask(rs_ref[rows][:, None], re_ref[rows][:, None], key0, block), p, 0.0)
      dv = dv + dot(p.astype(do.dtype), do, TN)
      dp = dot(do, v, NT)
      ds = p * (dp - delta_ref[rows][:, None])
      dk = dk + dot(ds.astype(q.dtype), q, TN)
      return dk, dv
    return step

  dk, dv = run_steps(dkdv, 0, full_lo, full_hi, steps, (zeros, zeros))
  _store_rows(dk_ref, key0, dk * scale, key_end)
  _store_rows(dv_ref, key0, dv, key_end)

  # dQ of query tile t.
  row0, row_end, col0, steps, full_lo, full_hi = _tile_fields(q_table_ref, t)
  rows = pl.ds(row0, block)
  q = _load_rows(q_ref, row0, block, length, True)
  do = _load_rows(do_ref, row0, block, length, True)
  lse = lse_ref[rows]
  delta = delta_ref[rows]
  rows_start, rows_end = rs_ref[rows], re_ref[rows]

  def dq_body(masked):
    def step(j, dq):
      col = col0 + j * block
      k = _load_rows(k_ref, col, block, length, masked)
      v = _load_rows(v_ref, col, block, length, masked)
      s = dot(q, k, NT) * qk_scale
      p = jnp.exp2(s - lse[:, None])
      if masked:
        p = jnp.where(row_mask(rows_start[:, None], rows_end[:, None], col, block), p, 0.0)
      dp = dot(do, v, NT)
      ds = p * (dp - delta[:, None])
      return dq + dot(ds.astype(k.dtype), k)
    return step

  dq = run_steps(dq_body, 0, full_lo, full_hi, steps, zeros)
  _store_rows(dq_ref, row0, dq * scale, row_end)


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


def _flat_table(tiles: RowTiles) -> jax.Array:
  return jnp.asarray(tiles.table.reshape(-1))


def forward(q, k, v, tiles: RowTiles, *, scale: float, num_warps: int = 4, num_stages: int = 3,
            interpret: bool = False, poison: bool = False, fast_exp: bool = False):
  """q, k, v (B, L, H, D), unpadded; tiles = query tiles over keys (layout.plan_attention_tiles). Returns out
  (B, L, H, D) and lse (B, H, l_ext) float32 in base-2 units (rows >= L unwritten)."""
  batch, length, heads, head_dim = q.shape
  if tiles.length != length:
    raise ValueError(f"tile plan for L={tiles.length} used with sequences of length {length}.")
  l_ext, bq, bk = tiles.l_ext, tiles.block_rows, tiles.block_cols
  spec = _full_spec(length, head_dim)
  kernel = functools.partial(_fwd_kernel, qk_scale=scale * LOG2E, block_q=bq, block_k=bk, length=length,
                             fast_exp=fast_exp, interpret=interpret)
  table = _flat_table(tiles)
  return _call(
      kernel, [q, k, v, jnp.asarray(tiles.starts), jnp.asarray(tiles.ends), table],
      [out_struct(q.shape, q.dtype, q), out_struct((batch, heads, l_ext), jnp.float32, q)],
      in_specs=[spec] * 3 + [_vec_spec(l_ext)] * 2 + [_vec_spec(table.shape[0])],
      out_specs=[spec, pl.BlockSpec((None, None, l_ext), lambda t, b, h: (b, h, 0))],
      grid=(tiles.num_tiles, batch, heads), num_warps=num_warps, num_stages=num_stages, interpret=interpret,
      poison=poison, name="block_sparse_attention_fwd")


def backward(q, k, v, out, lse, do, query_tiles: RowTiles, key_tiles: RowTiles, *, scale: float,
             num_warps: int = 4, num_stages: int = 3, interpret: bool = False, poison: bool = False):
  """Returns (dq, dk, dv), each (B, L, H, D). query_tiles / key_tiles: layout.plan_attention_tiles with one tile
  size for rows and steps; lse (B, H, >= L) from a forward (entries past L are never used unmasked)."""
  batch, length, heads, head_dim = q.shape
  block, l_ext = query_tiles.block_rows, query_tiles.l_ext
  for tiles in (query_tiles, key_tiles):
    if (tiles.block_rows, tiles.block_cols, tiles.l_ext, tiles.length) != (block, block, l_ext, length):
      raise ValueError(f"backward tiles must be square with one l_ext for L={length}: got "
                       f"{tiles.block_rows}x{tiles.block_cols}, l_ext {tiles.l_ext}, L {tiles.length}.")
  if query_tiles.num_tiles != key_tiles.num_tiles:
    raise ValueError(f"query and key tile counts differ ({query_tiles.num_tiles} vs {key_tiles.num_tiles}).")
  if lse.shape[-1] != l_ext:  # e.g. from the Mosaic GPU forward's padded length
    lse = jnp.pad(lse[..., :length], [(0, 0), (0, 0), (0, l_ext - length)])
  delta = softmax_bwd_delta(out, do, l_ext)  # in XLA: one cheap pass
  spec = _full_spec(length, head_dim)
  stat_spec = pl.BlockSpec((None, None, l_ext), lambda t, b, h: (b, h, 0))
  kernel = functools.partial(_bwd_kernel, qk_scale=scale * LOG2E, scale=scale, block=block, length=length)
  tables = [_flat_table(query_tiles), _flat_table(key_tiles)]
  return _call(
      kernel, [q, k, v, do, lse, delta, jnp.asarray(query_tiles.starts), jnp.asarray(query_tiles.ends), *tables],
      [out_struct(x.shape, x.dtype, x) for x in (q, k, v)],
      in_specs=[spec] * 4 + [stat_spec] * 2 + [_vec_spec(l_ext)] * 2 + [_vec_spec(t.shape[0]) for t in tables],
      out_specs=[spec] * 3, grid=(query_tiles.num_tiles, batch, heads), num_warps=num_warps,
      num_stages=num_stages, interpret=interpret, poison=poison, name="block_sparse_attention_bwd")
