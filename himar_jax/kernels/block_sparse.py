"""block_sparse_attention: the one entry point for scale-layout (VAR / HMAR) attention.

Layout (batch, length, heads, head_dim) like jax.nn.dot_product_attention; length must equal layout.length.
Backends ('implementation'):
  'pallas_gpu'  Pallas GPU kernels. gpu_kernel='mosaic' (the default on Hopper, compute capability 9.x, for
                bfloat16/float16, head_dim a multiple of 64 and L >= MOSAIC_MIN_LENGTH, where it is faster): the
                Mosaic GPU forward in pallas_mgpu.py; gpu_kernel='triton' (other GPUs, float32, other head_dims,
                shorter layouts, interpret mode): the Triton-lowering forward in pallas_gpu.py. The backward is
                chosen separately (gpu_bwd_kernel): the Mosaic GPU backward in pallas_mgpu.py (auto on Hopper for
                bfloat16/float16 at head_dim 64, where it was measured faster, except block-diagonal layouts up to
                ALIGN_TILES_MAX_LENGTH) or the Triton one in pallas_gpu.py (everything else)
  'pallas_tpu'  Pallas Mosaic TPU kernels in pallas_tpu.py
  'xla'         the dense-masked float32 reference (reference.py)
  None          'pallas_gpu' on GPU, 'pallas_tpu' on TPU, 'xla' elsewhere
On GPU, float32 inputs use the tensor cores' tf32 mode (relative error ~3e-4 vs the float32 reference); bfloat16
is the intended dtype. Gradients come from Pallas backward kernels through jax.custom_vjp. A case a kernel does
not support falls back to the reference and logs the reason once (a Mosaic GPU request it cannot serve runs the
Triton kernels, also with one logged reason). `interpret=True` (or a pltpu.InterpretParams) runs the kernels on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

from himar_jax.kernels import pallas_gpu, pallas_mgpu, pallas_tpu
from himar_jax.kernels.common import is_hopper as _is_hopper, sm_count as _sm_count
from himar_jax.kernels.layout import ScaleLayout, extended_length, plan_attention_tiles, plan_tiles
from himar_jax.kernels.reference import reference_attention

log = logging.getLogger(__name__)
_logged_reasons: set[str] = set()
IMPLEMENTATIONS = ("pallas_gpu", "pallas_tpu", "xla")
GPU_KERNELS = ("mosaic", "triton")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static kernel choices (hashable: a non-differentiable custom_vjp argument)."""
  backend: str
  scale: float
  block_q: int
  block_k: int
  block_bwd: int
  num_warps: int
  num_stages: int
  interpret: Any
  poison: bool
  fast_exp: bool
  gpu_kernel: str = "triton"
  stages: int = 2
  programs: int | None = None  # Mosaic GPU: persistent CTAs (about the SM count), or None for one CTA per item
  gpu_bwd_kernel: str = "triton"  # 'mosaic' | 'triton': which GPU backward runs
  bwd_programs: int | None = None  # Mosaic GPU backward: persistent CTAs, or None for one CTA per item
  align_tiles: bool = True  # Triton kernels: tiles cut at scale starts (else a plain grid)
  bwd_num_stages: int = 3  # Triton backward's pipeline stages
  align_keys: bool = True  # Mosaic GPU forward: key steps from each CTA's first key (else a block_k grid)
  untiled_copies: bool | None = None  # Mosaic GPU kernels: TMA through untiled views (None: where L % 8 != 0)
  row_shift: int | None = None  # Mosaic GPU forward: CTA rows start this far before row 0 (resolved at entry)


def _default_blocks(backend: str, head_dim: int, length: int, gpu_kernel: str) -> tuple[int, int, int]:
  """(block_q, block_k, block_bwd). GPU values from bench/attention_notes.md (H100, head_dim 64)."""
  if backend == "pallas_tpu":
    return 128, 128, 128
  bwd = 64
  if gpu_kernel == "mosaic":
    # 128-key tiles: 0.61 vs 0.75 ms (64) at L9451 block-causal (notes); head_dim 128 keeps the 64 measured.
    return pallas_mgpu.BLOCK_Q, 128 if head_dim <= 64 else 64, bwd
  if head_dim > 64:
    return 64, 64, 64
  # Short layouts (L = 680) have small scales: narrower key tiles skip more of the empty area.
  return (64, 32, 64) if length <= 1024 else (64, 64, 64)


