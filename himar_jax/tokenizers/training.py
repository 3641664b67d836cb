"""Tokenizer training on the foundation trainer: model families `kl_vae` and `vq_pyramid`.

Loss (per batch of images in [-1, 1]):
  reconstruction   mean |x - x_rec| (L1, LDM's choice) or mean (x - x_rec)^2 (L2)
  + kl_weight * KL(q || N(0, I)) per latent element summed, divided by the image's element count (LDM's sum-
    over-pixels weighting: 1e-6 relative to the summed L1), KL VAE only
  + the VQ loss (beta-weighted commitment + codebook terms, straight-through), VQ pyramid only
  + perceptual_weight * LPIPS(x, x_rec)   when config.loss.lpips_vgg / lpips_lin name its weights (torchvision
    VGG16 and LPIPS v0.1 vgg.pth; himar_jax/tokenizers/lpips.py); without them the term is off
  + gan_weight * hinge generator loss from a PatchGAN discriminator, from step `gan_start` on.
The foundation trainer has one optimizer and one loss, so the discriminator trains in the same step through
stop-gradients: its hinge loss sees stop_gradient(x_rec), and the generator term sees a stop_gradient copy of the
discriminator's parameters. The sum's gradient is then the generator's gradient for the tokenizer and the
discriminator's gradient for the discriminator. The discriminator uses GroupNorm instead of BatchNorm (the train
state keeps non-parameter variables constant).
Metrics: rec_loss, kl / vq_loss, codebook_usage_pct (share of codes hit in the batch, averaged over scales),
d_loss, g_loss, logits_real / logits_fake.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
from flax import nnx

from himar_jax import tokenizers
from himar_jax.nn.layers import DEFAULT_COMPUTE_DTYPE
from himar_jax.tokenizers import vq_pyramid
from himar_jax.tokenizers.ldm import conv, group_norm

RECONSTRUCTION = ("l1", "l2")


class PatchDiscriminator(nnx.Module):
  """PatchGAN (pix2pix / taming NLayerDiscriminator shape): 4x4 convs, stride 2 for the first `num_layers`,
  LeakyReLU(0.2), channel width doubling up to 8x, one logit per patch. GroupNorm replaces BatchNorm."""

  def __init__(self, in_channels: int, *, width: int = 64, num_layers: int = 3, norm_groups: int = 32,
               rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE):
    convs, norms = [conv(in_channels, width, 4, stride=2, padding=((1, 1), (1, 1)), rngs=rngs, dtype=dtype)], [None]
    ch = width
    for n in range(1, num_layers + 1):
      out = width * min(2 ** n, 8)
      stride = 2 if n < num_layers else 1
      convs.append(conv(ch, out, 4, stride=stride, padding=((1, 1), (1, 1)), rngs=rngs, dtype=dtype))
      norms.append(group_norm(out, num_groups=min(norm_groups, out), rngs=rngs))
      ch = out
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.head = conv(ch, 1, 4, padding=((1, 1), (1, 1)), rngs=rngs, dtype=dtype)

  def __call__(self, x):
    h = x
    for c, n in zip(self.convs, self.norms):
      h = c(h)
      if n is not None:
        h = n(h)
      h = nnx.leaky_relu(h, 0.2)
    return self.head(h).astype(jnp.float32)


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(nnx.relu(1.0 - logits_real)) + jnp.mean(nnx.relu(1.0 + logits_fake)))


def _frozen(module: nnx.Module) -> nnx.Module:
  """A copy of `module` whose parameters are stop_gradient'ed (its loss terms do not train it)."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))


