"""Block-sparse attention on Hopper: Pallas Mosaic GPU kernels (wgmma, TMA, warp specialization), forward and backward.

Structure adapted from JAX's FlashAttention-3 example `jax/experimental/pallas/ops/gpu/attention_mgpu.py`
(Copyright 2024 The JAX Authors, Apache License 2.0): forward: one CTA holds two consumer warpgroups (64 query rows
each, wgmma from shared memory, softmax in registers, "ping-pong" scheduled through a shared barrier so that one
warpgroup's softmax overlaps the other's matmuls) and one producer warpgroup that streams key and value tiles
into a ring of `stages` shared-memory slots by TMA. Backward: as that file's `_attention_bwd`, a dq kernel (rows =
query tiles, key/value tiles streamed) and a dk/dv kernel (rows = key tiles, query / dO / lse / delta streamed),
here with the same two-consumer + producer CTA as our forward (no ping-pong barrier).

What is ours: the streamed loop of a CTA runs over the tile range of its two row tiles only (a per-tile table
from layout.plan_tiles, read as scalars from global memory, kv_lo .. kv_hi; q_lo .. q_hi for dk/dv), split per
warpgroup into
  skip  steps of the CTA's range outside the warpgroup's own range (it only keeps the barriers in step),
  masked  steps at the range's ends (per-row [row_start, row_end) masks, rows loaded by TMA; for dk/dv the range of
          queries that see each key, key_query_ranges),
  full  steps where every row sees every key (no mask).
Tiles outside the range are never loaded. The forward's CTAs may start `row_shift` rows before row 0, so that they
end at L where that saves key steps (block-causal layouts: tile_table, best_row_shift). Work items (a pair of 64-row
tiles of one batch row and head) run heaviest first, either one CTA each or on persistent CTAs that loop over items
(the producer then prefetches the next item's tiles while the consumers finish; ring slots and barrier phases
continue across items). Tensors stay (batch, length, heads, head_dim), unpadded: TMA fills rows past L with zeros
on load and drops them on store.
Copies through wgmma's tiled shared-memory view need L to be a multiple of 8 (Mosaic's TMA tiling); at head_dim 64
other lengths copy through an untiled view of the same bytes (untiled_copy_views), and at head_dim 128 they are
padded by < 8 rows (a copy of q, k, v and a slice of the output). Logits are in
base 2 (scaled by scale * log2(e)) and lse = m + log2(l) is stored in those units (both backwards expect that).
The backward's exponentials are float32 (bf16 ones doubled the gradient error; bench/attention_notes.md).

Runs only on a Hopper GPU: jax 0.10.2's Mosaic GPU interpret mode has no rules for run_state / layout_cast (and
JAX's own FA3 example, shimmed around those, deadlocked in it), so on CPU the tests lower these kernels to Mosaic
GPU MLIR (catching trace, layout and TMA-shape errors) and test the dispatch around them; bench/attention.py checks
their numbers on the H100.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from himar_jax.kernels.common import match_vma, out_struct, run_steps, softmax_bwd_delta
from himar_jax.kernels.layout import TilePlan, key_ranges

try:  # Mosaic GPU ships with jax, but keep this module importable where a jax build lacks it.
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
  pl = plgpu = None

LOG2E = math.log2(math.e)
BLOCK_Q = 64  # rows per consumer warpgroup (one wgmma M tile); a CTA covers 2 * BLOCK_Q rows
CONSUMERS = 2
ROW_ALIGN = 8  # TMA tiling rows
SWIZZLE_BYTES = 128
UNTILED_HEAD_DIM = SWIZZLE_BYTES // 2  # untiled_copy_views: one 16-bit row per swizzle row
TABLE_COLS = 8  # per query tile: lo, full_lo, full_hi, hi, cta_lo, cta_hi, (forward: row0; backward: CTA rank),
#                (forward: kv_start)


def available() -> bool:
  return plgpu is not None


def load_vector(ref, layout):
  """plgpu.load of a whole ref (jax 0.11 deprecates the separate index argument that 0.10 requires)."""
  if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def tile_table(plan: TilePlan, align_keys: bool = True, row_shift: int = 0) -> np.ndarray:
  """(n_query_tiles, TABLE_COLS) int32 for the forward: per 64-row tile its key steps [lo, hi) with the unmasked
  [full_lo, full_hi) inside, its CTA's union [cta_lo, cta_hi) of steps (columns 4, 5), in column 6 its first row
  and in column 7 the CTA's first key, kv_start. Step j covers keys kv_start + j * block_k + [0, block_k): the steps
  start at the first key any of the CTA's rows sees (rounded down to a multiple of ROW_ALIGN, as TMA's row tiling
  needs), not at a multiple of block_k, so a scale that does not start on a block_k boundary costs no extra step
  (L2240: 8 instead of 9 steps of 128 keys for each tile of its last, 1024-token scale). Full steps: every row of
  the tile is a real row that sees every key of the step. align_keys=False: kv_start = 0 (steps on a block_k grid).

  row_shift (a multiple of ROW_ALIGN, see best_row_shift): CTA c covers the rows c * 128 - row_shift + [0, 128)
  instead of c * 128 + [0, 128), so the CTA boundaries can fall where the key ranges change (L680 block-causal:
  23 instead of 28 steps of 128 keys per head). Rows before 0 belong to no tile: a tile that starts before row 0
  computes rows [0, 64) (column 6 is 0) but owns and stores only head_rows(row_shift) of them, and a tile wholly
  before row 0 owns none (its range is empty; its CTA's other tile does the work). Ranges count owned rows only.
  """
  if plan.block_q != BLOCK_Q or plan.l_pad % (CONSUMERS * BLOCK_Q):
    raise ValueError(f"Mosaic GPU forward needs block_q={BLOCK_Q} and l_pad a multiple of {CONSUMERS * BLOCK_Q}, "
                     f"got block_q={plan.block_q}, l_pad={plan.l_pad}.")
  _check_row_shift(row_shift, plan)
  bk = plan.block_k
  n_tiles = plan.l_pad // BLOCK_Q
  virtual = np.arange(n_tiles * BLOCK_Q).reshape(-1, CONSUMERS, BLOCK_Q) - row_shift  # rows before 0 are < 0
  owned = virtual >= 0
  index = np.maximum(virtual, 0)
  big = np.iinfo(np.int32).max
  starts = np.where(owned, plan.row_start[index], big).astype(np.int64)
  ends = np.where(owned, plan.row_end[index], -1).astype(np.int64)
  tile_owns = owned.any(axis=2)
  kv_start = starts.min(axis=(1, 2)) // ROW_ALIGN * ROW_ALIGN * int(align_keys)  # per CTA (owned rows only)
  base = kv_start[:, None]
  lo = (starts.min(2) - base) // bk
  hi = -(-(ends.max(2) - base) // bk)
  full_lo = -(-(starts.max(2) - base) // bk)
  full_hi = (ends.min(2) - base) // bk
  # Padding rows (their range lies past the last real key) and tiles with a row before 0 never run unmasked steps.
  real = (ends.max(2) <= plan.length) & owned.all(axis=2)
  none = (full_hi <= full_lo) | ~real
  full_lo, full_hi = np.where(none, hi, full_lo), np.where(none, hi, full_hi)
  cta_lo = np.where(tile_owns, lo, big).min(1)
  cta_hi = np.where(tile_owns, hi, -1).max(1)
  # A tile that owns no row runs no step of its own: an empty range at its CTA's start.
  empty = ~tile_owns
  lo, full_lo, full_hi, hi = (np.where(empty, cta_lo[:, None], col) for col in (lo, full_lo, full_hi, hi))
  row0 = index[:, :, 0]
  cols = (lo, full_lo, full_hi, hi, np.repeat(cta_lo[:, None], CONSUMERS, 1), np.repeat(cta_hi[:, None], CONSUMERS, 1),
          row0, np.repeat(base, CONSUMERS, 1))
  return np.stack([c.reshape(-1) for c in cols], axis=1).astype(np.int32)


def _check_row_shift(row_shift: int, plan: TilePlan) -> None:
  """The shifted CTAs must still cover rows [0, L) inside plan.l_pad rows: 0 <= row_shift <= l_pad - L."""
  if row_shift % ROW_ALIGN or not 0 <= row_shift <= plan.l_pad - plan.length:
    raise ValueError(f"row_shift={row_shift} must be a multiple of {ROW_ALIGN} in [0, l_pad - L = "
                     f"{plan.l_pad - plan.length}] (the CTAs' rows then still cover [0, L)).")


def head_rows(row_shift: int) -> tuple[int, int]:
  """(first tile that stores rows, rows it stores) under a row shift: tiles before it lie wholly before row 0."""
  return row_shift // BLOCK_Q, BLOCK_Q - row_shift % BLOCK_Q


def cta_steps(table: np.ndarray) -> int:
  """Key steps the forward's CTAs run for one (batch row, head): the sum of their union ranges (the cost model of
  best_row_shift)."""
  return int(np.sum(table[::CONSUMERS, 5] - table[::CONSUMERS, 4]))


def best_row_shift(plan: TilePlan, align_keys: bool = True) -> int:
  """The row_shift (multiple of ROW_ALIGN in [0, l_pad - L]) whose CTAs run the fewest key steps; ties: the
  smallest. Block-causal ranges all start at key 0 and grow at scale ends, so CTAs ending at L (row_shift =
  l_pad - L) spend fewer rows on the long ranges of the last scale (L680: 23 vs 28 steps; L2240: 213 vs 222)."""
  shifts = range(0, plan.l_pad - plan.length + 1, ROW_ALIGN)
  return min(shifts, key=lambda s: (cta_steps(tile_table(plan, align_keys, s)), s))


def _wgmma_transforms():
  """wgmma's shared-memory operand layout: (8, 64) tiles, 128-byte swizzle."""
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(SWIZZLE_BYTES))


