"""Train state (params, EMA, optimizer, step, RNG) with shardings derived from the params' logical axis names."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from himar_jax.parallel import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: number of optimizer updates applied
  params: Any                # nested dict of float32 arrays (nnx.to_pure_dict of the model's nnx.Param state)
  ema_params: Any            # same structure as params
  opt_state: Any             # optax state over params
  buffers: Any               # non-trainable model variables (constants), pure dict
  rng: jax.Array             # uint32 raw key; the step key is fold_in(rng, step)
  nonfinite_step: jax.Array  # int32: first step whose loss or gradient norm was NaN/Inf, -1 if none


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything the step, checkpointing and sampling need, derived once from the config and the mesh."""
  mesh: Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  abstract_state: TrainState      # ShapeDtypeStructs carrying the target shardings
  state_shardings: TrainState     # NamedShardings, same structure
  param_shardings: Any            # NamedShardings of params alone (EMA restore, sampling)
  model_fn: Callable[[nnx.Rngs], nnx.Module]

  def merge(self, params, buffers) -> nnx.Module:
    """A model view of pure-dict params (inside jit: the functional NNX pattern)."""
    return nnx.merge(self.graphdef, nnx.State(params), nnx.State(buffers))


def split_model(model: nnx.Module):
  graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
  return graphdef, params, buffers


def _with_sharding(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def make_train_setup(model_fn: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
                     mesh: Mesh) -> TrainSetup:
  """Traces `model_fn` abstractly (no weights allocated) to derive the state's structure and shardings."""
  abstract_model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
  graphdef, abstract_params, abstract_buffers = split_model(abstract_model)
  param_shardings = sharding_lib.param_shardings(abstract_params, mesh)
  buffer_shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), nnx.to_pure_dict(abstract_buffers))
  pure_params = nnx.to_pure_dict(abstract_params)
  abstract_opt = jax.eval_shape(tx.init, pure_params)
  repl = sharding_lib.replicated(mesh)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: repl)
  state_shardings = TrainState(step=repl, params=param_shardings, ema_params=param_shardings,
                               opt_state=opt_shardings, buffers=buffer_shardings, rng=repl, nonfinite_step=repl)
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=pure_params, ema_params=pure_params,
      opt_state=abstract_opt, buffers=nnx.to_pure_dict(abstract_buffers),
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32), nonfinite_step=jax.ShapeDtypeStruct((), jnp.int32))
  abstract = _with_sharding(abstract, state_shardings)
  return TrainSetup(mesh=mesh, graphdef=graphdef, tx=tx, abstract_state=abstract,
                    state_shardings=state_shardings, param_shardings=param_shardings, model_fn=model_fn)


def init_train_state(setup: TrainSetup, seed: int) -> TrainState:
  """Initialises params directly into their shardings (jit with pinned out_shardings: no host copy)."""

  def init():
    key = jax.random.key(seed)
    init_key, train_key = jax.random.split(key)
    model = setup.model_fn(nnx.Rngs(init_key))
    _, params, buffers = split_model(model)
    params = nnx.to_pure_dict(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=setup.tx.init(params), buffers=nnx.to_pure_dict(buffers),
                      rng=jax.random.key_data(train_key), nonfinite_step=jnp.full((), -1, jnp.int32))

  return jax.jit(init, out_shardings=setup.state_shardings)()


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
