"""Hi-MAR / MAR models against the official PyTorch classes (fixtures from tests/fixtures/make_himar.py)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.himar import get_config
from himar_jax import models
from himar_jax.convert import himar as convert
from himar_jax.models import himar

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "himar")


def _fixture(name):
  with np.load(os.path.join(FIXTURES, name), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _official_config(fx):
  """configs/himar.py:himar_tiny resized to the fixture's official tiny model."""
  c = get_config("himar_tiny")
  m = c.model
  cfg = {k[4:]: v.item() for k, v in fx.items() if k.startswith("cfg/")}
  m.num_classes = cfg["class_num"]
  m.buffer_size = cfg["buffer_size"]
  m.encoder_dim, m.encoder_depth, m.encoder_heads = (cfg["encoder_embed_dim"], cfg["encoder_depth"],
                                                     cfg["encoder_num_heads"])
  m.decoder_dim, m.decoder_depth, m.decoder_heads = (cfg["decoder_embed_dim"], cfg["decoder_depth"],
                                                     cfg["decoder_num_heads"])
  m.head_width, m.head_depth = cfg["diffloss_w"], cfg["diffloss_d"]
  m.dit_width, m.dit_depth, m.dit_heads = cfg["gdm_w"], cfg["gdm_d"], cfg["head"]
  m.lowres_grid = cfg["cond_scale"]
  m.diffusion_batch_mul = cfg["diffusion_batch_mul"]
  m.step_stage2_rate, m.step_warmup_epochs, m.steps_per_epoch = cfg["step_stage2_rate"], cfg["step_warmup"], 1
  m.dtype = "float32"
  return c


def _official_model(fx):
  config = _official_config(fx)
  model = models.model_fn(config)(nnx.Rngs(0))
  dropped = convert.load_into(model, "himar", {k[3:]: v for k, v in fx.items() if k.startswith("sd/")})
  assert sorted(dropped) == ["cond_diffloss.net.c_pos_embed", "cond_diffloss.net.pos_embed"]
  return config, model


@pytest.fixture(scope="module")
def loss_fixture():
  return _fixture("himar_losses.npz")


def test_himar_phase_losses_match_official(loss_fixture):
  fx = loss_fixture
  _, model = _official_model(fx)
  batch = {"latent": jnp.asarray(fx["latent"]), "latent_small": jnp.asarray(fx["latent_small"]),
           "label": jnp.asarray(fx["label"], jnp.int32)}
  draws = {k: jnp.asarray(fx[k]) for k in ("order_low", "order_dense", "num_masked_low", "num_masked_dense",
                                            "drop_low", "drop_dense", "null_pivots", "t_low", "noise_low",
                                            "t_dense", "noise_dense")}
  # Both null-pivot branches and both label-drop outcomes occur in the injected flags.
  assert fx["null_pivots"].any() and not fx["null_pivots"].all() and fx["drop_low"].any()
  loss_low, loss_dense, (z_low, z_dense) = jax.jit(lambda m, b, d: m.losses(b, d, return_z=True))(
      model, batch, draws)
  # The heads' conditions (the losses alone are weakly sensitive to them at random weights).
  np.testing.assert_allclose(np.asarray(z_low), fx["z_low"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(z_dense), fx["z_dense"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(loss_low) * 2.0, fx["loss1"], rtol=1e-4)
  np.testing.assert_allclose(float(loss_dense) * 0.75, fx["loss2"], rtol=1e-4)
  # The fixture's epoch gives the official null-pivot probability 1 - rate * epoch / warmup.
  np.testing.assert_allclose(float(model.null_pivot_prob(int(fx["epoch"]))), 0.75, rtol=1e-6)


def test_himar_sampling_matches_official(loss_fixture):
  fx, sx = loss_fixture, _fixture("himar_sample.npz")
  _, model = _official_model(fx)
  noise = {k: jnp.asarray(sx[k]) for k in ("low_init", "low_steps", "dense_init", "dense_steps")}
  labels = jnp.asarray(sx["label"], jnp.int32)
  orders = (jnp.asarray(sx["order_low"]), jnp.asarray(sx["order_dense"]))

  @jax.jit
  def run(m, labels, orders, noise):
    return m.sample_tokens(labels, keys=jax.random.split(jax.random.key(0), labels.shape[0]),
                           num_iter=int(sx["num_iter"]), cfg=float(sx["cfg"]), re_cfg=float(sx["re_cfg"]),
                           temperature=float(sx["temperature"]), num_sampling_steps=str(sx["mlp_steps"]),
                           dit_sampling_steps=str(sx["dit_steps"]), orders=orders, noise=noise)

  low, dense = run(model, labels, orders, noise)
  np.testing.assert_allclose(np.asarray(low), sx["lowres"], rtol=1e-4, atol=1e-4 * np.abs(sx["lowres"]).max())
  np.testing.assert_allclose(np.asarray(dense), sx["dense"], rtol=1e-4, atol=1e-4 * np.abs(sx["dense"]).max())
