"""Frozen parameters and init_from in the trainer, HMAR stage 2 through the family hooks, and VAR's 'lin0' learning
rate schedule (checked against the formula of VAR's lr_control.py evaluated in float64 NumPy)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.next_scale import get_config
from himar_jax import config_lib
from himar_jax.convert.state_dict import CheckpointMismatchError, path_name
from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
from himar_jax.train import loop
from himar_jax import models
from himar_jax.models import next_scale
from himar_jax.train import optimizer as opt_lib
from himar_jax.train.state import init_train_state, make_train_setup, restore_params
from himar_jax.train.step import make_train_step
from toy_model import ToyRegressor, toy_batch, toy_config


def lin0_reference(step, peak, warmup, total, wp0, wpe):
  """VAR utils/lr_control.py lr_wd_annealing('lin0', ...) for one iteration, float64."""
  if step < warmup:
    return peak * (wp0 + (1 - wp0) * step / warmup)
  passed = (step - warmup) / (total - 1 - warmup)
  return peak * (1.0 if passed < 0.05 else wpe + (1 - wpe) * (1 - passed) / 0.95)


def test_lin0_schedule_matches_var_in_float64():
  peak, warmup, total, wp0, wpe = 3e-4, 40, 1000, 0.005, 0.1
  schedule = opt_lib.make_schedule(peak, warmup, total, "lin0", final_lr_fraction=wpe, warmup_start_fraction=wp0)
  steps = np.arange(total)
  ours = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)), np.float64)
  want = np.array([lin0_reference(int(s), peak, warmup, total, wp0, wpe) for s in steps])
  np.testing.assert_allclose(ours, want, rtol=2e-6)
  assert want[0] == pytest.approx(peak * wp0) and want[-1] == pytest.approx(peak * wpe)
  assert np.all(want[warmup:warmup + 48] == peak) and want[warmup + 49] < peak  # the 5 % hold
  assert float(schedule(5 * total)) == pytest.approx(peak * wpe)  # past the end: stays at wpe
  with pytest.raises(ValueError, match="needs total_steps=10 > warmup_steps=9 \\+ 1"):
    opt_lib.make_schedule(1.0, 9, 10, "lin0")
  # The next-scale configs use it with VAR's / HMAR's end fractions, and validate accepts the name.
  for variant, end in (("var_d16", 0.01), ("hmar_d16", 0.1)):
    c = get_config(variant)
    assert (c.optim.schedule, c.optim.warmup_start_fraction, c.optim.final_lr_fraction) == ("lin0", 0.005, end)
    config_lib.validate(c)


def test_frozen_params_get_no_update_no_decay_no_moments_and_ema_stays_exact():
  config = toy_config()
  config.optim.update(lr=0.1, weight_decay=0.5, grad_clip=1.0)
  params = {"a": jnp.full((2, 2), 2.0), "b": jnp.full((2, 2), 3.0)}
  grads = {"a": jnp.full((2, 2), 0.3), "b": jnp.full((2, 2), 100.0)}
  tx = opt_lib.make_optimizer(config, 10, trainable=lambda p: {"a": True, "b": False})
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates["b"], 0.0)
  # First Adam step: m / sqrt(v) = sign(g) = 1 (eps 1e-8), plus decoupled decay 0.5 * 2; clipping saw only "a"
  # (norm 0.6 < 1), not b's 200.
  np.testing.assert_allclose(updates["a"], -0.1 * (1.0 + 0.5 * 2.0), rtol=1e-6)
  moments = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (2, 2)]
  assert len(moments) == 2  # mu and nu of "a" only
  x = jax.random.normal(jax.random.key(0), (1000,)) * 1e3
  out = opt_lib.ema_update({"w": x}, {"w": x}, 0.9999)
  np.testing.assert_array_equal(out["w"], x)  # bit-exact: frozen params' EMA does not drift


def test_trainer_step_with_frozen_params_on_a_2x2x2_mesh():
  """The jitted train step with a trainable mask: frozen params and their EMA stay bit-exact, the rest trains,
  the optimizer state (moments of trainable params only) keeps its params' shardings over fsdp."""
  config = toy_config()
  config.optim.weight_decay = 0.1
  frozen = ("fc2", "norm")
  tx = opt_lib.make_optimizer(config, 10, trainable=lambda p: {k: jax.tree.map(lambda _: k not in frozen, v)
                                                                for k, v in p.items()})
  setup = make_train_setup(ToyRegressor, tx, mesh_lib.make_mesh((2, 2, 2)))
  state = init_train_state(setup, seed=0)
  before = jax.device_get(state)
  step = make_train_step(setup, 0.9)
  for i in range(2):
    state, _ = step(state, sharding_lib.shard_batch(toy_batch(i), setup.mesh))
  after, ema = _flat(state.params), _flat(state.ema_params)
  for name, value in _flat(before.params).items():
    if name.startswith(frozen):
      np.testing.assert_array_equal(after[name], value, err_msg=name)
      np.testing.assert_array_equal(ema[name], value, err_msg=name)
    else:
      assert not np.array_equal(after[name], value), name
  mu = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 2]
  assert len(mu) == 2 and all(m.sharding.spec == state.params["fc1"]["kernel"].sharding.spec for m in mu)