def untiled_copy_views(shapes, dtype):
  """Shared buffers of the given (lead, rows, 64) shapes seen two ways (one RefUnion): (wgmma views with the (8, 64)
  tiling and the 128-byte swizzle, TMA views with the swizzle only).

  Why: a TMA copy through the tiled view describes the global array in 8-row tiles, so Mosaic GPU needs its row
  count to be a multiple of 8 (L = 9451 would cost a padding copy of q, k, v and a slice of the output). The
  untiled view's TMA box is rows x 64 of the (B, L, H, D) array itself: rows past L are zero-filled on load and
  dropped on store, like any out-of-bounds box. At head_dim 64 a row is one 128-byte swizzle row, so row r, column
  c sits at byte 128 r + 2 c (before the swizzle) in both views, and the swizzle (a function of that address) is
  the same: the two views alias byte for byte. (At head_dim 128 the tiled view interleaves the two 64-column halves
  in 8-row tiles, and the views would differ.)
  """
  tiled = tuple(plgpu.SMEM(shape, dtype, transforms=_wgmma_transforms()) for shape in shapes)
  untiled = tuple(plgpu.SMEM(shape, dtype, transforms=(plgpu.SwizzleTransform(SWIZZLE_BYTES),)) for shape in shapes)
  return plgpu.RefUnion(tiled, untiled)