def _unsupported_reason(q, k, v, backend: str, interpret) -> str | None:
  if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32) or not (q.dtype == k.dtype == v.dtype):
    return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (kernels take one of bfloat16, float16, float32)"
  head_dim = q.shape[-1]
  if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
    return f"head_dim={head_dim} (kernels take a power of two in 16..256)"
  if not interpret:
    platform = jax.default_backend()
    wanted = "gpu" if backend == "pallas_gpu" else "tpu"
    if platform != wanted:
      return f"implementation={backend!r} on platform {platform!r} without interpret=True"
  return None


def _log_once(reason: str, fallback: str = "the XLA reference") -> None:
  if reason not in _logged_reasons:
    _logged_reasons.add(reason)
    log.warning("block_sparse_attention: falling back to %s: %s", fallback, reason)


def _mosaic_programs(kernel: str, length: int, persistent: bool | None) -> int | None:
  """Persistent CTA count (the SM count) for the Mosaic GPU forward, or None for one CTA per work item."""
  if kernel != "mosaic":
    return None
  persistent = length < MOSAIC_GRID_LENGTH if persistent is None else persistent
  return _sm_count() if persistent else None


def _mosaic_unsupported_reason(q, interpret, hopper: bool) -> str | None:
  """Why the Mosaic GPU forward cannot run this case (then the Triton kernels do), or None."""
  if interpret:
    return "interpret mode (Mosaic GPU kernels run only on a Hopper GPU)"
  if not pallas_mgpu.available():
    return "jax.experimental.pallas.mosaic_gpu is not importable"
  if not hopper:
    return "the GPU is not a Hopper (compute capability 9.x)"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (Mosaic GPU kernel takes bfloat16/float16)"
  if q.shape[-1] % 64:
    return f"head_dim={q.shape[-1]} (Mosaic GPU kernel takes multiples of 64)"
  return None


# Auto dispatch on Hopper, from the H100 measurements in bench/attention_notes.md: the Mosaic GPU forward from
# L = MOSAIC_MIN_LENGTH on (L2240: 0.19 / 0.30 ms vs Triton 0.21 / 0.36; L9451: 0.35-0.40 / 0.61-0.66 vs 0.38 /
# 0.73), Triton below (L680 block-diagonal 0.145 vs 0.164: short loops, where one CTA per SM pays a fixed cost per
# tile that Triton's small CTAs hide). Persistent CTAs below MOSAIC_GRID_LENGTH (they hide that per-tile cost: L680
# 0.19 -> 0.17, L2240 causal 0.32 -> 0.30), one CTA per tile from there (L9451 causal 0.66 vs 0.71 persistent: the
# static item order balances the long, uneven tiles worse than the hardware scheduler).
MOSAIC_MIN_LENGTH = 1024
MOSAIC_GRID_LENGTH = 4096
# Session 9: with its CTA rows shifted to end at L (pallas_mgpu.best_row_shift), the Mosaic forward overtook Triton
# at L680 block-causal (0.178 vs 0.196 ms in one run; 0.210 without the shift: 23 instead of 28 key steps per
# head), not block-diagonal (0.129 vs 0.115). `full` (ranges from key 0, as block-causal): at the DiT head's B256 H8
# L256 the Mosaic forward took 0.166 ms vs Triton's 0.180 (bench/results/attention_dit256.json).
MOSAIC_SHORT_PATTERNS = ("block_causal", "full")


