"""grain pipelines: deterministic shuffling, per-host sharding, per-example random augmentation, batching, and
an iterator whose state goes into every checkpoint (so a resumed run sees exactly the batches it would have)."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import grain
import jax
import numpy as np


class ArraySource:
  """Random access over a dict of equally long numpy arrays; one record is a dict of rows."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"ArraySource arrays differ in length: {lengths}.")
    self._arrays = dict(arrays)
    self._len = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int):
    return {k: v[index] for k, v in self._arrays.items()}


def local_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"config.data.global_batch_size={global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}.")
  return global_batch_size // process_count


def make_iterator(source, *, global_batch_size: int, seed: int,
                  transform: Callable[[dict, np.random.Generator], dict] | None = None,
                  batch_transform: Callable[[dict], dict] | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  num_workers: int = 0) -> grain.DatasetIterator:
  """An endless iterator of this process's share of each global batch (numpy dicts).

  Records are sharded by process first (`[i::n]`), then shuffled with a seed that reshuffles every epoch, then
  transformed with a per-record generator derived from (seed, position), so the stream is a pure function of
  (seed, step) and the iterator state restores it exactly. `batch_transform` (deterministic) maps each stacked
  batch: vectorised work that would otherwise run once per record (e.g. latent_pipeline.kl_finish).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  batch = local_batch_size(global_batch_size, process_count)
  if len(source) < process_count:
    raise ValueError(f"dataset of {len(source)} records is smaller than the process count {process_count}.")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.seed(seed).shuffle().repeat(None)
  if transform is not None:
    ds = ds.random_map(transform)
  ds = ds.batch(batch, drop_remainder=True)
  if batch_transform is not None:
    ds = ds.map(batch_transform)
  threads = max(num_workers, 1)  # grain warns when its prefetch buffer is smaller than its thread count
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads)))
  if num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(iter_ds)
