"""Restore EMA params onto any mesh and sample, batched over all devices (one jitted call per batch shape)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from himar_jax import models
from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
from himar_jax.train import checkpoint as ckpt_lib
from himar_jax.train.state import split_model


@dataclasses.dataclass
class RestoredModel:
  graphdef: Any
  params: Any
  buffers: Any
  mesh: Mesh

  def module(self) -> nnx.Module:
    return nnx.merge(self.graphdef, nnx.State(self.params), nnx.State(self.buffers))


def restore_model_for_sampling(config, checkpoint_dir: str, *, mesh: Mesh | None = None, step: int | None = None,
                               which: str = "ema_params") -> RestoredModel:
  """EMA (or raw) params of a checkpoint, placed with the config's logical-axis shardings on `mesh`
  (default: every device, data parallel)."""
  if which not in ("ema_params", "params"):
    raise ValueError(f"which={which!r} must be 'ema_params' or 'params'.")
  mesh = mesh or mesh_lib.make_mesh((-1, 1, 1))
  abstract_model = nnx.eval_shape(lambda: models.model_fn(config)(nnx.Rngs(0)))
  graphdef, abstract_params, abstract_buffers = split_model(abstract_model)
  pure_shardings = sharding_lib.param_shardings(abstract_params, mesh)
  repl = sharding_lib.replicated(mesh)
  abstract = {
      which: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_params), pure_shardings),
      "buffers": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                              nnx.to_pure_dict(abstract_buffers)),
  }
  restored = ckpt_lib.restore_subtrees(checkpoint_dir, abstract, step=step)
  return RestoredModel(graphdef, restored[which], restored["buffers"], mesh)


@functools.lru_cache(maxsize=16)
def _sampler(graphdef, sample_kwargs: tuple):
  """One jitted sampler per (model structure, sampler settings): repeated calls (evaluation chunks, grids) reuse
  the compiled program instead of tracing a new closure each time."""
  kwargs = dict(sample_kwargs)

  @jax.jit
  def sample(params, buffers, labels, keys):
    model = nnx.merge(graphdef, nnx.State(params), nnx.State(buffers))
    return model.sample(labels, keys=keys, **kwargs)

  return sample


def _to_host(x) -> np.ndarray:
  """The whole global array on every process (a multi-host array has shards this process cannot read)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sample_batches(restored: RestoredModel, labels: np.ndarray, *, seed: int, batch_size: int | None = None,
                   start_index: int = 0, **sample_kwargs) -> np.ndarray:
  """Samples one image per label with model.sample(labels, keys=...), in global batches sharded over the mesh.

  Sample i (counted from `start_index`) uses key fold_in(key(seed), start_index + i), so a sample depends only
  on (seed, its index), not on the batch or chunk it was drawn in, as long as the model draws per-row randomness
  from its row key. Every process passes the same labels and gets all samples back.
  """
  labels = np.asarray(labels, np.int32)
  n_dev = sharding_lib.data_parallel_size(restored.mesh)
  batch_size = batch_size or max(n_dev, min(len(labels), 64))
  batch_size = -(-batch_size // n_dev) * n_dev
  batch_sh = sharding_lib.batch_sharding(restored.mesh, 1)
  sample = _sampler(restored.graphdef, tuple(sorted(sample_kwargs.items())))
  base = jax.random.key(seed)
  out = []
  for start in range(0, len(labels), batch_size):
    chunk = labels[start:start + batch_size]
    n = len(chunk)
    padded = np.concatenate([chunk, np.zeros(batch_size - n, np.int32)])
    first = start_index + start
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(first, first + batch_size))
    images = sample(restored.params, restored.buffers, jax.device_put(padded, batch_sh),
                    jax.device_put(keys, batch_sh))
    out.append(_to_host(images)[:n])
  return np.concatenate(out)


def sample_class_grid(restored: RestoredModel, config, *, num_classes: int, per_class: int, seed: int) -> np.ndarray:
  """(num_classes, per_class, H, W, C) images in [-1, 1], row r of class r."""
  labels = np.repeat(np.arange(num_classes), per_class)
  images = sample_batches(restored, labels, seed=seed, **models.family_module(config).sample_kwargs(config))
  return images.reshape((num_classes, per_class) + images.shape[1:])