# Auto dispatch of the backward on Hopper, from the H100 measurements in bench/attention_notes.md (session 3,
# head_dim 64, bf16, forward+backward ms, Triton backward -> Mosaic): faster at every benchmark layout (L680
# diagonal 0.585 -> 0.532, causal 0.849 -> 0.719; L2240 0.809 -> 0.696, 1.402 -> 1.191; L9451 1.572 -> 1.288,
# 3.137 -> 2.341), so at every length. head_dim 128 is checked for correctness only (not timed), so
# auto keeps Triton there (MOSAIC_BWD_AUTO_HEAD_DIMS). Below MOSAIC_BWD_GRID_LENGTH persistent CTAs (L680 0.532 vs
# 0.583 one CTA per item; L2240 0.696 vs 0.759), from there one CTA per item (L9451 1.345 / 2.563 vs 1.351 / 2.605).
# Streamed tiles of MOSAIC_BWD_BLOCK = 64 rows (L680 0.532 vs 0.568 with 128; L2240 0.696 vs 0.739), and of
# MOSAIC_BWD_LONG_BLOCK = 128 rows from MOSAIC_BWD_GRID_LENGTH on (L9451: 1.288 / 2.341 vs 1.345 / 2.563 in session
# 3; session 7, same run: 1.256 / 2.319 vs 1.366 / 2.523, with the gradient errors of 64-row tiles:
# bench/results/attention_bwd128_checks.json). Session 7: with the Triton kernels' tiles cut at scale starts
# (below), the Triton backward overtook it at L680 block-diagonal (0.486 / 0.489 vs 0.500 / 0.502 ms
# forward+backward in two runs), so auto takes Triton for block-diagonal layouts whose Triton tiles are aligned;
# block-causal stays Mosaic (0.703 vs 0.905 ms at L680).
MOSAIC_BWD_AUTO_HEAD_DIMS = (64,)
MOSAIC_BWD_GRID_LENGTH = 4096
MOSAIC_BWD_BLOCK = 64
MOSAIC_BWD_LONG_BLOCK = 128
# Triton-kernel tiles cut at scale starts up to this length (layout.segment_starts): at L680 they visit 21%
# fewer 64x32 tile pairs than a fixed grid (block-diagonal; 7% block-causal) and the Triton forward took 0.113 vs
# 0.128 ms (diagonal) and 0.191 vs 0.208 (causal); at L2240 the two are level (0.197 vs 0.199, 0.357 vs 0.360).
ALIGN_TILES_MAX_LENGTH = 1024
# The Triton backward on aligned tiles: 2 pipeline stages (L680 block-diagonal backward 0.353 ms in two runs vs
# 0.370 with 3; the forward keeps 3: 0.113 - 0.116 vs 0.124 - 0.131 with 2).
ALIGNED_BWD_NUM_STAGES = 2


def _choose_gpu_bwd_kernel(q, gpu_bwd_kernel: str | None, interpret, block_bwd: int | None,
                           aligned_diagonal: bool = False) -> str:
  """The backward's kernel: 'mosaic' where it runs and is faster (auto) or asked for, else 'triton'.
  aligned_diagonal: the layout is block-diagonal and the Triton tiles are cut at scale starts (Triton is faster)."""
  if gpu_bwd_kernel not in (None, *GPU_KERNELS):
    raise ValueError(f"gpu_bwd_kernel={gpu_bwd_kernel!r} is not one of {GPU_KERNELS} or None (auto).")
  if gpu_bwd_kernel == "triton":
    return "triton"
  reason = _mosaic_unsupported_reason(q, interpret, _is_hopper())
  if reason is None and block_bwd is not None and block_bwd % 64:
    reason = f"block_bwd={block_bwd} (Mosaic GPU backward streams tiles of a multiple of 64 rows)"
  if reason is None:
    faster = q.shape[-1] in MOSAIC_BWD_AUTO_HEAD_DIMS and not aligned_diagonal
    return "mosaic" if gpu_bwd_kernel == "mosaic" or faster else "triton"
  if gpu_bwd_kernel == "mosaic":
    _log_once(f"Mosaic GPU backward: {reason}", fallback="the Triton-lowering backward")
  return "triton"


def _choose_gpu_kernel(q, gpu_kernel: str | None, interpret, pattern: str = "block_diagonal") -> str:
  """'mosaic' where it runs and is faster (auto) or asked for, else 'triton' (one logged reason when asked for).
  pattern: the layout's; below MOSAIC_MIN_LENGTH only block-diagonal layouts take Triton (MOSAIC_SHORT_PATTERNS)."""
  if gpu_kernel not in (None, *GPU_KERNELS):
    raise ValueError(f"gpu_kernel={gpu_kernel!r} is not one of {GPU_KERNELS} or None (auto).")
  if gpu_kernel == "triton":
    return "triton"
  reason = _mosaic_unsupported_reason(q, interpret, _is_hopper())
  if reason is None:
    faster = q.shape[1] >= MOSAIC_MIN_LENGTH or pattern in MOSAIC_SHORT_PATTERNS
    return "mosaic" if gpu_kernel == "mosaic" or faster else "triton"
  if gpu_kernel == "mosaic":
    _log_once(reason, fallback="the Triton-lowering kernels")
  return "triton"