def _resolve_untiled_copies(untiled_copies: bool | None, length: int, head_dim: int) -> bool:
  """The forward's and backward's untiled_copies argument resolved: None -> where it serves (L % 8 != 0 at head_dim
  64); True checked against head_dim."""
  if untiled_copies is None:
    return bool(length % ROW_ALIGN) and head_dim == UNTILED_HEAD_DIM
  if untiled_copies and head_dim != UNTILED_HEAD_DIM:
    raise ValueError(f"untiled_copies needs head_dim {UNTILED_HEAD_DIM} (one 128-byte swizzle row), got {head_dim}.")
  return bool(untiled_copies)


def _pad_rows(x, length: int):
  """x (B, L, H, D) padded by < 8 rows to a multiple of ROW_ALIGN: what copies through the tiled views need."""
  return jnp.pad(x, [(0, 0), (0, -length % ROW_ALIGN), (0, 0), (0, 0)])


def _range_table(lo, full_lo, full_hi, hi) -> np.ndarray:
  """(n_tiles, TABLE_COLS) int32 per 64-row tile: its streamed-tile range [lo, hi) with the unmasked [full_lo,
  full_hi) inside, its CTA's union range, and in column 6 of row 2r the CTA of rank r, heaviest (longest union) first
  (ties: the later CTA first). The forward orders CTAs itself (last first) and ignores column 6."""
  cta_lo = lo.reshape(-1, CONSUMERS).min(1)
  cta_hi = hi.reshape(-1, CONSUMERS).max(1)
  n_cta = cta_lo.shape[0]
  order = np.lexsort((-np.arange(n_cta), -(cta_hi - cta_lo)))  # by length descending, then index descending
  rank_col = np.zeros((n_cta, CONSUMERS), np.int64)
  rank_col[:, 0] = order
  zero = np.zeros(lo.shape[0], np.int64)
  cols = (lo, full_lo, full_hi, hi, np.repeat(cta_lo, CONSUMERS), np.repeat(cta_hi, CONSUMERS),
          rank_col.reshape(-1), zero)
  return np.stack(cols, axis=1).astype(np.int32)


def _range_steps(bounds, skip_step, body, carry):
  """One consumer warpgroup's steps over its CTA's union range: skip / masked / full / masked / skip.

  bounds = (cta_lo, lo, full_lo, full_hi, hi, cta_hi); skip_step(s, None) only keeps the barriers in step,
  body(masked) is the (s, carry) -> carry step function with or without the per-row masks.
  """
  cta_lo, lo, full_lo, full_hi, hi, cta_hi = bounds
  lax.fori_loop(cta_lo, lo, skip_step, None)
  carry = run_steps(body, lo, full_lo, full_hi, hi, carry)
  lax.fori_loop(hi, cta_hi, skip_step, None)
  return carry


def persistent_programs(sm_count: int, n_cta: int, n_items: int) -> int:
  """Persistent CTAs: the most <= sm_count whose count is coprime to the query-tile pairs per (batch, head).

  Program p takes items p, p + G, p + 2G, ... with tiles fastest in the item order; gcd(G, n_cta) = 1 makes each
  program cycle through all tiles (heavy and light) instead of meeting the same tile every time (imbalance).
  """
  count = max(1, min(int(sm_count), n_items))
  while count > 1 and math.gcd(count, n_cta) != 1:
    count -= 1
  return count


