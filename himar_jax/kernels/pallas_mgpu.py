"""Block-sparse attention forward on Hopper: a Pallas Mosaic GPU kernel (wgmma, TMA, warp specialization).

Structure adapted from JAX's FlashAttention-3 example `jax/experimental/pallas/ops/gpu/attention_mgpu.py`
(Copyright 2024 The JAX Authors, Apache License 2.0): one CTA holds two consumer warpgroups (64 query rows each,
wgmma from shared memory, softmax in registers, "ping-pong" scheduled through a shared barrier so that one
warpgroup's softmax overlaps the other's matmuls) and one producer warpgroup that streams key and value tiles
into a ring of `stages` shared-memory slots by TMA.

What is ours: the key loop of a CTA runs over the tile range of its two query tiles only (a per-query-tile table
from layout.plan_tiles, read as scalars from global memory, kv_lo .. kv_hi), split per warpgroup into
  skip  steps of the CTA's range outside the warpgroup's own range (it only keeps the barriers in step),
  masked  steps at the range's ends (per-row [row_start, row_end) masks, rows loaded by TMA),
  full  steps where every row sees every key (no mask).
Tiles outside the range are never loaded. Work items (a pair of query tiles of one batch row and head) run
heaviest tile first, either one CTA each or on persistent CTAs that loop over items (the producer then prefetches
the next item's keys while the consumers finish; ring slots and barrier phases continue across items). Tensors
stay (batch, length, heads, head_dim), unpadded when L is a multiple of 8 (else padded by < 8 rows, a copy:
Mosaic's TMA tiling needs it): TMA fills rows past L with zeros on load and drops them on store. Logits are in
base 2 (scaled by scale * log2(e)) and lse = m + log2(l) is stored in those units, as the Triton backward expects.

Forward only; the backward of this path is the Triton kernel in pallas_gpu.py (see bench/attention_notes.md).
Runs only on a Hopper GPU: jax 0.10.2's Mosaic GPU interpret mode has no rules for run_state / layout_cast (and
JAX's own FA3 example, shimmed around those, deadlocked in it), so on CPU the tests lower this kernel to Mosaic GPU
MLIR (catching trace, layout and TMA-shape errors) and test the dispatch around it.
"""
from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from himar_jax.kernels.common import out_struct
from himar_jax.kernels.layout import TilePlan

try:  # Mosaic GPU ships with jax, but keep this module importable where a jax build lacks it.
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
  pl = plgpu = None

LOG2E = math.log2(math.e)
BLOCK_Q = 64  # rows per consumer warpgroup (one wgmma M tile); a CTA covers 2 * BLOCK_Q rows
CONSUMERS = 2
ROW_ALIGN = 8  # TMA tiling rows
TABLE_COLS = 8  # per query tile: kv_lo, kv_full_lo, kv_full_hi, kv_hi, cta_lo, cta_hi, 0, 0


def available() -> bool:
  return plgpu is not None