def block_sparse_attention(q, k, v, layout: ScaleLayout, *, scale: float | None = None,
                           implementation: str | None = None, block_q: int | None = None,
                           block_k: int | None = None, block_bwd: int | None = None, num_warps: int | None = None,
                           num_stages: int = 3, interpret: Any = False, poison_outputs: bool = False,
                           fast_exp: bool = True, gpu_kernel: str | None = None, stages: int = 2,
                           persistent: bool | None = None, gpu_bwd_kernel: str | None = None,
                           bwd_persistent: bool | None = None, align_tiles: bool | None = None,
                           bwd_num_stages: int | None = None, align_keys: bool = True,
                           untiled_copies: bool | None = None, row_shift: int | None = None):
  """Attention of (B, L, H, D) q, k, v under a scale layout; returns (B, L, H, D) in q's dtype.

  block_q/block_k: forward tile sizes; block_bwd: the backward's (query and key) tile size; num_warps/num_stages:
  Triton launch settings (GPU). poison_outputs (tests, GPU kernels): outputs start NaN-filled so that a row the
  kernel never writes shows up; on TPU use pltpu.InterpretParams(uninitialized_memory='nan') instead.
  fast_exp (GPU, bfloat16 inputs, forward): softmax exponentials in bfloat16 pairs (ex2.approx.ftz.bf16x2); see
  bench/attention_notes.md for its speed and error (Triton forward only).
  gpu_kernel: 'mosaic' | 'triton' | None (auto: Mosaic GPU forward on Hopper where supported, else Triton);
  stages: the Mosaic GPU forward's key/value shared-memory ring depth; persistent: its grid is one CTA per SM looping
  over work items, else one CTA per 128-row query tile, batch row and head (None: persistent for L <
  MOSAIC_GRID_LENGTH).
  gpu_bwd_kernel: 'mosaic' | 'triton' | None (auto: Mosaic on Hopper for bfloat16/float16 at head_dim 64, see
  _choose_gpu_bwd_kernel): the Mosaic GPU backward (pallas_mgpu.backward: a dq and a dk/dv kernel, 64 rows per
  warpgroup, block_bwd = the streamed tile, 64 or 128, default MOSAIC_BWD_BLOCK, or MOSAIC_BWD_LONG_BLOCK from
  L = MOSAIC_BWD_GRID_LENGTH) or the
  Triton one; bwd_persistent: the Mosaic backward's grid, as persistent (None: persistent for L <
  MOSAIC_BWD_GRID_LENGTH).
  align_tiles: the Triton kernels' query and key tiles start at scale starts (small scales merged into one tile),
  so a tile visits only its own scales' keys; False: a fixed grid of tiles (None: aligned for L <=
  ALIGN_TILES_MAX_LENGTH). bwd_num_stages: the Triton backward's stages (None: 2 with aligned tiles, where it
  measured faster, else num_stages). align_keys: the Mosaic GPU forward's key steps start at the first key its
  CTA's rows see (pallas_mgpu.tile_table), not on a block_k grid. untiled_copies: the Mosaic GPU kernels' TMA
  copies go through untiled views of their shared buffers (pallas_mgpu.untiled_copy_views), which takes lengths
  that are not a multiple of 8 without padding (head_dim 64 only); None: where L % 8 != 0 at head_dim 64, False:
  such lengths are padded by < 8 rows (a copy). row_shift: the Mosaic GPU forward's 128-row CTAs start row_shift
  rows before row 0 (a multiple of 8, at most its padding; pallas_mgpu.tile_table); None: the shift with the
  fewest key steps (pallas_mgpu.best_row_shift), 0 for a grid from row 0.
  """
  if not isinstance(layout, ScaleLayout):
    raise TypeError(f"layout must be a ScaleLayout (got {type(layout).__name__}); build one with "
                    "ScaleLayout.from_patch_nums(patch_nums, pattern).")
  if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
    raise ValueError(f"q, k, v must share one (batch, length, heads, head_dim) shape, got {q.shape}, {k.shape}, "
                     f"{v.shape}.")
  if q.shape[1] != layout.length:
    raise ValueError(f"sequence length {q.shape[1]} does not match the layout's {layout.length} tokens "
                     f"(scale_sizes={layout.scale_sizes}).")
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  if implementation is None:
    implementation = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "xla")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS} or None (auto).")
  if implementation == "xla":
    return reference_attention(q, k, v, layout, scale=scale)
  reason = _unsupported_reason(q, k, v, implementation, interpret)
  if reason is not None:
    _log_once(reason)
    return reference_attention(q, k, v, layout, scale=scale)

  kernel = (_choose_gpu_kernel(q, gpu_kernel, interpret, layout.pattern) if implementation == "pallas_gpu"
            else "triton")
  align_tiles = layout.length <= ALIGN_TILES_MAX_LENGTH if align_tiles is None else bool(align_tiles)
  bwd_kernel = (_choose_gpu_bwd_kernel(q, gpu_bwd_kernel, interpret, block_bwd,
                                       align_tiles and layout.pattern == "block_diagonal")
                if implementation == "pallas_gpu" else "triton")
  d_q, d_k, d_bwd = _default_blocks(implementation, q.shape[-1], layout.length, kernel)
  if bwd_kernel == "mosaic":
    # the streamed tile (keys in the dq kernel, queries in the dk/dv kernel)
    d_bwd = MOSAIC_BWD_LONG_BLOCK if layout.length >= MOSAIC_BWD_GRID_LENGTH else MOSAIC_BWD_BLOCK
  if kernel == "mosaic" and block_q not in (None, pallas_mgpu.BLOCK_Q):
    raise ValueError(f"block_q={block_q}: the Mosaic GPU forward uses {pallas_mgpu.BLOCK_Q}-row query tiles "
                     "(pass gpu_kernel='triton' for other sizes).")
  if kernel == "mosaic" and block_k is not None and block_k % 64:
    raise ValueError(f"block_k={block_k}: the Mosaic GPU forward takes multiples of 64.")
  cfg = KernelConfig(implementation, scale, block_q or d_q, block_k or d_k, block_bwd or d_bwd,
                     num_warps or 4, num_stages, interpret, poison_outputs,
                     fast_exp and q.dtype == jnp.bfloat16, kernel, stages,
                     _mosaic_programs(kernel, layout.length, persistent), bwd_kernel,
                     _mosaic_bwd_programs(bwd_kernel, layout.length, bwd_persistent), align_tiles,
                     bwd_num_stages or (ALIGNED_BWD_NUM_STAGES if align_tiles else num_stages), bool(align_keys),
                     untiled_copies, row_shift)
  for name in ("block_q", "block_k", "block_bwd"):
    size = getattr(cfg, name)
    if size < 8 or size & (size - 1):
      raise ValueError(f"{name}={size} must be a power of two >= 8 (Triton and Mosaic tiles).")
  if kernel == "mosaic" and row_shift is None:  # resolved once here; the forward and backward read cfg.row_shift
    cfg = dataclasses.replace(cfg, row_shift=pallas_mgpu.best_row_shift(_forward_plan(cfg, layout), cfg.align_keys))
  return _attend(q, k, v, cfg, layout)


