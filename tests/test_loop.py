"""The training loop end to end on the tiny quickstart config and a fake Fashion-MNIST."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.quickstart import get_config
from himar_jax import config_lib, data
from himar_jax.train import loop
from himar_jax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_path, **overrides):
  config = get_config("tiny")
  config.data.path = data_path
  config.train.async_checkpoint = False
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_interrupted_run_resumes_to_identical_params_and_next_batch(fake_fashion_mnist, tmp_path):
  config = tiny_config(fake_fashion_mnist, **{"train.num_steps": 6, "train.checkpoint_every": 3})
  full = loop.train(config, str(tmp_path / "full"))
  loop.train(config, str(tmp_path / "resumed"), stop_after=3)  # "killed" after step 3
  assert ckpt_lib.Checkpointer(str(tmp_path / "resumed" / "checkpoints")).latest_step() == 3
  resumed = loop.train(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == int(full.step) == 6
  _assert_trees_equal(full.params, resumed.params)
  _assert_trees_equal(full.ema_params, resumed.ema_params)
  _assert_trees_equal(full.opt_state, resumed.opt_state)

  # The data position is restored too: the next batch after step 6 is the 7th batch of an uninterrupted stream.
  reference = data.make_train_iterator(config)
  for _ in range(6):
    next(reference)
  expected = next(reference)
  for run in ("full", "resumed"):
    it = data.make_train_iterator(config)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / run / "checkpoints"))
    ckpt.restore(6, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), full), it)
    got = next(it)
    _assert_trees_equal(expected, got)


def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(fake_fashion_mnist, tmp_path):
  config = tiny_config(fake_fashion_mnist, **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.grad_clip": 0.0,
                                              "train.num_steps": 8, "train.log_every": 8,
                                              "train.checkpoint_every": 1})
  with pytest.raises(loop.TrainingDiverged) as err:
    loop.train(config, str(tmp_path / "w"))
  message = str(err.value)
  assert "NaN/Inf at step" in message and "config.optim.lr" in message
  steps = ckpt_lib.Checkpointer(str(tmp_path / "w" / "checkpoints")).all_steps()
  bad_step = int(message.split("NaN/Inf at step ")[1].split(" ")[0])
  # Nothing at or after the divergence was saved; the message names the last good one.
  assert all(s <= bad_step for s in steps)
  if steps:
    assert f"step {max(steps)} in" in message


@pytest.mark.parametrize("field,value,match", [
    ("data.global_batch_size", 0, "global_batch_size=0 must be a positive integer"),
    ("optim.schedule", "linear", "schedule='linear' must be 'constant' or 'cosine'"),
    ("optim.ema_decay", 1.5, "ema_decay=1.5 must lie in"),
    ("data.image_size", 20, "image_size=20 is smaller than Fashion-MNIST's 28"),
    ("data.source", "imagenet", "source='imagenet' is not a known source"),
    ("optim.lr", -1.0, "must be > 0"),
])
def test_invalid_config_values_are_named(field, value, match, fake_fashion_mnist):
  config = tiny_config(fake_fashion_mnist, **{field: value})
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def test_invalid_model_values_are_named(fake_fashion_mnist, tmp_path):
  config = tiny_config(fake_fashion_mnist, **{"model.patch_size": 5})
  with pytest.raises(ValueError, match="image_size=32 is not divisible by config.model.patch_size=5"):
    loop.train(config, str(tmp_path / "w"))
  config = tiny_config(fake_fashion_mnist, **{"model.family": "gan"})
  with pytest.raises(ValueError, match="family='gan' is not one of"):
    loop.train(config, str(tmp_path / "w"))


def test_batch_not_divisible_by_data_axes_is_named(fake_fashion_mnist, tmp_path):
  config = tiny_config(fake_fashion_mnist, **{"data.global_batch_size": 12, "mesh.shape": (2, 4, 1)})
  with pytest.raises(ValueError, match=r"global_batch_size=12 is not divisible by the data-parallel size 8"):
    loop.train(config, str(tmp_path / "w"))
  config = tiny_config(fake_fashion_mnist, **{"mesh.shape": (3, -1, 1)})
  with pytest.raises(ValueError, match=r"8 devices are not divisible"):
    loop.train(config, str(tmp_path / "w"))


def test_missing_dataset_stops_train_with_install_hint(tmp_path):
  config = tiny_config(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    loop.train(config, str(tmp_path / "w"))


def test_sigterm_saves_a_checkpoint_and_exits(fake_fashion_mnist, tmp_path):
  workdir = tmp_path / "w"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "himar_jax", "train", "--config=configs/quickstart.py:tiny",
         f"--config.data.path={fake_fashion_mnist}", "--config.train.num_steps=100000",
         "--config.train.checkpoint_every=100000", "--config.train.log_every=1", f"--workdir={workdir}"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until a few steps have run
      if "train/loss" in line and "[3]" in line:
        break
      assert time.time() < deadline, "training did not start"
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
  finally:
    proc.kill()
  assert proc.returncode == 0, rest[-3000:]
  steps = ckpt_lib.Checkpointer(str(workdir / "checkpoints")).all_steps()
  assert len(steps) == 1 and 3 <= steps[0] < 100000