def forward(q, k, v, plan: TilePlan, *, scale: float, stages: int = 2, consumer_registers: int = 232,
            programs: int | None = None, align_keys: bool = True, untiled_copies: bool | None = None,
            row_shift: int | None = None):
  """q, k, v (B, L, H, D) bfloat16/float16, unpadded. Returns out (B, L, H, D), lse (B, H, L_pad) float32 (base 2).

  programs: None launches one CTA per work item (a 128-row query tile of one batch row and head); an int (the SM
  count) launches about that many persistent CTAs (persistent_programs), each looping over items i, i + G, ...: the
  producer then streams the next item's keys while the consumers finish the previous one, hiding the per-item
  start and finish. align_keys: key steps start at each CTA's first key (tile_table), else on a block_k grid.
  untiled_copies: TMA copies through untiled views of the shared buffers (untiled_copy_views); None: when L is not
  a multiple of 8 and head_dim is 64, the case it serves. row_shift: the CTAs' rows start row_shift rows before
  row 0 (tile_table); None: best_row_shift. With row_shift > 0 rows of lse past L may be left unwritten.
  """
  if plgpu is None:
    raise RuntimeError("jax.experimental.pallas.mosaic_gpu is not available in this jax build.")
  length = q.shape[1]
  untiled_copies = _resolve_untiled_copies(untiled_copies, length, q.shape[3])
  if length % ROW_ALIGN and not untiled_copies:
    # TMA with the (8, 64) wgmma tiling needs the row count of the global array to be a multiple of 8 (Mosaic GPU
    # rejects other lengths; its round-down mode would drop the last rows). Pad by < 8 rows; costs a copy.
    out, lse = forward(*(_pad_rows(x, length) for x in (q, k, v)), plan, scale=scale, stages=stages,
                       consumer_registers=consumer_registers, programs=programs, align_keys=align_keys,
                       untiled_copies=False, row_shift=row_shift)
    return out[:, :length], lse
  batch, length, heads, head_dim = q.shape
  dtype = q.dtype
  block_q, block_k, l_pad = BLOCK_Q, plan.block_k, plan.l_pad
  if block_k % 64 or head_dim % 64:
    raise ValueError(f"Mosaic GPU forward needs block_k and head_dim multiples of 64, got {block_k}, {head_dim}.")
  if stages < 2:
    raise ValueError(f"stages={stages} must be >= 2.")
  n_cta = l_pad // (CONSUMERS * block_q)
  n_items = n_cta * heads * batch
  n_programs = n_items if programs is None else persistent_programs(programs, n_cta, n_items)
  row_shift = best_row_shift(plan, align_keys) if row_shift is None else int(row_shift)
  table = jnp.asarray(tile_table(plan, align_keys, row_shift))
  first_stored_tile, first_stored_rows = head_rows(row_shift)
  row_start, row_end = jnp.asarray(plan.row_start), jnp.asarray(plan.row_end)
  qk_scale = scale * LOG2E

  def item_coords(item):
    """Work item -> (query-tile pair, head, batch); tiles fastest (one head's keys stay in L2), heaviest first."""
    cta = (n_cta - 1) - lax.rem(item, jnp.int32(n_cta))
    bh = lax.div(item, jnp.int32(n_cta))
    return cta, lax.rem(bh, jnp.int32(heads)), lax.div(bh, jnp.int32(heads))

  def kernel(q_ref, k_ref, v_ref, rs_ref, re_ref, tab_ref, out_ref, lse_ref, smem, barriers):
    operands, rows_smem2, lse_smem2 = smem
    # (wgmma views, TMA views) of the q/out, k and v buffers: one set, or two views of the same bytes.
    (qo_smem2, k_smem, v_smem), (qo_copy2, k_copy, v_copy) = operands if untiled_copies else (operands, operands)
    (k_ready, v_ready, q_ready, rs_ready, re_ready, k_done, v_done, schedule) = barriers
    program = lax.axis_index("program")
    wg = lax.axis_index("wg")
    # This program's items: program, program + n_programs, ...
    my_items = lax.div(jnp.int32(n_items) - program + (n_programs - 1), jnp.int32(n_programs))

    def item_range(item):
      cta, h, b = item_coords(item)
      first = CONSUMERS * cta
      return cta, h, b, first, tab_ref[first, 4], tab_ref[first, 5], tab_ref[first, 7]

    def schedule_barrier():
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      plgpu.set_max_registers(consumer_registers, action="increase")
      qo_smem, qo_copy = qo_smem2.at[wg], qo_copy2.at[wg]
      lse_smem = lse_smem2.at[wg]
      rows_smem = rows_smem2.at[wg]

      def run_item(n, step_base):
        # step_base: key/value steps this program consumed before (the ring slot of a step continues across items).
        _, h, b, first, cta_lo, cta_hi, kv_start = item_range(program + n * n_programs)
        tile = first + wg
        row0 = pl.multiple_of(tab_ref[tile, 6], ROW_ALIGN)  # TMA's row tiling needs the hint (tile_table)
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, block_q), h], qo_copy, q_ready.at[wg])
        plgpu.copy_gmem_to_smem(rs_ref.at[pl.ds(row0, block_q)], rows_smem.at[0], rs_ready.at[wg])
        plgpu.copy_gmem_to_smem(re_ref.at[pl.ds(row0, block_q)], rows_smem.at[1], re_ready.at[wg])
        kv_lo, kv_full_lo = tab_ref[tile, 0], tab_ref[tile, 1]
        kv_full_hi, kv_hi = tab_ref[tile, 2], tab_ref[tile, 3]

        def slot_of(step):
          return lax.rem(step_base + step - cta_lo, jnp.int32(stages))

        plgpu.barrier_wait(q_ready.at[wg])
        plgpu.barrier_wait(rs_ready.at[wg])
        plgpu.barrier_wait(re_ready.at[wg])
        rows_start = load_vector(rows_smem.at[0], plgpu.Layout.WGMMA.reduce(1))
        rows_end = load_vector(rows_smem.at[1], plgpu.Layout.WGMMA.reduce(1))

        m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

        plgpu.barrier_wait(k_ready.at[slot_of(cta_lo)])  # every item has at least one step
        pl.when(wg == 1)(schedule_barrier)

        def wait_next_k(step):
          @pl.when(step + 1 < cta_hi)
          def _():
            plgpu.barrier_wait(k_ready.at[slot_of(step + 1)])

        def skip_step(step, carry):
          # Outside this warpgroup's range: release the slot and keep both barrier sequences in step.
          slot = slot_of(step)
          plgpu.barrier_arrive(k_done.at[slot])
          schedule_barrier()
          plgpu.barrier_wait(v_ready.at[slot])
          plgpu.barrier_arrive(v_done.at[slot])
          schedule_barrier()
          wait_next_k(step)
          return carry

        def step_fn(masked):
          def step(kv_step, carry):
            acc, m_i, l_i = carry
            slot = slot_of(kv_step)

            def compute_qk(acc_ref):
              plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
              schedule_barrier()
              return acc_ref[...]
            qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_k), jnp.float32))
            plgpu.barrier_arrive(k_done.at[slot])

            if masked:
              cols = plgpu.broadcasted_iota(jnp.int32, (block_q, block_k), 1, layout=plgpu.Layout.WGMMA)
              cols = cols + (kv_start + kv_step * block_k)
              inside = ((cols >= lax.broadcast_in_dim(rows_start, (block_q, block_k), [0]))
                        & (cols < lax.broadcast_in_dim(rows_end, (block_q, block_k), [0])))
              qk = jnp.where(inside, qk, -jnp.inf)
            m_ij = jnp.maximum(m_i, qk.max(axis=1) * qk_scale)
            # A row with no key in this tile (masked steps only) keeps m = -inf; subtract 0 there instead.
            m_sub = jnp.where(m_ij == -jnp.inf, 0.0, m_ij) if masked else m_ij
            alpha = jnp.exp2(m_i - m_sub)
            m_i = m_ij
            p = jnp.exp2(qk * qk_scale - lax.broadcast_in_dim(m_sub, qk.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha
            p16 = p.astype(dtype)

            def end_softmax_barriers():
              plgpu.barrier_arrive(schedule)  # done with the softmax
              plgpu.barrier_wait(v_ready.at[slot])
              plgpu.barrier_wait(schedule)  # the tensor cores are free
            # Order as in JAX's kernel (it measured this order faster for head_dim <= 128).
            if head_dim <= 128:
              l_i = l_i + p.sum(axis=1)
              acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
              end_softmax_barriers()
            else:
              end_softmax_barriers()
              l_i = l_i + p.sum(axis=1)

            def compute_pv(acc_ref):
              plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
              wait_next_k(kv_step)
            acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_done.at[slot])
            return acc, m_i, l_i
          return step

        acc, m_i, l_i = _range_steps((cta_lo, kv_lo, kv_full_lo, kv_full_hi, kv_hi, cta_hi), skip_step, step_fn,
                                     (acc, m_i, l_i))
        pl.when(wg == 0)(schedule_barrier)

        inv_l = 1.0 / l_i
        qo_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
        lse_smem[...] = m_i + jnp.log(l_i) * (1.0 / math.log(2.0))
        plgpu.commit_smem()

        def store(rows):  # the first `rows` rows of the tile (a static count)
          plgpu.copy_smem_to_gmem(qo_copy.at[pl.ds(0, rows)], out_ref.at[b, pl.ds(row0, rows), h])
          plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, rows)], lse_ref.at[b, h, pl.ds(row0, rows)])

        if row_shift == 0:
          store(block_q)
        else:  # tiles before first_stored_tile own no row; that one owns its first first_stored_rows rows
          pl.when(tile > first_stored_tile)(lambda: store(block_q))
          pl.when(tile == first_stored_tile)(lambda: store(first_stored_rows))
        plgpu.wait_smem_to_gmem(0)  # qo_smem and lse_smem are reused by the next item
        return step_base + (cta_hi - cta_lo)

      lax.fori_loop(0, my_items, run_item, jnp.int32(0))

    @pl.when(wg == CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def run_item(n, step_base):
        _, h, b, _, cta_lo, cta_hi, kv_start = item_range(program + n * n_programs)

        @pl.loop(cta_lo, cta_hi)
        def _load(step):
          count = step_base + step - cta_lo  # steps issued by this program before this one
          slot = lax.rem(count, jnp.int32(stages))
          rows = pl.ds(pl.multiple_of(kv_start + step * block_k, ROW_ALIGN), block_k)

          @pl.when(count >= stages)  # the slot held step count - stages: wait until both consumers are done
          def _():
            plgpu.barrier_wait(k_done.at[slot])
          plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h], k_copy.at[slot], k_ready.at[slot])

          @pl.when(count >= stages)
          def _():
            plgpu.barrier_wait(v_done.at[slot])
          plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h], v_copy.at[slot], v_ready.at[slot])
        return step_base + (cta_hi - cta_lo)

      lax.fori_loop(0, my_items, run_item, jnp.int32(0))

  def entry(q_ref, k_ref, v_ref, rs_ref, re_ref, tab_ref, out_ref, lse_ref):
    shapes = ((CONSUMERS, block_q, head_dim), (stages, block_k, head_dim), (stages, block_k, head_dim))
    smem = (
        untiled_copy_views(shapes, dtype) if untiled_copies else
        tuple(plgpu.SMEM(shape, dtype, transforms=_wgmma_transforms()) for shape in shapes),
        plgpu.SMEM((CONSUMERS, 2, block_q), jnp.int32),
        plgpu.SMEM((CONSUMERS, block_q), jnp.float32),
    )
    barriers = (
        plgpu.Barrier(num_barriers=stages),  # k_ready
        plgpu.Barrier(num_barriers=stages),  # v_ready
        plgpu.Barrier(num_barriers=CONSUMERS),  # q_ready
        plgpu.Barrier(num_barriers=CONSUMERS),  # rs_ready
        plgpu.Barrier(num_barriers=CONSUMERS),  # re_ready
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # k_done
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # v_done
        plgpu.Barrier(num_arrivals=CONSUMERS),  # schedule
    )
    pl.run_scoped(lambda smem, *bars: kernel(q_ref, k_ref, v_ref, rs_ref, re_ref, tab_ref, out_ref, lse_ref,
                                             smem, bars),
                  smem, *barriers, collective_axes="wg")

  out, lse = plgpu.kernel(
      entry,
      out_type=[out_struct(q.shape, dtype, q), out_struct((batch, heads, l_pad), jnp.float32, q)],
      grid=(n_programs,),
      grid_names=("program",),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, row_start, row_end, table)
  return match_vma(out, q), match_vma(lse, q)


