"""Per-example indexing that stays batch-parallel under a sharded mesh."""
from __future__ import annotations

import jax


def scatter_rows(dest, rows, values):
  """dest (B, N, ...) with dest[b, rows[b, i]] = values[b, i] (rows (B, K), values (B, K, ...)).

  vmapped, so the scatter carries the batch as an operand batching dimension and a data-parallel mesh partitions
  it by batch; indexing with an explicit arange(B) column instead makes XLA's SPMD partitioner all-gather the
  whole batch onto every device (measured: 1.53x instead of ~2x on two GPUs, +11 GiB per device). With repeated
  rows one of the values wins (callers send padding to a scratch row they drop).
  """
  return jax.vmap(lambda d, r, v: d.at[r].set(v))(dest, rows, values)
