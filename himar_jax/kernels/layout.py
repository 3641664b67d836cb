"""Scale layouts for block-sparse attention: which keys each query row may see, and which tiles to visit.

A layout is a list of scale sizes (tokens per scale, e.g. pn**2 for VAR's patch_nums) and a pattern:
  block_diagonal  scale k attends to scale k only (HMAR's next-scale Markov mask)
  block_causal    scale k attends to scales 0..k (VAR's training mask)
  full            every row attends to every real key
Every pattern gives each row r one contiguous key range [row_start[r], row_end[r]) whose ends never decrease with
r. That is what lets a kernel skip tiles: the keys of a query tile form one range of key tiles, and the queries
that see a key tile form one range of query tiles. Both are computed here with numpy at trace time.

Padding: kernels work on L rounded up to a multiple of the tile size. A padding row attends to the padding keys
[L, L_pad) (finite logits, no empty softmax); real rows never see padding keys.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

PATTERNS = ("block_diagonal", "block_causal", "full")


@dataclasses.dataclass(frozen=True)
class ScaleLayout:
  """Token counts per scale plus a pattern; hashable so it can be a static argument under jit."""
  scale_sizes: tuple[int, ...]
  pattern: str

  def __post_init__(self):
    if self.pattern not in PATTERNS:
      raise ValueError(f"layout pattern={self.pattern!r} is not one of {PATTERNS}.")
    sizes = tuple(int(s) for s in self.scale_sizes)
    if not sizes or min(sizes) < 1:
      raise ValueError(f"scale_sizes={self.scale_sizes!r} must be a non-empty list of positive token counts.")
    object.__setattr__(self, "scale_sizes", sizes)

  @classmethod
  def from_patch_nums(cls, patch_nums, pattern: str) -> ScaleLayout:
    """VAR / HMAR layout: scale k is a pn_k x pn_k token grid (patch_nums 1..16 give L = 680)."""
    return cls(tuple(int(p) * int(p) for p in patch_nums), pattern)

  @property
  def length(self) -> int:
    return int(sum(self.scale_sizes))

  def padded_length(self, block: int) -> int:
    return int(math.ceil(self.length / block) * block)

  def row_ranges(self, l_pad: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row key range [start, end) as int32 arrays of length l_pad (padding rows see [L, l_pad))."""
    length = self.length
    l_pad = length if l_pad is None else l_pad
    if l_pad < length:
      raise ValueError(f"l_pad={l_pad} is shorter than the layout length {length}.")
    ends = np.cumsum(self.scale_sizes)
    starts = ends - np.asarray(self.scale_sizes)
    scale_of_row = np.repeat(np.arange(len(self.scale_sizes)), self.scale_sizes)
    row_end = ends[scale_of_row]
    if self.pattern == "block_diagonal":
      row_start = starts[scale_of_row]
    elif self.pattern == "block_causal":
      row_start = np.zeros(length, np.int64)
    else:
      row_start = np.zeros(length, np.int64)
      row_end = np.full(length, length, np.int64)
    pad = l_pad - length
    row_start = np.concatenate([row_start, np.full(pad, length)]).astype(np.int32)
    row_end = np.concatenate([row_end, np.full(pad, l_pad)]).astype(np.int32)
    return row_start, row_end

  def dense_mask(self, l_pad: int | None = None) -> np.ndarray:
    """(L, L) boolean mask, True = attend (the reference's mask)."""
    row_start, row_end = self.row_ranges(l_pad)
    cols = np.arange(row_start.shape[0])
    return (cols[None, :] >= row_start[:, None]) & (cols[None, :] < row_end[:, None])

  def density(self) -> float:
    """Fraction of the L x L logits that are attended."""
    row_start, row_end = self.row_ranges()
    return float(np.sum(row_end - row_start)) / float(self.length) ** 2


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """Trace-time tile schedule for one layout and tile sizes (all arrays int32, numpy).

  kv_lo/kv_hi[i]: key tiles [kv_lo, kv_hi) that query tile i must visit (size block_k).
  q_lo/q_hi[j]:   query tiles [q_lo, q_hi) that see key tile j (size block_q).
  kv_full_lo/kv_full_hi[i], q_full_lo/q_full_hi[j]: the sub-ranges of tile pairs where every row sees every key
  and no row or key is padding (a kernel skips masks there); kv_lo <= kv_full_lo <= kv_full_hi <= kv_hi.
  """
  l_pad: int
  block_q: int
  block_k: int
  row_start: np.ndarray
  row_end: np.ndarray
  kv_lo: np.ndarray
  kv_hi: np.ndarray
  q_lo: np.ndarray
  q_hi: np.ndarray
  kv_full_lo: np.ndarray
  kv_full_hi: np.ndarray
  q_full_lo: np.ndarray
  q_full_hi: np.ndarray
  length: int  # L (rows from L to l_pad are padding)

  @property
  def visited_fraction(self) -> float:
    """Fraction of all (query tile, key tile) pairs that are visited."""
    n_q, n_k = self.l_pad // self.block_q, self.l_pad // self.block_k
    return float(np.sum(self.kv_hi - self.kv_lo)) / (n_q * n_k)


