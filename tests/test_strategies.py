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


def test_per_device_gradients_average_each_devices_own_step():
  """gradients='per_device' (pure data parallelism as PyTorch DDP): the step's loss, gradient norm and updated
  params equal the average of n one-device evaluations, device i on its batch rows with the step key folded with
  i (its own mask ratio, timesteps, noise and dropout) - computed here one device at a time."""
  import jax.numpy as jnp
  import optax

  from configs.himar import get_config as himar_config

  config = himar_config("himar_tiny")
  n, b = 2, 4
  mesh = mesh_lib.make_mesh((n, 1, 1), devices=jax.devices()[:n])
  setup = make_train_setup(models.model_fn(config), make_optimizer(config, 10), mesh)
  state = init_train_state(setup, config.seed)
  m, rng = config.model, np.random.default_rng(0)
  batch = {"latent": rng.standard_normal((b, m.grid_size, m.grid_size, m.token_dim), np.float32),
           "latent_small": rng.standard_normal((b, m.lowres_grid, m.lowres_grid, m.token_dim), np.float32),
           "label": rng.integers(0, m.num_classes, b).astype(np.int32)}
  step = make_train_step(setup, config.optim.ema_decay, gradients="per_device")
  new, metrics = step(jax.tree.map(jnp.copy, state), sharding_lib.shard_batch(batch, mesh))

  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  losses, grads = [], []
  for i in range(n):
    rows = {k: v[i * b // n:(i + 1) * b // n] for k, v in batch.items()}
    loss_fn = lambda p: setup.merge(p, state.buffers).train_loss(rows, key=jax.random.fold_in(key, i),
                                                                  step=state.step)[0]
    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(state.params)
    losses.append(float(loss))
    grads.append(grad)
  grad = jax.tree.map(lambda *g: sum(g) / n, *grads)
  assert abs(losses[0] - losses[1]) > 1e-4  # the devices' draws differ
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grad)), rtol=1e-4)
  updates, _ = setup.tx.update(grad, state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-6),
               new.params, expected)


def test_per_device_gradients_need_a_pure_data_parallel_mesh():
  config = _config("")
  setup = make_train_setup(models.model_fn(config), make_optimizer(config, 10), mesh_lib.make_mesh((4, 2, 1)))
  with pytest.raises(ValueError, match=r"gradients='per_device'.*\(-1, 1, 1\)"):
    make_train_step(setup, 0.9, gradients="per_device")
  with pytest.raises(ValueError, match="config.mesh.gradients='ddp'"):
    make_train_step(setup, 0.9, gradients="ddp")
  from himar_jax import config_lib
  config.mesh.gradients = "ddp"
  with pytest.raises(ValueError, match="config.mesh.gradients='ddp' is not one of"):
    config_lib.validate(config)
