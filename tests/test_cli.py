"""The command-line entry point: info (eval_shape counts), usage errors, quickstart end to end."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs.quickstart import get_config
from himar_jax import models, quickstart
from himar_jax.cli import model_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "himar_jax", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_info_counts_equal_a_real_init():
  config = get_config("tiny")
  info = model_info(config)
  model = models.model_fn(config)(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert info["total_params"] == sum(x.size for x in jax.tree.leaves(params))
  assert info["total_params"] == sum(info["params_by_module"].values())
  assert set(info["params_by_module"]) >= {"encoder_blocks", "decoder_blocks", "diffusion_head", "class_emb"}
  assert info["config"]["model"]["family"] == "pixel_mar"


def test_info_verb_prints_json_with_overrides():
  out = _run("info", "--config=configs/quickstart.py:tiny", "--config.model.encoder_depth=3")
  assert out.returncode == 0, out.stderr[-2000:]
  info = json.loads(out.stdout)
  assert info["config"]["model"]["encoder_depth"] == 3
  config = get_config("tiny")
  config.model.encoder_depth = 3
  assert info["total_params"] == model_info(config)["total_params"]


def test_usage_errors_name_the_problem():
  out = _run("fly", "--config=configs/quickstart.py:tiny")
  assert out.returncode != 0 and "verb one of" in out.stderr
  out = _run("train", "--config=configs/quickstart.py:tiny")
  assert out.returncode != 0 and "--workdir" in out.stderr
  out = _run("info", "--config=configs/quickstart.py:huge")
  assert out.returncode != 0 and "unknown quickstart variant 'huge'" in out.stderr


def test_quickstart_writes_grid_log_and_checkpoint(fake_fashion_mnist, tmp_path):
  config = get_config("tiny")
  config.data.path = fake_fashion_mnist
  path = quickstart.run(config, str(tmp_path))
  grid = np.asarray(Image.open(path))
  per_class, size, scale, pad = config.sample.per_class, config.data.image_size, 2, 2
  assert grid.shape[0] == 10 * (size * scale + pad) + pad  # one row per class
  assert grid.shape[1] == 110 + per_class * (size * scale + pad) + pad
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
  assert os.path.isdir(tmp_path / "checkpoints" / str(config.train.num_steps) / "state")


def test_sampling_is_deterministic_per_sample(fake_fashion_mnist, tmp_path):
  """A sample depends on its seed and index, not on the batch it was drawn in."""
  from himar_jax.sampling import restore_model_for_sampling, sample_batches
  from himar_jax.train import loop
  config = get_config("tiny")
  config.data.path = fake_fashion_mnist
  config.train.num_steps = 2
  loop.train(config, str(tmp_path))
  restored = restore_model_for_sampling(config, loop.checkpoint_dir(str(tmp_path)))
  kwargs = models.family_module(config).sample_kwargs(config)
  labels = np.arange(16) % 10
  a = sample_batches(restored, labels, seed=5, batch_size=16, **kwargs)
  b = sample_batches(restored, labels, seed=5, batch_size=8, **kwargs)
  np.testing.assert_allclose(a, b, atol=1e-5)
  c = sample_batches(restored, labels, seed=6, batch_size=16, **kwargs)
  assert not np.allclose(a, c)
  # A later chunk of the same stream: samples 8..15 drawn on their own equal those drawn with the rest.
  d = sample_batches(restored, labels[8:], seed=5, batch_size=8, start_index=8, **kwargs)
  np.testing.assert_allclose(d, a[8:], atol=1e-5)


def test_sampler_traces_under_the_sampling_mesh(fake_fashion_mnist, tmp_path, monkeypatch):
  """The sampling program is traced under its mesh, so the model's activation constraints and the Pallas
  kernels' per-device wrapper (sharding.constrain / per_shard) see the 8-device mesh; without it XLA would
  all-gather a kernel's operands and run it on the whole batch on every device."""
  from himar_jax import sampling
  from himar_jax.parallel import sharding
  from himar_jax.train import loop
  config = get_config("tiny")
  config.data.path = fake_fashion_mnist
  config.train.num_steps = 1
  loop.train(config, str(tmp_path))
  restored = sampling.restore_model_for_sampling(config, loop.checkpoint_dir(str(tmp_path)))
  seen = []
  partitioned = sharding._partitioned_mesh
  monkeypatch.setattr(sharding, "_partitioned_mesh", lambda: seen.append(partitioned()) or seen[-1])
  sampling._sampler.cache_clear()  # trace anew
  kwargs = models.family_module(config).sample_kwargs(config)
  out = sampling.sample_batches(restored, np.arange(8) % 10, seed=1, batch_size=8, **kwargs)
  assert out.shape[0] == 8
  meshes = [m for m in seen if m is not None]
  assert seen and len(meshes) == len(seen)  # every constraint / kernel wrapper saw the mesh
  assert meshes[0].size == 8 and meshes[0].shape == restored.mesh.abstract_mesh.shape


def test_compilation_cache_writes_and_reuses_programs(tmp_path):
  """--compilation_cache: the first process compiles and writes the program to the folder, a second one with the
  same program loads it from there (a cache hit) and writes nothing."""
  cache = tmp_path / "cache"
  script = ("import sys, jax, jax.numpy as jnp\n"
            "from himar_jax.cli import enable_compilation_cache\n"
            "events = []\n"
            "jax.monitoring.register_event_listener(lambda name, **_: events.append(name))\n"
            "assert enable_compilation_cache(sys.argv[1], min_compile_secs=0.0) == sys.argv[1]\n"
            "print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()))\n"
            "print(sum(e.endswith('/cache_hits') for e in events), sum(e.endswith('/cache_misses') for e in events))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  runs = []
  for _ in range(2):
    runs.append(subprocess.run([sys.executable, "-c", script, str(cache)], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=300))
    assert runs[-1].returncode == 0, runs[-1].stderr[-2000:]
    if len(runs) == 1:
      entries = sorted(os.listdir(cache))
  first, second = (run.stdout.split("\n") for run in runs)
  assert first[0] == second[0]  # the same result
  assert first[1].split()[0] == "0" and first[1].split()[1] != "0"  # compiled: misses, no hits
  assert second[1].split()[0] != "0"  # loaded from the folder
  assert entries and sorted(os.listdir(cache)) == entries


def test_compilation_cache_off_and_bad_folder(tmp_path):
  from absl import app

  from himar_jax.cli import enable_compilation_cache
  assert enable_compilation_cache("none") is None and enable_compilation_cache("") is None
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(app.UsageError, match=r"--compilation_cache=.*a_file/cache: cannot create the folder.*"
                                           r"--compilation_cache=none"):
    enable_compilation_cache(str(blocker / "cache"))
