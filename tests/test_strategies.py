"""Data parallel, FSDP, tensor parallel and their mix train the tiny model to the same losses as one device,
and a checkpoint saved under one strategy restores under another."""
import jax
import numpy as np
import pytest

from configs.quickstart import get_config
from himar_jax import data, models
from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
from himar_jax.train import checkpoint as ckpt_lib
from himar_jax.train.optimizer import make_optimizer
from himar_jax.train.state import init_train_state, make_train_setup
from himar_jax.train.step import make_train_step

STRATEGIES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (4, 1, 2), "data+fsdp+tensor": (2, 2, 2)}


def _config(path):
  config = get_config("tiny")
  config.data.path = path
  return config


def _run(config, mesh, batches, steps=3):
  setup = make_train_setup(models.model_fn(config), make_optimizer(config, 10), mesh)
  state = init_train_state(setup, config.seed)
  step = make_train_step(setup, config.optim.ema_decay)
  losses = []
  for batch in batches[:steps]:
    state, metrics = step(state, sharding_lib.shard_batch(batch, mesh))
    losses.append(float(metrics["loss"]))  # blocks: no back-to-back CPU collectives (see jax_stack.md)
  return setup, jax.block_until_ready(state), np.array(losses)


@pytest.fixture(scope="module")
def reference(fake_fashion_mnist):
  config = _config(fake_fashion_mnist)
  it = data.make_train_iterator(config)
  batches = [next(it) for _ in range(3)]
  one = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, losses = _run(config, one, batches)
  return config, batches, state, losses


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_matches_one_device(name, reference):
  config, batches, ref_state, ref_losses = reference
  setup, state, losses = _run(config, mesh_lib.make_mesh(STRATEGIES[name]), batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  kernel = state.params["encoder_blocks"][0]["mlp"]["fc1"]["kernel"]
  spec = setup.param_shardings["encoder_blocks"][0]["mlp"]["fc1"]["kernel"].spec
  assert kernel.sharding.spec == spec
  if name == "fsdp":
    assert spec == jax.sharding.PartitionSpec("fsdp", None)
  if name == "tensor":
    assert spec == jax.sharding.PartitionSpec(None, "tensor")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
               ref_state.params, state.params)


def test_checkpoint_moves_between_strategies(reference, tmp_path):
  config, batches, _, _ = reference
  _, state, _ = _run(config, mesh_lib.make_mesh(STRATEGIES["data+fsdp+tensor"]), batches, steps=1)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  ckpt.save(1, state, force=True)
  ckpt.wait()
  target = make_train_setup(models.model_fn(config), make_optimizer(config, 10),
                            mesh_lib.make_mesh(STRATEGIES["fsdp"]))
  restored = ckpt_lib.Checkpointer(str(tmp_path)).restore(1, target.abstract_state)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, restored)
  assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, restored, target.state_shardings))