# ---------------------------------------------------------------- backward: a dq kernel and a dk/dv kernel


def key_query_ranges(plan: TilePlan) -> tuple[np.ndarray, np.ndarray]:
  """Per key row j (l_pad of them, padding keys seen by the padding rows), the query rows [start, end) that see
  it (layout.key_ranges over the plan's padded row ranges): the dk/dv kernel's mask rows."""
  return key_ranges(plan.row_start, plan.row_end)


@dataclasses.dataclass(frozen=True)
class _Operand:
  """A global array copied to shared memory by TMA, in 64-row tiles (row side) or streamed tiles.

  kind: 'bld' a (B, L, H, D) array (rows of one batch row and head), 'bhl' a (B, H, L) float32 row statistic, 'l' an
  (L,) int32 per-row vector. group (streamed operands): which "done" barrier releases its ring slot.
  """
  kind: str
  dtype: Any
  head_dim: int = 0
  group: int = 0


def _rows_of(operand: _Operand, ref, b, h, start, size):
  rows = pl.ds(start, size)
  if operand.kind == "bld":
    return ref.at[b, rows, h]
  if operand.kind == "bhl":
    return ref.at[b, h, rows]
  return ref.at[rows]


def _smem(operand: _Operand, lead: int, size: int, untiled_copies: bool):
  if operand.kind == "bld":
    shape = (lead, size, operand.head_dim)
    if untiled_copies:
      return untiled_copy_views((shape,), operand.dtype)
    return plgpu.SMEM(shape, operand.dtype, transforms=_wgmma_transforms())
  return plgpu.SMEM((lead, size), operand.dtype)