def _hmar_setup(variant, **model):
  config = get_config(variant)
  config.model.update(model)
  config.optim.update(lr=1e-2, warmup_steps=0)
  setup = make_train_setup(models.model_fn(config), loop.optimizer_for(config, 10), mesh_lib.make_mesh((-1, 1, 1)))
  return config, setup


def _flat(tree):
  return {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory):
  """A tiny-HMAR checkpoint at step 7 (params != ema_params, random buffers) in the layout of a training run /
  `convert` output, written from NumPy draws (no model init to compile), and the stage-2 config / setup."""
  import orbax.checkpoint as ocp
  directory = tmp_path_factory.mktemp("stage1") / "checkpoints"
  config, setup = _hmar_setup("hmar_tiny_stage2")
  rng = np.random.default_rng(0)
  draw = lambda tree: jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), tree)
  abstract = setup.abstract_state
  saved = {"params": draw(abstract.params), "ema_params": draw(abstract.params), "buffers": draw(abstract.buffers),
           "step": np.int32(7)}
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(str(directory / "7" / "state"), jax.tree.map(jnp.asarray, saved))
  return str(directory), saved, config, setup


def test_stage2_starts_from_stage1_with_only_the_mask_branch_trainable(stage1_checkpoint):
  directory, stage1, config, setup = stage1_checkpoint
  config.train.init_from = directory
  state = loop.initial_state(config, setup)
  p, s1 = _flat(state.params), _flat(stage1["params"])
  for name, value in p.items():  # mask branch <- next-scale branch; everything else as saved
    source = name.replace("mask_blocks", "ns_blocks").replace("mask_head", "ns_head")
    np.testing.assert_array_equal(value, s1[source], err_msg=name)
  jax.tree.map(np.testing.assert_array_equal, _flat(state.ema_params), p)
  jax.tree.map(np.testing.assert_array_equal, _flat(state.buffers), _flat(stage1["buffers"]))  # codebook / phi
  assert int(state.step) == 0
  ema, _ = restore_params(setup, directory, field="ema_params")  # config.train.init_from_field="ema_params"
  np.testing.assert_array_equal(ema["word_embed"]["kernel"], stage1["ema_params"]["word_embed"]["kernel"])
  # Adam moments exist for the mask branch only (the official trains mask_embed, mask blocks and head).
  trainable = _flat(next_scale.trainable(config, state.params))
  assert {n for n, t in trainable.items() if t} == {n for n in p if n.startswith(("mask_embed", "mask_blocks",
                                                                                  "mask_head"))}
  n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert n_moments == 2 * sum(p[n].size for n, t in trainable.items() if t)
  updates, _ = jax.jit(setup.tx.update)(jax.tree.map(jnp.ones_like, state.params), state.opt_state, state.params)
  for name, u in _flat(updates).items():
    assert np.any(u != 0) == trainable[name], name  # frozen: exactly zero (no Adam step, no weight decay)


def test_stage1_hmar_freezes_the_unused_mask_branch_and_var_trains_everything():
  config = get_config("hmar_tiny")
  params = {"mask_embed": 0, "mask_blocks": {0: {"k": 0}}, "ns_blocks": {0: {"k": 0}}, "word_embed": {"kernel": 0}}
  assert next_scale.trainable(config, params) == {
      "mask_embed": False, "mask_blocks": {0: {"k": False}}, "ns_blocks": {0: {"k": True}},
      "word_embed": {"kernel": True}}
  assert all(jax.tree.leaves(next_scale.trainable(get_config("var_tiny"), {"blocks": {0: 0}, "head": 1})))


def test_init_from_a_checkpoint_of_another_model_names_the_mismatches(stage1_checkpoint, tmp_path):
  directory = stage1_checkpoint[0]
  config, setup = _hmar_setup("hmar_tiny_stage2", width=64, num_heads=2)
  config.train.init_from = directory
  with pytest.raises(CheckpointMismatchError) as e:
    loop.initial_state(config, setup)
  msg = str(e.value)
  assert "init_from: the params of" in msg and "/7 do not fit" in msg
  assert "shape: base_blocks.0.ada_lin.bias is (384,) in the model, (192,) in the checkpoint (params)" in msg
  config, setup = _hmar_setup("hmar_tiny_stage2", depth=4)
  config.train.init_from = directory
  with pytest.raises(CheckpointMismatchError, match="missing: base_blocks.2.ada_lin.kernel"):
    loop.initial_state(config, setup)
  config.model.depth = 3
  config.train.init_from_field = "opt_state_x"
  with pytest.raises(ValueError, match="init_from_field='opt_state_x' must be 'params' or 'ema_params'"):
    loop.initial_state(config, setup)
  config.train.init_from, config.train.init_from_field = str(tmp_path / "none"), "params"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loop.initial_state(config, setup)
