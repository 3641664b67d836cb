"""The Hi-MAR quickstart: the shipped export samples garments of the asked class; latent normalisation is exact;
the from-scratch pipeline (VAE -> tokenizer -> latent cache -> Hi-MAR -> export) runs at test size."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.quickstart import ASSET_DIR, get_config
from himar_jax import quickstart

# Chance is 0.1. With the config's DiT-head sampler (DDIM, 25 steps) the shipped export scored 0.79 on 500 samples
# and 0.75 on the 20 drawn here (seed 0); the Fashion-MNIST classifier itself scores 0.90 on the VAE's
# reconstructions. (50 ancestral steps: 0.54 on 500.)
MIN_CLASS_ACCURACY = 0.6


@pytest.mark.skipif(not os.path.isdir(os.path.join(ASSET_DIR, "checkpoints")),
                    reason="no shipped quickstart export in himar_jax/assets/quickstart")
def test_shipped_export_samples_garments_of_their_class():
  from himar_jax.evaluation import fmnist_classifier as fc

  config = get_config("")
  labels = np.repeat(np.arange(10), 2)
  images = quickstart.sample_export(config, config.quickstart.checkpoint, labels, seed=0)
  assert images.shape == (20, 32, 32, 1) and images.dtype == np.uint8
  logits, _ = fc.Classifier()(images)
  accuracy = fc.accuracy(logits, labels)
  assert accuracy >= MIN_CLASS_ACCURACY, (accuracy, np.argmax(logits, -1))


def test_export_layout_errors_name_the_fix(tmp_path):
  config = get_config("")
  with pytest.raises(FileNotFoundError, match="--from_scratch"):
    quickstart.check_export(config, str(tmp_path))
  for part in ("tokenizer", "checkpoints"):
    os.makedirs(tmp_path / part)
  (tmp_path / quickstart.EXPORT_INFO).write_text(json.dumps({"model": {**config.model.to_dict(),
                                                                       "encoder_dim": 64}}))
  with pytest.raises(ValueError, match="encoder_dim"):
    quickstart.check_export(config, str(tmp_path))


def test_normalize_latents_whitens_channels_and_keeps_reconstructions():
  from himar_jax import tokenizers

  kind, tcfg = tokenizers.preset("kl_tiny_gray")
  tok = tokenizers.build(kind, tcfg, host_init=True, seed=1)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (24, 16, 16, 1), dtype=np.uint8)
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  before = tok.encode(x)
  z = np.asarray(before.mean, np.float64).reshape(-1, tcfg.embed_dim)
  mu, s = z.mean(0), z.std(0)
  new, mu_out, s_out = quickstart.normalize_latents(tok, images, batch_size=10)
  np.testing.assert_allclose(mu_out, mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s_out, s, rtol=1e-5)
  after = new.encode(x)
  np.testing.assert_allclose(np.asarray(after.mean), (np.asarray(before.mean) - mu) / s, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(after.logvar), np.asarray(before.logvar) - 2 * np.log(s), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(new.decode(after.mean)), np.asarray(tok.decode(before.mean)), rtol=1e-4,
                             atol=1e-4)
  # The input tokenizer is left as it was.
  np.testing.assert_array_equal(np.asarray(tok.encode(x).mean), np.asarray(before.mean))


def test_from_scratch_pipeline_tiny(fake_fashion_mnist, tmp_path):
  """VAE -> normalised tokenizer -> latent cache -> Hi-MAR -> export (sampling an export: the test above)."""
  from himar_jax.data import latent_cache as lc
  from himar_jax.sampling import restore_model_for_sampling
  from himar_jax.train import loop

  config = get_config("himar_tiny")
  config.vae.data.path = fake_fashion_mnist
  workdir = str(tmp_path)
  export = quickstart.train_from_scratch(config, workdir)
  assert export == os.path.join(workdir, "export")
  with open(os.path.join(export, quickstart.EXPORT_INFO)) as f:
    info = json.load(f)
  assert info["step"] == config.train.num_steps and info["store_dtype"] == "bfloat16"
  quickstart.check_export(config, export)
  meta = lc.read_metadata(os.path.join(workdir, "latents"))
  assert meta["complete"] and meta["count"] == 64
  assert meta["tokenizer"] == lc.tokenizer_identity(os.path.join(workdir, "tokenizer"))
  # The export holds the trained EMA params rounded to bfloat16.
  trained = restore_model_for_sampling(config, loop.checkpoint_dir(workdir))
  exported = restore_model_for_sampling(config, os.path.join(export, "checkpoints"))
  for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(exported.params)):
    np.testing.assert_array_equal(np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)), np.asarray(b))