def plan_tiles(layout: ScaleLayout, block_q: int, block_k: int, l_pad: int | None = None) -> TilePlan:
  """Pads L (to l_pad, default the next multiple of both tile sizes) and computes the visited tile ranges."""
  l_pad = layout.padded_length(math.lcm(block_q, block_k)) if l_pad is None else l_pad
  if l_pad % block_q or l_pad % block_k or l_pad < layout.length:
    raise ValueError(f"l_pad={l_pad} must be >= L={layout.length} and a multiple of {block_q} and {block_k}.")
  row_start, row_end = layout.row_ranges(l_pad)
  if np.any(np.diff(row_start) < 0) or np.any(np.diff(row_end) < 0) or np.any(row_end <= row_start):
    raise ValueError("row ranges must be non-empty with non-decreasing ends for tile skipping.")
  n_q, n_k = l_pad // block_q, l_pad // block_k
  starts_q = row_start.reshape(n_q, block_q)
  ends_q = row_end.reshape(n_q, block_q)
  kv_lo = starts_q.min(axis=1) // block_k
  kv_hi = -(-ends_q.max(axis=1) // block_k)
  # Query tiles that see key tile j: those whose [kv_lo, kv_hi) contains j (contiguous: both ends monotone).
  tiles = np.arange(n_k)
  sees = (kv_lo[:, None] <= tiles[None, :]) & (tiles[None, :] < kv_hi[:, None])  # (n_q, n_k)
  if not np.all(sees.any(axis=0)):
    raise ValueError("every key tile must be seen by some query tile (padding keys included).")
  q_lo = np.argmax(sees, axis=0)
  q_hi = n_q - np.argmax(sees[::-1], axis=0)
  assert np.array_equal(sees.sum(axis=0), q_hi - q_lo), "query tiles seeing a key tile must be contiguous"
  # Full pairs: the tile's latest start <= the key tile's first key, its earliest end >= the key tile's end,
  # and neither tile holds padding.
  length = layout.length
  real_q = (np.arange(1, n_q + 1) * block_q) <= length
  real_k = (np.arange(1, n_k + 1) * block_k) <= length
  full = ((starts_q.max(axis=1)[:, None] <= tiles[None, :] * block_k)
          & (ends_q.min(axis=1)[:, None] >= (tiles[None, :] + 1) * block_k)
          & real_q[:, None] & real_k[None, :])
  kv_full_lo, kv_full_hi = _contiguous(full, kv_hi)
  q_full_lo, q_full_hi = _contiguous(full.T, q_hi)
  i32 = lambda x: np.asarray(x, np.int32)
  return TilePlan(l_pad, block_q, block_k, row_start, row_end, i32(kv_lo), i32(kv_hi), i32(q_lo), i32(q_hi),
                  i32(kv_full_lo), i32(kv_full_hi), i32(q_full_lo), i32(q_full_hi), length)


def _contiguous(rows: np.ndarray, empty_at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per row of a boolean matrix, the [lo, hi) of its True entries (asserted contiguous); [e, e) if none."""
  any_true = rows.any(axis=1)
  lo = np.where(any_true, np.argmax(rows, axis=1), empty_at)
  hi = np.where(any_true, rows.shape[1] - np.argmax(rows[:, ::-1], axis=1), empty_at)
  assert np.array_equal(rows.sum(axis=1), hi - lo), "full tiles must be contiguous"
  return lo, hi


def key_ranges(row_start: np.ndarray, row_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per key j < len(row_start), the query rows [start, end) that see it (int32; contiguous and non-decreasing).

  Row i sees key j iff row_start[i] <= j < row_end[i]; both ends are non-decreasing in i, so those rows run from
  the first i with row_end[i] > j to the first i with row_start[i] > j.
  """
  keys = np.arange(row_start.shape[0])
  start = np.searchsorted(row_end, keys, side="right")
  end = np.searchsorted(row_start, keys, side="right")
  return start.astype(np.int32), end.astype(np.int32)


def segment_starts(scale_sizes, block: int) -> tuple[int, ...]:
  """First rows of the tile segments: scale starts, with runs of consecutive scales merged while the run fits in
  one `block`-row tile (VAR's first scales hold 1, 4, 9, ... tokens)."""
  starts, run, first = [], 0, 0
  for size in scale_sizes:
    if run and run + size > block:
      starts.append(first)
      first, run = first + run, 0
    run += size
  starts.append(first)
  return tuple(starts)


# Fields of one RowTiles table entry, in order (TABLE_WIDTH int32 per tile, the rest zero).
TILE_FIELDS = ("row0", "row_end", "col0", "steps", "full_lo", "full_hi")
TABLE_WIDTH = 8


@dataclasses.dataclass(frozen=True)
class RowTiles:
  """Work tiles for the Triton-lowering kernels: `block_rows` rows each, with a run of `block_cols`-wide steps.

  Rows see columns through per-row ranges [starts, ends) (queries -> keys for the forward and dq; keys -> queries
  for dk/dv). Tile i computes rows row0[i] + [0, block_rows) but owns (stores) only [row0[i], row_end[i]): a tile
  never crosses a segment start, so with segments at scale starts (`segment_starts`) it visits only its own
  scales' columns instead of the union over a fixed 64-row grid. Its steps cover columns col0[i] +
  [0, steps[i] * block_cols) from the first column any owned row sees; steps [full_lo[i], full_hi[i]) need no
  mask (every owned row sees every column of the step, none past L). Tiles are ordered heaviest first.
  Rows >= L (up to l_ext, which every tile's rows and steps stay inside) see nothing.
  """
  length: int
  block_rows: int
  block_cols: int
  l_ext: int
  starts: np.ndarray
  ends: np.ndarray
  table: np.ndarray  # (n_tiles, TABLE_WIDTH) int32, columns TILE_FIELDS

  @property
  def num_tiles(self) -> int:
    return int(self.table.shape[0])

  def field(self, name: str) -> np.ndarray:
    return self.table[:, TILE_FIELDS.index(name)]

  @property
  def visited(self) -> int:
    """(tile, step) pairs visited: the work, in block_rows x block_cols units."""
    return int(self.field("steps").sum())


def extended_length(length: int, *blocks: int) -> int:
  """Rows the per-row arrays must cover so that every tile's rows and steps stay inside: L plus one block,
  rounded up to a multiple of the largest block."""
  big = max(blocks)
  return int(math.ceil((length + big) / big) * big)


def plan_row_tiles(starts: np.ndarray, ends: np.ndarray, segments, block_rows: int, block_cols: int,
                   l_ext: int | None = None) -> RowTiles:
  """RowTiles for rows [0, L) with per-row column ranges starts/ends (length L, non-decreasing, non-empty) cut
  at the given segment starts (e.g. `segment_starts(scale_sizes, block_rows)`, or (0,) for a plain grid)."""
  length = int(starts.shape[0])
  l_ext = extended_length(length, block_rows, block_cols) if l_ext is None else l_ext
  if l_ext < extended_length(length, block_rows, block_cols):
    raise ValueError(f"l_ext={l_ext} is shorter than {extended_length(length, block_rows, block_cols)} "
                     f"(L={length} plus one {max(block_rows, block_cols)}-row block).")
  if np.any(np.diff(starts) < 0) or np.any(np.diff(ends) < 0) or np.any(ends <= starts) or ends.max() > length:
    raise ValueError("row ranges must be non-empty, inside [0, L), with non-decreasing ends.")
  bounds = [*sorted(set(int(s) for s in segments)), length]
  if bounds[0] != 0 or bounds[-2] >= length:
    raise ValueError(f"segment starts {tuple(segments)} must begin at 0 and lie inside [0, L={length}).")
  rows = []
  for g0, g1 in zip(bounds[:-1], bounds[1:]):
    for row0 in range(g0, g1, block_rows):
      own = slice(row0, min(row0 + block_rows, g1))
      col0, col_end = int(starts[own].min()), int(ends[own].max())
      steps = -(-(col_end - col0) // block_cols)
      # Full steps j: col0 + j*bc >= the latest start and col0 + (j+1)*bc <= the earliest end of the owned rows.
      full_lo = -(-(int(starts[own].max()) - col0) // block_cols)
      full_hi = (int(ends[own].min()) - col0) // block_cols
      if full_hi <= full_lo:
        full_lo = full_hi = steps
      rows.append((row0, own.stop, col0, steps, full_lo, full_hi))
  table = np.zeros((len(rows), TABLE_WIDTH), np.int32)
  table[:, :len(TILE_FIELDS)] = np.asarray(rows, np.int32)
  table = table[np.argsort(-table[:, TILE_FIELDS.index("steps")], kind="stable")]
  pad = l_ext - length
  ext_starts = np.concatenate([starts, np.full(pad, length)]).astype(np.int32)
  ext_ends = np.concatenate([ends, np.full(pad, length)]).astype(np.int32)
  return RowTiles(length, block_rows, block_cols, l_ext, ext_starts, ext_ends, table)


def plan_attention_tiles(layout: ScaleLayout, block_q: int, block_k: int, *, align: bool,
                         l_ext: int | None = None) -> tuple[RowTiles, RowTiles]:
  """(query tiles over keys, key tiles over queries) for one layout: the forward / dq and the dk/dv work.
  align=True cuts tiles at scale starts (`segment_starts`), False on a plain block_q grid."""
  row_start, row_end = layout.row_ranges()
  l_ext = extended_length(layout.length, block_q, block_k) if l_ext is None else l_ext
  segments = segment_starts(layout.scale_sizes, block_q) if align else (0,)
  queries = plan_row_tiles(row_start, row_end, segments, block_q, block_k, l_ext)
  keys = plan_row_tiles(*key_ranges(row_start, row_end), segment_starts(layout.scale_sizes, block_k) if align
                        else (0,), block_k, block_q, l_ext)
  return queries, keys


# VAR / HMAR patch_nums (tokens per scale = pn**2). The 1024px list is the one whose L (9451) and block-diagonal
# density (27.5%) match HMAR's kernel notes.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
