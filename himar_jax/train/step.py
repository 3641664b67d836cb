"""The functional train step: merge inside jit, value_and_grad, AdamW update, EMA, non-finite detection.

Models implement `train_loss(batch, *, key, step) -> (loss, metrics)`, with every random draw (masking orders,
mask ratios, timesteps, noise, dropout) taken from `key`, so resumed runs and parity tests are reproducible.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from himar_jax.parallel import sharding as sharding_lib
from himar_jax.train.optimizer import ema_update
from himar_jax.train.state import TrainSetup, TrainState


def make_train_step(setup: TrainSetup, ema_decay: float) -> Callable:
  """Returns step(state, batch) -> (state, metrics), jitted with explicit shardings and the state donated.

  Every batch leaf is split along its leading dimension over data x fsdp (one sharding used as a tree prefix).
  """
  mesh = setup.mesh
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"config.optim.ema_decay={ema_decay} must lie in [0, 1).")

  def step_fn(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      model = setup.merge(params, state.buffers)
      return model.train_loss(batch, key=key, step=state.step)

    # The mesh the model's activation constraints (sharding_lib.constrain) refer to.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
