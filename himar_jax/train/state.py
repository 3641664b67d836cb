"""Train state (params, EMA, optimizer, step, RNG) with shardings derived from the params' logical axis names;
fresh, or with the params (and model buffers) of another run's checkpoint (`config.train.init_from`)."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
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


def _opt_state_shardings(abstract_opt, pure_params, param_shardings, replicated):
  """Each optimizer-state leaf that copies a param (Adam moments, under any wrapper: chain, masked,
  multi_transform with frozen leaves left out) gets that param's sharding, found by its key path ending in the
  param's path with the param's shape; everything else (step counts) is replicated."""
  by_path = {}
  for (path, a), s in zip(jax.tree_util.tree_flatten_with_path(pure_params)[0], jax.tree.leaves(param_shardings)):
    by_path[tuple(path)] = (tuple(a.shape), s)
  lengths = sorted({len(p) for p in by_path}, reverse=True)  # longest first: the most specific match

  def pick(path, leaf):
    for k in lengths:
      hit = by_path.get(tuple(path[-k:])) if k <= len(path) else None
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


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
  opt_shardings = _opt_state_shardings(abstract_opt, pure_params, param_shardings, repl)
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


def _flat_shapes(tree, prefix=()) -> dict[str, tuple]:
  """{dotted name: shape} of a nested dict of arrays / ShapeDtypeStructs / orbax ArrayMetadata."""
  from himar_jax.convert.state_dict import path_name
  out = {}
  for k, v in (tree.items() if isinstance(tree, Mapping) else ()):
    if isinstance(v, Mapping):
      out.update(_flat_shapes(v, prefix + (k,)))
    else:
      out[path_name(prefix + (k,))] = tuple(v.shape)
  return out


def _stored_tree(state_dir: str) -> dict:
  """The saved train state's metadata tree (nested dicts of ArrayMetadata with .shape)."""
  import orbax.checkpoint as ocp

  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(state_dir)
  for attr in ("item_metadata", "tree"):  # orbax versions wrap the tree differently
    meta = getattr(meta, attr, None) or meta
  return dict(meta)


def restore_params(setup: TrainSetup, directory: str, *, field: str = "params", step: int | None = None):
  """(params, buffers or None) of a checkpoint (a training run's checkpoints folder or a `convert` output), placed
  with this setup's shardings. Every param must exist with the model's shape (CheckpointMismatchError naming the
  missing / unexpected / mis-shaped ones); buffers (model constants such as a tokenizer's codebook) are taken when
  the checkpoint holds exactly the model's, else None (the freshly built ones stay)."""
  from himar_jax.convert.state_dict import find_problems, raise_problems
  from himar_jax.train import checkpoint as ckpt_lib

  if field not in ("params", "ema_params"):
    raise ValueError(f"config.train.init_from_field={field!r} must be 'params' or 'ema_params'.")
  step_dir, step = ckpt_lib.resolve_step_dir(directory, step)
  stored = _stored_tree(os.path.join(step_dir, "state"))
  if field not in stored:
    raise ValueError(f"checkpoint {step_dir} has no {field!r} (it holds {sorted(stored)}); set "
                     "config.train.init_from_field to one it has.")
  have = _flat_shapes(stored[field])
  want = _flat_shapes(setup.abstract_state.params)
  problems, _ = find_problems(have, want, what=f"checkpoint ({field})")
  raise_problems(problems, f"config.train.init_from: the {field} of {step_dir} do not fit the configured model "
                           "(use a checkpoint of the same model family, size and layout, e.g. the stage-1 run of "
                           "this variant)")
  abstract = {field: setup.abstract_state.params}
  buffers_ok = bool(jax.tree.leaves(setup.abstract_state.buffers)) and \
      _flat_shapes(stored.get("buffers", {})) == _flat_shapes(setup.abstract_state.buffers)
  if buffers_ok:
    abstract["buffers"] = setup.abstract_state.buffers
  elif jax.tree.leaves(setup.abstract_state.buffers):
    logging.getLogger(__name__).warning(
        "init_from %s: its buffers (model constants, e.g. a tokenizer's codebook) do not match the model's; "
        "keeping the freshly built ones (config.model.tokenizer for next-scale models)", step_dir)
  restored = ckpt_lib.restore_subtrees(directory, abstract, step=step)
  return restored[field], restored.get("buffers")


def init_train_state_from(setup: TrainSetup, seed: int, directory: str, *, field: str = "params",
                          adapt: Callable | None = None) -> TrainState:
  """A fresh train state (step 0, new optimizer state, the RNG of init_train_state(seed)) whose params, EMA and
  buffers come from a checkpoint (restore_params; buffers the checkpoint lacks are built as at init).
  adapt(params) -> params: a model family's edit of the restored params before training (e.g. HMAR stage 2
  starts its mask branch from the next-scale branch)."""
  params, buffers = restore_params(setup, directory, field=field)  # checks names and shapes first
  if buffers is None:
    buffers = init_train_state(setup, seed).buffers
  if adapt is not None:
    params = adapt(params)

  def fresh(params, buffers):
    # Distinct arrays for params and EMA (the step donates both; adapt may have shared subtrees).
    params, ema = jax.tree.map(lambda x: x * 1, params), jax.tree.map(lambda x: x * 1, params)
    train_key = jax.random.split(jax.random.key(seed))[1]  # as init_train_state
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=setup.tx.init(params),
                      buffers=buffers, rng=jax.random.key_data(train_key),
                      nonfinite_step=jnp.full((), -1, jnp.int32))

  return jax.jit(fresh, out_shardings=setup.state_shardings)(params, buffers)


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
