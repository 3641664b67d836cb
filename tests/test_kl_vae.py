"""KL VAE: published size, shapes, posterior closed forms, input errors (parity vs MAR's class: test_convert_tokenizers)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from himar_jax import tokenizers
from himar_jax.tokenizers import kl_vae


def _tiny(config):
  return tokenizers.build("kl_vae", config, host_init=True)


def test_kl16_parameter_count_matches_official():
  model = nnx.eval_shape(lambda: kl_vae.KLVAE(kl_vae.kl16_config(), rngs=nnx.Rngs(0)))
  assert kl_vae.count_params(model) == 66_456_019
  assert kl_vae.kl16_config().scale_factor == 0.2325
  # Encoder attention only at the lowest level (after each of its 2 res blocks); decoder levels have none.
  assert [len(level.attn) for level in model.encoder.down] == [0, 0, 0, 0, 2]
  assert [len(level.attn) for level in model.decoder.up] == [0, 0, 0, 0, 0]


@pytest.mark.parametrize("channels", [1, 3])
def test_tiny_shapes(channels):
  model = _tiny(kl_vae.tiny_config(channels))
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, channels), minval=-1, maxval=1)
  # One jit: compiling the three calls together is faster on CPU than dispatching each op eagerly.
  post, (rec, post2), half = nnx.jit(lambda m, x: (m.encode(x), m(x, jax.random.key(2)), m.encode(x[:, :8, :8])))(
      model, x)
  assert post.mean.shape == post.logvar.shape == (2, 8, 8, 4)
  assert rec.shape == x.shape and rec.dtype == jnp.float32
  np.testing.assert_allclose(post2.mean, post.mean, rtol=1e-6)
  # 128 -> 64-style half-size inputs go through the same (fully convolutional) model.
  assert half.mean.shape == (2, 4, 4, 4)


def test_posterior_clamp_sample_kl_nll():
  rng = np.random.default_rng(0)
  mean = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
  logvar = rng.uniform(-40, 30, (2, 3, 3, 4)).astype(np.float32)
  post = kl_vae.DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
  lv = np.clip(logvar, -30, 20)
  np.testing.assert_array_equal(post.logvar, lv)
  np.testing.assert_array_equal(post.mode(), mean)
  noise = rng.standard_normal(mean.shape).astype(np.float32)
  np.testing.assert_allclose(post.sample(None, noise=jnp.asarray(noise)), mean + np.exp(0.5 * lv) * noise,
                             rtol=1e-5)
  lv64 = lv.astype(np.float64)
  want_kl = 0.5 * np.sum(mean.astype(np.float64) ** 2 + np.exp(lv64) - 1 - lv64, axis=(1, 2, 3))
  np.testing.assert_allclose(post.kl(), want_kl, rtol=1e-5)
  small = kl_vae.DiagonalGaussian.from_moments(jnp.concatenate([mean, np.zeros_like(mean)], -1))
  want_nll = 0.5 * np.sum(np.log(2 * np.pi) + (noise - mean) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(small.nll(jnp.asarray(noise)), want_nll, rtol=1e-5)
  # Sampling from a key: empirical mean/std match the posterior.
  many = kl_vae.DiagonalGaussian(jnp.full((4000, 1, 1, 1), 2.0), jnp.full((4000, 1, 1, 1), np.log(0.25)))
  draws = np.asarray(many.sample(jax.random.key(0)))
  assert abs(draws.mean() - 2.0) < 0.05 and abs(draws.std() - 0.5) < 0.03


def test_decode_scaled_divides_by_scale_factor():
  config = kl_vae.tiny_config(1, scale_factor=0.5)
  model = _tiny(config)
  z = jax.random.normal(jax.random.key(0), (1, 4, 4, 4))
  np.testing.assert_allclose(model.decode_scaled(z * 0.5), model.decode(z), rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_problem():
  model = _tiny(kl_vae.tiny_config(3))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\); got shape \(1, 3, 16, 16\)"):
    model.encode(jnp.zeros((1, 3, 16, 16)))
  with pytest.raises(ValueError, match="dtype uint8"):
    model.encode(jnp.zeros((1, 16, 16, 3), jnp.uint8))
  with pytest.raises(ValueError, match="not a multiple of the tokenizer stride 2"):
    model.encode(jnp.zeros((1, 15, 16, 3)))
  with pytest.raises(ValueError, match=r"latents must be \(B, h, w, 4\)"):
    model.decode(jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="norm_groups"):
    nnx.eval_shape(lambda: kl_vae.KLVAE(kl_vae.tiny_config(3, ch=12), rngs=nnx.Rngs(0)))


def test_training_loss_gan_gradients_split_between_generator_and_discriminator():
  """One optimizer, one loss: the discriminator's gradient is that of its hinge loss alone, the tokenizer's that
  of reconstruction + KL + gan_weight * generator loss (stop-gradient routing in TokenizerTrainer)."""
  from configs import kl_vae as kl_config  # noqa: PLC0415
  from himar_jax.tokenizers import training

  config = kl_config.get_config("tiny")
  model = tokenizers.host_initialize(nnx.eval_shape(lambda: training.build(config, nnx.Rngs(0))), seed=1)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1, maxval=1)
  key = jax.random.key(5)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def total(p, step):
    return nnx.merge(graphdef, p, rest).train_loss({"image": x}, key=key, step=step)[0]

  def parts(p):
    m = nnx.merge(graphdef, p, rest)
    rec, post = m.tokenizer(x, key)
    gen = (jnp.mean(jnp.abs(rec - x)) + config.loss.kl_weight * jnp.mean(post.kl()) / x[0].size
           - config.loss.gan_weight * jnp.mean(m.discriminator(rec)))
    d = training.hinge_d_loss(m.discriminator(x), m.discriminator(jax.lax.stop_gradient(rec)))
    return gen, d

  @jax.jit
  def all_grads(p):
    return (jax.grad(total)(p, config.loss.gan_start), jax.grad(lambda q: parts(q)[0])(p),
            jax.grad(lambda q: parts(q)[1])(p), total(p, 0), parts(p)[0] + config.loss.gan_weight * jnp.mean(
                nnx.merge(graphdef, p, rest).discriminator(nnx.merge(graphdef, p, rest).tokenizer(x, key)[0])))

  grads, g_gen, g_disc, loss_before_gan, rec_plus_kl = all_grads(params)
  for a, b in zip(jax.tree.leaves(grads["tokenizer"]), jax.tree.leaves(g_gen["tokenizer"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  for a, b in zip(jax.tree.leaves(grads["discriminator"]), jax.tree.leaves(g_disc["discriminator"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # Before gan_start neither GAN term contributes: the loss is reconstruction + KL alone.
  np.testing.assert_allclose(loss_before_gan, rec_plus_kl, rtol=1e-5)


def test_training_uses_lpips_when_weights_are_given(tmp_path):
  from configs import kl_vae as kl_config  # noqa: PLC0415
  from himar_jax.tokenizers import lpips, training

  vgg, lin = lpips.random_state_dicts(0)
  np.savez(tmp_path / "vgg.npz", **vgg)
  np.savez(tmp_path / "lin.npz", **lin)
  config = kl_config.get_config("tiny")
  config.loss.update(gan_weight=0.0, perceptual_weight=0.5, lpips_vgg=str(tmp_path / "vgg.npz"),
                     lpips_lin=str(tmp_path / "lin.npz"))
  training.validate(config)
  model = nnx.eval_shape(lambda: training.build(config, nnx.Rngs(0)))
  assert model.perceptual is not None and model.discriminator is None
  # LPIPS weights are frozen variables, not parameters: the trainer's optimizer never sees them.
  params = nnx.state(model, nnx.Param)
  assert "perceptual" not in params and "tokenizer" in params
  config.loss.lpips_vgg = str(tmp_path / "missing.pth")
  with pytest.raises(FileNotFoundError, match="lpips_vgg"):
    training.validate(config)