def _views(operands, buffers, untiled_copies: bool):
  """_smem buffers -> (their wgmma / register views, their TMA views): the two views of untiled_copy_views, else
  the buffer twice."""
  pairs = []
  for op, buffer in zip(operands, buffers):
    if untiled_copies and op.kind == "bld":
      (tiled,), (untiled,) = buffer  # a ref union iterates over its groups
      pairs.append((tiled, untiled))
    else:
      pairs.append((buffer, buffer))
  return tuple(zip(*pairs))


def _streamed_call(*, row_ops, stream_ops, n_groups, table, block_s, batch, heads, stages, programs, init, step,
                   finish, out_type, inputs, consumer_registers, untiled_copies):
  """One warp-specialized Mosaic GPU kernel over (64-row tile pair, head, batch) work items.

  Each CTA: two consumer warpgroups, one 64-row tile each (row operands loaded once per item), and a producer
  warpgroup streaming the CTA's union range [cta_lo, cta_hi) of block_s-row tiles of the stream operands through a
  `stages`-slot ring (table rows from _range_table). A consumer runs skip / masked / full / masked / skip steps as
  in the forward; skip steps only wait the ready barriers and release the slot (every barrier phase is passed by
  every warpgroup, in order). Callbacks, traced in the consumer:
    init(row_smem) -> (ctx, carry); step(masked, step, ctx, row_smem, slot_smem, ready, done, carry) -> carry
    (it waits the slot's ready barriers and arrives its done barriers itself); finish(row_smem, ctx, carry) ->
    [(row operand index, output index)]: that row operand's buffer is written back as a 64-row tile of the
    (B, L, H, D) output. untiled_copies: 'bld' operands copied through untiled_copy_views.
  inputs: the row operands' arrays, the stream operands' arrays, then the table is appended here.
  """
  n_row = len(row_ops)
  n_tiles = table.shape[0]
  n_cta = n_tiles // CONSUMERS
  n_items = n_cta * heads * batch
  n_programs = n_items if programs is None else persistent_programs(programs, n_cta, n_items)
  n_in = len(inputs) + 1

  def kernel(refs, row_buffers, stream_buffers, row_ready, stream_ready, done):
    row_smem, row_copy = _views(row_ops, row_buffers, untiled_copies)
    stream_smem, stream_copy = _views(stream_ops, stream_buffers, untiled_copies)
    row_refs, stream_refs = refs[:n_row], refs[n_row:n_in - 1]
    tab_ref, out_refs = refs[n_in - 1], refs[n_in:]
    program = lax.axis_index("program")
    wg = lax.axis_index("wg")
    my_items = lax.div(jnp.int32(n_items) - program + (n_programs - 1), jnp.int32(n_programs))

    def item_range(item):
      """Item -> (head, batch, first tile, union range); CTAs of one (batch, head) fastest, heaviest first."""
      rank = lax.rem(item, jnp.int32(n_cta))
      bh = lax.div(item, jnp.int32(n_cta))
      first = CONSUMERS * tab_ref[CONSUMERS * rank, 6]
      return lax.rem(bh, jnp.int32(heads)), lax.div(bh, jnp.int32(heads)), first, tab_ref[first, 4], tab_ref[first, 5]

    @pl.when(wg < CONSUMERS)
    def _consumer():
      plgpu.set_max_registers(consumer_registers, action="increase")
      mine = tuple(s.at[wg] for s in row_smem)
      mine_copy = tuple(s.at[wg] for s in row_copy)

      def run_item(n, step_base):
        h, b, first, cta_lo, cta_hi = item_range(program + n * n_programs)
        tile = first + wg
        row0 = tile * BLOCK_Q
        for op, ref, smem, bar in zip(row_ops, row_refs, mine_copy, row_ready):
          plgpu.copy_gmem_to_smem(_rows_of(op, ref, b, h, row0, BLOCK_Q), smem, bar.at[wg])
        lo, full_lo, full_hi, hi = (tab_ref[tile, c] for c in range(4))
        for bar in row_ready:
          plgpu.barrier_wait(bar.at[wg])
        ctx, carry = init(mine)

        def slot_of(s):
          return lax.rem(step_base + s - cta_lo, jnp.int32(stages))

        def skip_step(s, c):
          slot = slot_of(s)
          for bar in stream_ready:
            plgpu.barrier_wait(bar.at[slot])
          for bar in done:
            plgpu.barrier_arrive(bar.at[slot])
          return c

        def body(masked):
          def run(s, c):
            slot = slot_of(s)
            return step(masked, s, ctx, mine, tuple(x.at[slot] for x in stream_smem),
                        tuple(x.at[slot] for x in stream_ready), tuple(x.at[slot] for x in done), c)
          return run

        carry = _range_steps((cta_lo, lo, full_lo, full_hi, hi, cta_hi), skip_step, body, carry)
        stores = finish(mine, ctx, carry)
        plgpu.commit_smem()
        for operand, index in stores:
          plgpu.copy_smem_to_gmem(mine_copy[operand], out_refs[index].at[b, pl.ds(row0, BLOCK_Q), h])
        plgpu.wait_smem_to_gmem(0)  # the row buffers are reused by the next item
        return step_base + (cta_hi - cta_lo)

      lax.fori_loop(0, my_items, run_item, jnp.int32(0))

    @pl.when(wg == CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def run_item(n, step_base):
        h, b, _, cta_lo, cta_hi = item_range(program + n * n_programs)

        @pl.loop(cta_lo, cta_hi)
        def _load(s):
          count = step_base + s - cta_lo  # steps issued by this program before this one
          slot = lax.rem(count, jnp.int32(stages))
          for group in range(n_groups):
            @pl.when(count >= stages)  # the slot held step count - stages: wait until both consumers are done
            def _():
              plgpu.barrier_wait(done[group].at[slot])
            for op, ref, smem, bar in zip(stream_ops, stream_refs, stream_copy, stream_ready):
              if op.group == group:
                plgpu.copy_gmem_to_smem(_rows_of(op, ref, b, h, s * block_s, block_s), smem.at[slot], bar.at[slot])
        return step_base + (cta_hi - cta_lo)

      lax.fori_loop(0, my_items, run_item, jnp.int32(0))

  def entry(*refs):
    smem = (tuple(_smem(op, CONSUMERS, BLOCK_Q, untiled_copies) for op in row_ops),
            tuple(_smem(op, stages, block_s, untiled_copies) for op in stream_ops))
    barriers = (tuple(plgpu.Barrier(num_barriers=CONSUMERS) for _ in row_ops),
                tuple(plgpu.Barrier(num_barriers=stages) for _ in stream_ops),
                tuple(plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages) for _ in range(n_groups)))
    pl.run_scoped(lambda smem, bars: kernel(refs, *smem, *bars), smem, barriers, collective_axes="wg")

  return plgpu.kernel(
      entry,
      out_type=out_type,
      grid=(n_programs,),
      grid_names=("program",),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(*inputs, jnp.asarray(table))


def _zeros(shape):
  return plgpu.layout_cast(jnp.full(shape, 0, jnp.float32), plgpu.Layout.WGMMA)


def _inside(rows_start, rows_end, col0, shape):
  """Mask of columns col0 + [0, shape[1]) inside each row's [start, end) (per-row vectors in WGMMA.reduce(1))."""
  cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + col0
  return ((cols >= lax.broadcast_in_dim(rows_start, shape, [0]))
          & (cols < lax.broadcast_in_dim(rows_end, shape, [0])))


def backward(q, k, v, out, lse, do, plan: TilePlan, *, scale: float, dkv_plan: TilePlan | None = None,
             stages: int = 2, programs: int | None = None, consumer_registers: int = 232,
             untiled_copies: bool | None = None):
  """Gradients (dq, dk, dv), each (B, L, H, D), of the block-sparse attention whose forward gave out and lse.

  lse: (B, H, l_pad) float32 in base 2 (logits scaled by scale * log2(e)), as both forwards store it.
  plan: its kv ranges drive the dq kernel (64-row query tiles, key tiles of plan.block_k streamed); dkv_plan
  (default plan): its q ranges drive the dk/dv kernel (64-row key tiles, query tiles of dkv_plan.block_q streamed).
  Exponentials are float32 (bf16 ones doubled the gradient error: bench/attention_notes.md). programs,
  untiled_copies: as forward.
  """
  if plgpu is None:
    raise RuntimeError("jax.experimental.pallas.mosaic_gpu is not available in this jax build.")
  dkv_plan = plan if dkv_plan is None else dkv_plan
  batch, length, heads, head_dim = q.shape
  if (plan.block_q != BLOCK_Q or dkv_plan.block_k != BLOCK_Q or plan.l_pad != dkv_plan.l_pad
      or plan.l_pad % (CONSUMERS * BLOCK_Q)):
    raise ValueError(f"Mosaic GPU backward needs {BLOCK_Q}-row tiles on the row side and one l_pad, a multiple "
                     f"of {CONSUMERS * BLOCK_Q}: plan "
                     f"block_q={plan.block_q}, dkv_plan block_k={dkv_plan.block_k}, l_pad {plan.l_pad} / "
                     f"{dkv_plan.l_pad}.")
  if plan.block_k % 64 or dkv_plan.block_q % 64 or head_dim % 64:
    raise ValueError(f"Mosaic GPU backward needs streamed tiles and head_dim multiples of 64, got "
                     f"{plan.block_k}, {dkv_plan.block_q}, {head_dim}.")
  if stages < 2:
    raise ValueError(f"stages={stages} must be >= 2.")
  l_pad = plan.l_pad
  if lse.shape != (batch, heads, l_pad):
    raise ValueError(f"lse shape {lse.shape} != {(batch, heads, l_pad)} (the forward must use the same l_pad).")
  delta = softmax_bwd_delta(out, do, l_pad)
  untiled_copies = _resolve_untiled_copies(untiled_copies, length, head_dim)
  if length % ROW_ALIGN and not untiled_copies:  # as in the forward: pad by < 8 rows, slice after
    q, k, v, do = (_pad_rows(x, length) for x in (q, k, v, do))
  dtype = q.dtype
  qk_scale = scale * LOG2E
  reduce_rows, reduce_cols = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
  tile = lambda op: _Operand("bld", dtype, head_dim, op)
  stat = lambda group=0: _Operand("bhl", jnp.float32, group=group)
  vector = _Operand("l", jnp.int32)
  common = dict(batch=batch, heads=heads, stages=stages, programs=programs, consumer_registers=consumer_registers,
                untiled_copies=untiled_copies)

  # dq: rows = 64 queries; streamed = key/value tiles of bk; group 0 releases k, group 1 v.
  bk = plan.block_k

  def dq_init(mine):
    _, _, lse_s, delta_s, rs_s, re_s = mine
    ctx = tuple(load_vector(x, reduce_rows) for x in (lse_s, delta_s, rs_s, re_s))
    return ctx, _zeros((BLOCK_Q, head_dim))

  def dq_step(masked, s, ctx, mine, slot_smem, ready, done, dq):
    q_s, do_s = mine[:2]
    k_s, v_s = slot_smem
    lse_r, delta_r, rows_start, rows_end = ctx
    plgpu.barrier_wait(ready[0])
    plgpu.barrier_wait(ready[1])

    def logits_and_dp(refs):
      s_ref, dp_ref = refs
      plgpu.wgmma(s_ref, q_s, plgpu.transpose_ref(k_s, (1, 0)))
      plgpu.wgmma(dp_ref, do_s, plgpu.transpose_ref(v_s, (1, 0)))
    shape = (BLOCK_Q, bk)
    logits, dp = pl.run_state(logits_and_dp)((plgpu.ACC.init(_zeros(shape)), plgpu.ACC.init(_zeros(shape))))
    plgpu.barrier_arrive(done[1])  # v no longer needed
    logits = logits * qk_scale - lax.broadcast_in_dim(lse_r, shape, [0])
    if masked:
      logits = jnp.where(_inside(rows_start, rows_end, s * bk, shape), logits, -jnp.inf)
    p = jnp.exp2(logits)
    ds = p * (dp - lax.broadcast_in_dim(delta_r, shape, [0]))

    def accumulate(acc_ref):
      plgpu.wgmma(acc_ref, ds.astype(dtype), k_s)
    dq = pl.run_state(accumulate)(plgpu.ACC.init(dq))
    plgpu.barrier_arrive(done[0])
    return dq

  def dq_finish(mine, ctx, dq):
    mine[0][...] = (dq * scale).astype(dtype)  # q's buffer holds dq for the store
    return [(0, 0)]

  dq = _streamed_call(
      row_ops=(tile(0), tile(0), stat(), stat(), vector, vector), stream_ops=(tile(0), tile(1)), n_groups=2,
      table=_range_table(plan.kv_lo, plan.kv_full_lo, plan.kv_full_hi, plan.kv_hi), block_s=bk,
      init=dq_init, step=dq_step, finish=dq_finish, out_type=[out_struct(q.shape, dtype, q)],
      inputs=[q, do, lse, delta, jnp.asarray(plan.row_start), jnp.asarray(plan.row_end), k, v], **common)[0]

  # dk, dv: rows = 64 keys; streamed = query tiles of bq with their lse and delta (group 0) and do (group 1).
  bq = dkv_plan.block_q
  key_start, key_end = key_query_ranges(dkv_plan)

  def dkv_init(mine):
    ctx = tuple(load_vector(x, reduce_rows) for x in mine[2:4])
    return ctx, (_zeros((BLOCK_Q, head_dim)), _zeros((BLOCK_Q, head_dim)))

  def dkv_step(masked, s, ctx, mine, slot_smem, ready, done, carry):
    dk, dv = carry
    k_s, v_s = mine[:2]
    q_s, lse_s, delta_s, do_s = slot_smem
    keys_start, keys_end = ctx
    shape = (BLOCK_Q, bq)
    plgpu.barrier_wait(ready[0])
    plgpu.barrier_wait(ready[1])

    def transposed_logits(acc_ref):
      plgpu.wgmma(acc_ref, k_s, plgpu.transpose_ref(q_s, (1, 0)))
      return acc_ref[...]
    logits = pl.run_scoped(transposed_logits, plgpu.ACC(shape, jnp.float32))
    logits = logits * qk_scale - lax.broadcast_in_dim(load_vector(lse_s, reduce_cols), shape, [1])
    if masked:
      logits = jnp.where(_inside(keys_start, keys_end, s * bq, shape), logits, -jnp.inf)
    p_t = jnp.exp2(logits)
    plgpu.barrier_wait(ready[3])

    def dv_and_dp(refs):
      dv_ref, dp_ref = refs
      plgpu.wgmma(dv_ref, p_t.astype(dtype), do_s)
      plgpu.wgmma(dp_ref, v_s, plgpu.transpose_ref(do_s, (1, 0)))
    dv, dp_t = pl.run_state(dv_and_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(_zeros(shape))))
    plgpu.barrier_arrive(done[1])  # do no longer needed
    plgpu.barrier_wait(ready[2])
    ds_t = p_t * (dp_t - lax.broadcast_in_dim(load_vector(delta_s, reduce_cols), shape, [1]))

    def accumulate(acc_ref):
      plgpu.wgmma(acc_ref, ds_t.astype(dtype), q_s)
    dk = pl.run_state(accumulate)(plgpu.ACC.init(dk))
    plgpu.barrier_arrive(done[0])
    return dk, dv

  def dkv_finish(mine, ctx, carry):
    dk, dv = carry
    mine[0][...] = (dk * scale).astype(dtype)  # k's and v's buffers hold dk and dv for the store
    mine[1][...] = dv.astype(dtype)
    return [(0, 0), (1, 1)]

  dk, dv = _streamed_call(
      row_ops=(tile(0), tile(0), vector, vector), stream_ops=(tile(0), stat(0), stat(0), tile(1)), n_groups=2,
      table=_range_table(dkv_plan.q_lo, dkv_plan.q_full_lo, dkv_plan.q_full_hi, dkv_plan.q_hi), block_s=bq,
      init=dkv_init, step=dkv_step, finish=dkv_finish,
      out_type=[out_struct(k.shape, dtype, k), out_struct(v.shape, dtype, v)],
      inputs=[k, v, jnp.asarray(key_start), jnp.asarray(key_end), q, lse, delta, do], **common)
  return tuple(match_vma(g[:, :length], x) for g, x in ((dq, q), (dk, k), (dv, v)))