class TokenizerTrainer(nnx.Module):
  """The trained model: `tokenizer` (KLVAE / VQPyramid), optional `discriminator`; `train_loss` for the trainer."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    kind, tcfg = tokenizers.from_config(config.tokenizer)
    self.kind = kind
    dtype = jnp.dtype(config.model.get("dtype", "bfloat16"))
    cls = tokenizers.kl_vae.KLVAE if kind == "kl_vae" else vq_pyramid.VQPyramid
    self.tokenizer = cls(tcfg, rngs=rngs, dtype=dtype)
    loss = config.loss
    self.reconstruction = loss.reconstruction
    self.kl_weight = float(loss.get("kl_weight", 0.0))
    self.gan_weight = float(loss.gan_weight)
    self.gan_start = int(loss.gan_start)
    self.perceptual_weight = float(loss.get("perceptual_weight", 0.0))
    use_lpips = self.perceptual_weight > 0 and loss.get("lpips_vgg", "") and loss.get("lpips_lin", "")
    if use_lpips:
      from himar_jax.tokenizers import lpips
    self.perceptual = lpips.load(loss.lpips_vgg, loss.lpips_lin) if use_lpips else None
    self.discriminator = (PatchDiscriminator(tcfg.in_channels, width=loss.disc_width, num_layers=loss.disc_layers,
                                             rngs=rngs, dtype=dtype) if self.gan_weight > 0 else None)

  def train_loss(self, batch, *, key, step=None):
    x = batch["image"].astype(jnp.float32)
    metrics = {}
    if self.kind == "kl_vae":
      rec, posterior = self.tokenizer(x, key)
      kl = jnp.mean(posterior.kl()) / (x.shape[1] * x.shape[2] * x.shape[3])
      reg = self.kl_weight * kl
      metrics["kl"] = kl
    else:
      rec, out = self.tokenizer(x)
      reg = out.loss
      metrics["vq_loss"] = out.loss
      metrics["codebook_usage_pct"] = jnp.mean(vq_pyramid.usage_from_hits(out.hits))
    diff = rec - x
    rec_loss = jnp.mean(jnp.abs(diff)) if self.reconstruction == "l1" else jnp.mean(jnp.square(diff))
    metrics["rec_loss"] = rec_loss
    loss = rec_loss + reg
    if self.perceptual is not None and self.perceptual_weight > 0:
      p = jnp.mean(self.perceptual(x, rec))
      metrics["perceptual"] = p
      loss = loss + self.perceptual_weight * p
    if self.discriminator is not None:
      on = (jnp.asarray(step if step is not None else 0) >= self.gan_start).astype(jnp.float32)
      logits_real = self.discriminator(x)
      logits_fake_d = self.discriminator(jax.lax.stop_gradient(rec))
      d_loss = hinge_d_loss(logits_real, logits_fake_d)
      g_loss = -jnp.mean(_frozen(self.discriminator)(rec))
      loss = loss + on * (self.gan_weight * g_loss + d_loss)
      metrics.update(d_loss=d_loss, g_loss=g_loss, logits_real=jnp.mean(logits_real),
                     logits_fake=jnp.mean(logits_fake_d))
    return loss, metrics


def validate(config) -> None:
  if "tokenizer" not in config or "loss" not in config:
    raise ValueError("tokenizer training needs `tokenizer` and `loss` blocks; use configs/kl_vae.py or "
                     "configs/vq_pyramid.py.")
  kind, _ = tokenizers.from_config(config.tokenizer)
  if kind != config.model.family:
    raise ValueError(f"config.model.family={config.model.family!r} but config.tokenizer.preset="
                     f"{config.tokenizer.preset!r} is a {kind}; make them agree.")
  if config.loss.reconstruction not in RECONSTRUCTION:
    raise ValueError(f"config.loss.reconstruction={config.loss.reconstruction!r} is not one of {RECONSTRUCTION}.")
  for field in ("gan_weight", "gan_start"):
    if config.loss[field] < 0:
      raise ValueError(f"config.loss.{field}={config.loss[field]} must be >= 0.")
  for field in ("lpips_vgg", "lpips_lin"):
    path = config.loss.get(field, "")
    if path and not os.path.isfile(path):
      raise FileNotFoundError(f"config.loss.{field}={path!r} does not exist; give torchvision's vgg16 weights "
                              "(lpips_vgg) and LPIPS' v0.1 vgg.pth (lpips_lin), or leave both empty.")
  if config.loss.get("perceptual_weight", 0) > 0 and not (config.loss.get("lpips_vgg") and config.loss.get("lpips_lin")):
    logging.warning("config.loss.perceptual_weight=%s but lpips_vgg / lpips_lin are not set: training without the "
                    "LPIPS term.", config.loss.perceptual_weight)


def build(config, rngs: nnx.Rngs) -> TokenizerTrainer:
  return TokenizerTrainer(config, rngs=rngs)


def export_tokenizer(workdir: str, config, out_dir: str, *, use_ema: bool = True, step: int | None = None) -> str:
  """Writes the (EMA) tokenizer of a training run in `workdir` as a tokenizer directory (like `convert`)."""
  from himar_jax.convert.tokenizers import save_tokenizer
  from himar_jax.train import checkpoint as ckpt_lib

  model = nnx.eval_shape(lambda: build(config, nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model.tokenizer, nnx.Param, ...)
  like = lambda s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                               sharding=jax.sharding.SingleDeviceSharding(
                                                                   jax.devices()[0])), nnx.to_pure_dict(s))
  field = "ema_params" if use_ema else "params"
  restored = ckpt_lib.restore_subtrees(os.path.join(workdir, "checkpoints"),
                                       {field: {"tokenizer": like(params)}}, step=step)
  nnx.replace_by_pure_dict(params, restored[field]["tokenizer"])
  rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)
  tokenizer = nnx.merge(graphdef, params, rest)
  return save_tokenizer(tokenizer, model.kind, out_dir, source=f"train:{os.path.abspath(workdir)}")


def default_config(kind: str, preset: str, small: str = ""):
  """The config shared by configs/kl_vae.py and configs/vq_pyramid.py: tokenizer, convert, cache and training
  blocks. small: "" (published size, ImageNet 256 LDM recipe), "fmnist" or "tiny" (Fashion-MNIST, gray, 32 px)."""
  import ml_collections

  from himar_jax import config_lib
  from himar_jax.data import fashion_mnist
  from himar_jax.data.latent_cache import default_cache_config

  c = config_lib.trainer_defaults()
  c.tokenizer = ml_collections.ConfigDict({"preset": preset, "arch": tokenizers.arch_overrides(kind),
                                           "checkpoint": ""})  # checkpoint: a tokenizer directory
  c.convert = ml_collections.ConfigDict({"src": "", "strict": False})
  c.cache = default_cache_config()
  c.model = ml_collections.ConfigDict({"family": kind, "dtype": "bfloat16"})
  c.loss = ml_collections.ConfigDict({
      "reconstruction": "l1", "perceptual_weight": 1.0, "gan_weight": 0.5, "gan_start": 50001,
      "disc_width": 64, "disc_layers": 3,
      "lpips_vgg": "", "lpips_lin": ""})  # LPIPS weights: torchvision vgg16 .pth and LPIPS v0.1 vgg.pth
  # LDM's autoencoder recipe: Adam (0.5, 0.9), lr 4.5e-6 per image of the global batch, no weight decay.
  c.optim.update(lr=4.5e-6 * 128, b1=0.5, b2=0.9, weight_decay=0.0, warmup_steps=0, grad_clip=0.0, ema_decay=0.999)
  # ImageNet-scale training reads an ImageFolder tree (ADM center crop): --config.data.path=/data/imagenet/train.
  c.data.update(global_batch_size=128, image_size=256, source="image_folder", path="")
  c.train.update(num_steps=400_000, checkpoint_every=5000, log_every=100)
  if small not in ("", "fmnist", "tiny"):
    raise ValueError(f"small={small!r} must be '', 'fmnist' or 'tiny'.")
  if small:
    c.tokenizer.arch.ch_mult = (1, 2, 2)  # 32 px -> 8 x 8 latents
    c.cache = default_cache_config(source="fashion_mnist", image_size=32, pivot_size=16, shard_size=4096,
                                   batch_size=256)
    c.model.dtype = "float32"
    c.loss.update(perceptual_weight=0.0, gan_weight=0.1, gan_start=2000, disc_width=32, disc_layers=2)
    c.optim.update(lr=1e-3, b1=0.9, b2=0.99, warmup_steps=100, grad_clip=1.0, ema_decay=0.995)
    c.data.update(image_size=32, global_batch_size=128, source="fashion_mnist", path=fashion_mnist.DEFAULT_PATH)
    c.train.update(num_steps=4000, checkpoint_every=1000, log_every=100)
  if small == "tiny":
    c.cache.update(max_examples=64, shard_size=32, batch_size=16, progress=False)
    c.loss.update(gan_start=2, disc_width=16, disc_layers=1)
    c.data.update(max_examples=64, global_batch_size=8)
    c.optim.warmup_steps = 1
    c.train.update(num_steps=4, checkpoint_every=2, log_every=2, progress_bar=False)
  return c