def _mosaic_bwd_programs(kernel: str, length: int, persistent: bool | None) -> int | None:
  if kernel != "mosaic":
    return None
  persistent = length < MOSAIC_BWD_GRID_LENGTH if persistent is None else persistent
  return _sm_count() if persistent else None


def _triton_tiles(cfg: KernelConfig, layout: ScaleLayout, block_q: int, block_k: int):
  """(query tiles over keys, key tiles over queries) of the Triton-lowering kernels (layout.plan_attention_tiles)."""
  return plan_attention_tiles(layout, block_q, block_k, align=cfg.align_tiles,
                              l_ext=extended_length(layout.length, cfg.block_q, cfg.block_k, cfg.block_bwd))


def _l_pad(cfg: KernelConfig, layout: ScaleLayout) -> int:
  """The padded length of the TilePlan kernels (Mosaic GPU, TPU): a multiple of every tile size they use."""
  rows_per_program = cfg.block_q * (pallas_mgpu.CONSUMERS if cfg.gpu_kernel == "mosaic" else 1)
  if cfg.gpu_bwd_kernel == "mosaic":
    rows_per_program = math.lcm(rows_per_program, pallas_mgpu.CONSUMERS * pallas_mgpu.BLOCK_Q)
  return layout.padded_length(math.lcm(rows_per_program, cfg.block_k, cfg.block_bwd))


def _forward_plan(cfg: KernelConfig, layout: ScaleLayout):
  if cfg.backend == "pallas_gpu" and cfg.gpu_kernel == "triton":
    return _triton_tiles(cfg, layout, cfg.block_q, cfg.block_k)[0]
  return plan_tiles(layout, cfg.block_q, cfg.block_k, _l_pad(cfg, layout))


