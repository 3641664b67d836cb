"""The functional train step: merge inside jit, value_and_grad, AdamW update, EMA, non-finite detection.

Models implement `train_loss(batch, *, key, step) -> (loss, metrics)`, with every random draw (masking orders,
mask ratios, timesteps, noise, dropout) taken from `key`, so resumed runs and parity tests are reproducible.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from himar_jax.parallel import sharding as sharding_lib
from himar_jax.train.optimizer import ema_update
from himar_jax.train.state import TrainSetup, TrainState

GRADIENT_MODES = ("spmd", "per_device")


def _check_gradient_mode(gradients: str, mesh) -> None:
  if gradients not in GRADIENT_MODES:
    raise ValueError(f"config.mesh.gradients={gradients!r} is not one of {GRADIENT_MODES}.")
  if gradients == "per_device" and (mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1):
    raise ValueError(f"config.mesh.gradients='per_device' is pure data parallelism, but the mesh {dict(mesh.shape)} "
                     "shards over fsdp or tensor; use config.mesh.shape=(-1, 1, 1) or gradients='spmd'.")


def make_train_step(setup: TrainSetup, ema_decay: float, *, gradients: str = "spmd") -> Callable:
  """Returns step(state, batch) -> (state, metrics), jitted with explicit shardings and the state donated.

  Every batch leaf is split along its leading dimension over data x fsdp (one sharding used as a tree prefix).

  gradients: how the loss and its gradients are computed over a data-parallel mesh.
    spmd:       one global program that XLA's SPMD partitioner splits (every strategy; every random draw is
                made for the global batch, so the losses equal one device's for any mesh).
    per_device: pure data parallelism (mesh (n, 1, 1)) as PyTorch DDP does it: each device runs the one-device
                program on its local batch inside jax.shard_map, with its own draws (the step key folded with
                the device's data index: its own mask ratio, timesteps, noise and dropout), and the gradients
                are averaged by one all-reduce. The per-device program is the one-device program, which the
                partitioned one is not: on two H200s XLA fused the partitioned Hi-MAR-B backward differently
                (+7.6% kernel time per device, bench/notes.md v5). Losses are the mean of the devices' losses.
  """
  mesh = setup.mesh
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"config.optim.ema_decay={ema_decay} must lie in [0, 1).")
  _check_gradient_mode(gradients, mesh)
  per_device = gradients == "per_device" and mesh.shape["data"] > 1

  def loss_and_grads(params, buffers, batch, key, step):
    def loss_fn(p):
      return setup.merge(p, buffers).train_loss(batch, key=key, step=step)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  def local_loss_and_grads(params, buffers, batch, key, step):
    key = jax.random.fold_in(key, jax.lax.axis_index("data"))
    (loss, metrics), grads = loss_and_grads(sharding_lib.mark_varying(params, ("data",)), buffers, batch, key,
                                            step)
    mean = lambda tree: jax.tree.map(lambda v: jax.lax.pmean(v.astype(jnp.result_type(v, jnp.float32)), "data"),
                                     tree)
    return (mean(loss), mean(metrics)), mean(grads)

  def step_fn(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if per_device:
      (loss, metrics), grads = jax.shard_map(
          local_loss_and_grads, mesh=mesh, in_specs=(P(), P(), P("data"), P(), P()),
          out_specs=((P(), P()), P()))(state.params, state.buffers, batch, key, state.step)
    else:
      # The mesh the model's activation constraints (sharding_lib.constrain) refer to.
      with sharding_lib.use_mesh_for_tracing(mesh):
        (loss, metrics), grads = loss_and_grads(state.params, state.buffers, batch, key, state.step)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_update(state.ema_params, params, ema_decay),
                              nonfinite_step=nonfinite_step)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(setup.state_shardings, sharding_lib.batch_sharding(mesh, 1)),
                 out_shardings=(setup.state_shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
