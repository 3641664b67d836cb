import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
from himar_jax.train import checkpoint as ckpt_lib
from himar_jax.train import optimizer as opt_lib
from himar_jax.train.state import init_train_state, make_train_setup
from himar_jax.train.step import make_train_step
from toy_model import ToyRegressor, toy_batch, toy_config


def _trained_state(mesh_shape, steps=3):
  config = toy_config()
  setup = make_train_setup(ToyRegressor, opt_lib.make_optimizer(config, 10), mesh_lib.make_mesh(mesh_shape))
  state = init_train_state(setup, seed=0)
  step = make_train_step(setup, config.optim.ema_decay)
  for i in range(steps):
    state, _ = step(state, sharding_lib.shard_batch(toy_batch(i), setup.mesh))
  return jax.block_until_ready(state), config


def test_checkpoint_from_data_mesh_restores_onto_fsdp_mesh(tmp_path):
  state, config = _trained_state((8, 1, 1))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(3, state, force=True)
  ckpt.wait()
  target = make_train_setup(ToyRegressor, opt_lib.make_optimizer(config, 10), mesh_lib.make_mesh((2, 4, 1)))
  restored = ckpt_lib.Checkpointer(str(tmp_path / "ckpt")).restore(3, target.abstract_state)
  # Same values everywhere, now laid out on the (2, 4) mesh: embed -> fsdp (4).
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, restored)
  kernel = restored.params["fc1"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", None) and dict(kernel.sharding.mesh.shape)["fsdp"] == 4
  mu = restored.opt_state[1][0].mu["fc1"]["kernel"]  # Adam moments follow their params' shardings
  assert mu.sharding.spec == kernel.sharding.spec
  assert int(restored.step) == 3


def test_ema_params_alone_restore_onto_one_device(tmp_path):
  state, config = _trained_state((2, 2, 2))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(3, state, force=True)
  ckpt.wait()
  one = make_train_setup(ToyRegressor, opt_lib.make_optimizer(config, 10),
                         mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  ema = ckpt_lib.restore_subtrees(str(tmp_path / "ckpt"), {"ema_params": one.abstract_state.ema_params})
  ema = ema["ema_params"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.ema_params, ema)
  assert ema["fc1"]["kernel"].sharding.device_set == {jax.devices()[0]}


def test_missing_checkpoint_messages(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt_lib.resolve_step_dir(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    ckpt_lib.resolve_step_dir(str(tmp_path / "empty"))