def _load_vector(ref, layout):
  """plgpu.load of a whole ref (jax 0.11 deprecates the separate index argument that 0.10 requires)."""
  if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def tile_table(plan: TilePlan) -> np.ndarray:
  """(n_query_tiles, TABLE_COLS) int32: each 64-row tile's key-tile ranges and its CTA's union range."""
  if plan.block_q != BLOCK_Q or plan.l_pad % (CONSUMERS * BLOCK_Q):
    raise ValueError(f"Mosaic GPU forward needs block_q={BLOCK_Q} and l_pad a multiple of {CONSUMERS * BLOCK_Q}, "
                     f"got block_q={plan.block_q}, l_pad={plan.l_pad}.")
  n_tiles = plan.l_pad // BLOCK_Q
  cta_lo = np.repeat(plan.kv_lo.reshape(-1, CONSUMERS).min(1), CONSUMERS)
  cta_hi = np.repeat(plan.kv_hi.reshape(-1, CONSUMERS).max(1), CONSUMERS)
  zero = np.zeros(n_tiles, np.int32)
  cols = (plan.kv_lo, plan.kv_full_lo, plan.kv_full_hi, plan.kv_hi, cta_lo, cta_hi, zero, zero)
  return np.stack(cols, axis=1).astype(np.int32)


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
            programs: int | None = None):
  """q, k, v (B, L, H, D) bfloat16/float16, unpadded. Returns out (B, L, H, D), lse (B, H, L_pad) float32 (base 2).

  programs: None launches one CTA per work item (a 128-row query tile of one batch row and head); an int (the SM
  count) launches about that many persistent CTAs (persistent_programs), each looping over items i, i + G, ...: the
  producer then streams the next item's keys while the consumers finish the previous one, hiding the per-item
  start and finish.
  """
  if plgpu is None:
    raise RuntimeError("jax.experimental.pallas.mosaic_gpu is not available in this jax build.")
  length = q.shape[1]
  if length % ROW_ALIGN:
    # TMA with the (8, 64) wgmma tiling needs the row count of the global array to be a multiple of 8 (Mosaic GPU
    # rejects other lengths; its round-down mode would drop the last rows). Pad by < 8 rows; costs a copy.
    pad = [(0, 0), (0, ROW_ALIGN - length % ROW_ALIGN), (0, 0), (0, 0)]
    out, lse = forward(*(jnp.pad(x, pad) for x in (q, k, v)), plan, scale=scale, stages=stages,
                       consumer_registers=consumer_registers, programs=programs)
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
  table = jnp.asarray(tile_table(plan))
  row_start, row_end = jnp.asarray(plan.row_start), jnp.asarray(plan.row_end)
  qk_scale = scale * LOG2E

  def item_coords(item):
    """Work item -> (query-tile pair, head, batch); tiles fastest (one head's keys stay in L2), heaviest first."""
    cta = (n_cta - 1) - lax.rem(item, jnp.int32(n_cta))
    bh = lax.div(item, jnp.int32(n_cta))
    return cta, lax.rem(bh, jnp.int32(heads)), lax.div(bh, jnp.int32(heads))

  def kernel(q_ref, k_ref, v_ref, rs_ref, re_ref, tab_ref, out_ref, lse_ref, smem, barriers):
    qo_smem2, k_smem, v_smem, rows_smem2, lse_smem2 = smem
    (k_ready, v_ready, q_ready, rs_ready, re_ready, k_done, v_done, schedule) = barriers
    program = lax.axis_index("program")
    wg = lax.axis_index("wg")
    # This program's items: program, program + n_programs, ...
    my_items = lax.div(jnp.int32(n_items) - program + (n_programs - 1), jnp.int32(n_programs))

    def item_range(item):
      cta, h, b = item_coords(item)
      first = CONSUMERS * cta
      return cta, h, b, first, tab_ref[first, 4], tab_ref[first, 5]

    def schedule_barrier():
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      plgpu.set_max_registers(consumer_registers, action="increase")
      qo_smem = qo_smem2.at[wg]
      lse_smem = lse_smem2.at[wg]
      rows_smem = rows_smem2.at[wg]

      def run_item(n, step_base):
        # step_base: key/value steps this program consumed before (the ring slot of a step continues across items).
        _, h, b, first, cta_lo, cta_hi = item_range(program + n * n_programs)
        tile = first + wg
        row0 = tile * block_q
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, block_q), h], qo_smem, q_ready.at[wg])
        plgpu.copy_gmem_to_smem(rs_ref.at[pl.ds(row0, block_q)], rows_smem.at[0], rs_ready.at[wg])
        plgpu.copy_gmem_to_smem(re_ref.at[pl.ds(row0, block_q)], rows_smem.at[1], re_ready.at[wg])
        kv_lo, kv_full_lo = tab_ref[tile, 0], tab_ref[tile, 1]
        kv_full_hi, kv_hi = tab_ref[tile, 2], tab_ref[tile, 3]

        def slot_of(step):
          return lax.rem(step_base + step - cta_lo, jnp.int32(stages))

        plgpu.barrier_wait(q_ready.at[wg])
        plgpu.barrier_wait(rs_ready.at[wg])
        plgpu.barrier_wait(re_ready.at[wg])
        rows_start = _load_vector(rows_smem.at[0], plgpu.Layout.WGMMA.reduce(1))
        rows_end = _load_vector(rows_smem.at[1], plgpu.Layout.WGMMA.reduce(1))

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
              cols = cols + kv_step * block_k
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

        carry = (acc, m_i, l_i)
        lax.fori_loop(cta_lo, kv_lo, skip_step, None)
        carry = lax.fori_loop(kv_lo, kv_full_lo, step_fn(True), carry)
        carry = lax.fori_loop(kv_full_lo, kv_full_hi, step_fn(False), carry)
        acc, m_i, l_i = lax.fori_loop(kv_full_hi, kv_hi, step_fn(True), carry)
        lax.fori_loop(kv_hi, cta_hi, skip_step, None)
        pl.when(wg == 0)(schedule_barrier)

        inv_l = 1.0 / l_i
        qo_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
        lse_smem[...] = m_i + jnp.log(l_i) * (1.0 / math.log(2.0))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(row0, block_q), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(row0, block_q)])
        plgpu.wait_smem_to_gmem(0)  # qo_smem and lse_smem are reused by the next item
        return step_base + (cta_hi - cta_lo)

      lax.fori_loop(0, my_items, run_item, jnp.int32(0))

    @pl.when(wg == CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def run_item(n, step_base):
        _, h, b, _, cta_lo, cta_hi = item_range(program + n * n_programs)

        @pl.loop(cta_lo, cta_hi)
        def _load(step):
          count = step_base + step - cta_lo  # steps issued by this program before this one
          slot = lax.rem(count, jnp.int32(stages))
          rows = pl.ds(step * block_k, block_k)

          @pl.when(count >= stages)  # the slot held step count - stages: wait until both consumers are done
          def _():
            plgpu.barrier_wait(k_done.at[slot])
          plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h], k_smem.at[slot], k_ready.at[slot])

          @pl.when(count >= stages)
          def _():
            plgpu.barrier_wait(v_done.at[slot])
          plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h], v_smem.at[slot], v_ready.at[slot])
        return step_base + (cta_hi - cta_lo)

      lax.fori_loop(0, my_items, run_item, jnp.int32(0))

  def entry(q_ref, k_ref, v_ref, rs_ref, re_ref, tab_ref, out_ref, lse_ref):
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    smem = (
        plgpu.SMEM((CONSUMERS, block_q, head_dim), dtype, transforms=swizzled),
        plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=swizzled),
        plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=swizzled),
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
  return out, lse