def _backward_plan(cfg: KernelConfig, layout: ScaleLayout):
  """Triton: (query tiles, key tiles) of block_bwd rows and steps. Mosaic GPU: the dq plan (64-row query tiles,
  block_bwd keys) and the dk/dv plan (block_bwd queries, 64-row key tiles). TPU: one square TilePlan."""
  if cfg.backend == "pallas_gpu" and cfg.gpu_bwd_kernel == "triton":
    return _triton_tiles(cfg, layout, cfg.block_bwd, cfg.block_bwd)
  l_pad = _l_pad(cfg, layout)
  if cfg.gpu_bwd_kernel == "mosaic":
    return (plan_tiles(layout, pallas_mgpu.BLOCK_Q, cfg.block_bwd, l_pad),
            plan_tiles(layout, cfg.block_bwd, pallas_mgpu.BLOCK_Q, l_pad))
  return plan_tiles(layout, cfg.block_bwd, cfg.block_bwd, l_pad)


def _to_tpu(x, l_pad):
  """(B, L, H, D) -> (B, H, L_pad, D) zero-padded: Mosaic TPU blocks are whole (tile, head_dim) matrices."""
  return jnp.swapaxes(jnp.pad(x, [(0, 0), (0, l_pad - x.shape[1]), (0, 0), (0, 0)]), 1, 2)


def _from_tpu(x, length):
  return jnp.swapaxes(x, 1, 2)[:, :length]


def _forward(q, k, v, cfg: KernelConfig, layout: ScaleLayout):
  plan = _forward_plan(cfg, layout)
  if cfg.backend == "pallas_gpu" and cfg.gpu_kernel == "mosaic":
    return pallas_mgpu.forward(q, k, v, plan, scale=cfg.scale, stages=cfg.stages, programs=cfg.programs,
                               align_keys=cfg.align_keys, untiled_copies=cfg.untiled_copies,
                               row_shift=cfg.row_shift)
  if cfg.backend == "pallas_gpu":
    return pallas_gpu.forward(q, k, v, plan, scale=cfg.scale, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                              interpret=bool(cfg.interpret), poison=cfg.poison, fast_exp=cfg.fast_exp)
  out, lse = pallas_tpu.forward(*(_to_tpu(x, plan.l_pad) for x in (q, k, v)), plan, scale=cfg.scale,
                                interpret=cfg.interpret)
  return _from_tpu(out, q.shape[1]), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attend(q, k, v, cfg: KernelConfig, layout: ScaleLayout):
  return _forward(q, k, v, cfg, layout)[0]


def _attend_fwd(q, k, v, cfg, layout):
  out, lse = _forward(q, k, v, cfg, layout)
  return out, (q, k, v, out, lse)


def _attend_bwd(cfg, layout, residuals, d_out):
  q, k, v, out, lse = residuals
  plan = _backward_plan(cfg, layout)
  if cfg.backend == "pallas_gpu" and cfg.gpu_bwd_kernel == "mosaic":
    dq_plan, dkv_plan = plan
    pad_rows_unwritten = cfg.gpu_kernel == "mosaic" and bool(cfg.row_shift)
    if lse.shape[-1] != dq_plan.l_pad or pad_rows_unwritten:  # the Triton forward's, or the shifted Mosaic one's:
      # rows past L unwritten, and any finite lse serves the Mosaic backward's padding rows (their q, dO and delta
      # are zero)
      lse = jnp.pad(lse[..., :q.shape[1]], [(0, 0), (0, 0), (0, dq_plan.l_pad - q.shape[1])])
    return pallas_mgpu.backward(q, k, v, out, lse, d_out, dq_plan, scale=cfg.scale, dkv_plan=dkv_plan,
                                stages=cfg.stages, programs=cfg.bwd_programs, untiled_copies=cfg.untiled_copies)
  if cfg.backend == "pallas_gpu":
    return tuple(pallas_gpu.backward(q, k, v, out, lse, d_out, *plan, scale=cfg.scale, num_warps=cfg.num_warps,
                                     num_stages=cfg.bwd_num_stages, interpret=bool(cfg.interpret),
                                     poison=cfg.poison))
  grads = pallas_tpu.backward(*(_to_tpu(x, plan.l_pad) for x in (q, k, v, out)), lse, _to_tpu(d_out, plan.l_pad),
                              plan, scale=cfg.scale, interpret=cfg.interpret)
  return tuple(_from_tpu(g, q.shape[1]) for g in grads)


_attend.defvjp(_attend_fwd, _attend_bwd)
