"""KL VAE tokenizer (MAR's kl16 and small variants): conversion, latent caching and training settings.

Variants (`--config=configs/kl_vae.py:<variant>`):
  kl16     MAR's released tokenizer; ImageNet 256 cache with 128 pivots (Hi-MAR), scale factor 0.2325.
  fmnist   a small gray VAE for Fashion-MNIST (32 px -> 8x8x4 latents, 16 px pivots -> 4x4).
  tiny     CPU seconds: like fmnist with fewer examples (tests, smoke runs).
Examples:
  python -m himar_jax convert --config=configs/kl_vae.py:kl16 --config.convert.src=kl16.ckpt --workdir=ckpt/kl16
  python -m himar_jax cache-latents --config=configs/kl_vae.py:kl16 --config.tokenizer.checkpoint=ckpt/kl16 \
      --config.cache.path=/data/imagenet/train --config.cache.dir=/data/cache/kl16
"""
import ml_collections

from himar_jax import config_lib, tokenizers
from himar_jax.data.latent_cache import default_cache_config as cache_defaults


def get_config(variant: str = "kl16") -> ml_collections.ConfigDict:
  c = config_lib.trainer_defaults()
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.preset = "kl16"
  c.tokenizer.arch = tokenizers.arch_overrides("kl_vae")
  c.tokenizer.checkpoint = ""     # a tokenizer directory (from `convert` or training)
  c.convert = ml_collections.ConfigDict({"src": "", "strict": False})
  c.cache = cache_defaults()
  # Training (model family kl_vae on the foundation trainer; data from config.data).
  c.model = ml_collections.ConfigDict({"family": "kl_vae", "dtype": "bfloat16"})
  c.loss = ml_collections.ConfigDict({
      "reconstruction": "l1", "kl_weight": 1e-6, "perceptual_weight": 1.0, "gan_weight": 0.5,
      "gan_start": 50001, "disc_width": 64, "disc_layers": 3,
      "lpips_vgg": "", "lpips_lin": ""})  # LPIPS weights: torchvision vgg16 .pth and LPIPS v0.1 vgg.pth
  # LDM's autoencoder recipe: Adam (0.5, 0.9), lr 4.5e-6 per image of the global batch, no weight decay.
  c.optim.lr = 4.5e-6 * 128
  c.optim.b1, c.optim.b2 = 0.5, 0.9
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  c.optim.ema_decay = 0.999
  c.data.global_batch_size = 128
  c.data.image_size = 256
  c.train.num_steps = 400_000
  c.train.checkpoint_every = 5000
  c.train.log_every = 100
  if variant == "kl16":
    # ImageNet 256 training needs an ImageNet image source in himar_jax/data (config.data.source).
    pass
  elif variant in ("fmnist", "tiny"):
    c.tokenizer.preset = "kl_tiny_gray"
    c.tokenizer.arch.ch_mult = (1, 2, 2)
    c.cache = cache_defaults(source="fashion_mnist", image_size=32, pivot_size=16, shard_size=4096, batch_size=256)
    c.model.dtype = "float32"
    c.loss.update(perceptual_weight=0.0, gan_weight=0.1, gan_start=2000, disc_width=32, disc_layers=2)
    c.optim.update(lr=1e-3, b1=0.9, b2=0.99, warmup_steps=100, grad_clip=1.0, ema_decay=0.995)
    c.data.update(image_size=32, global_batch_size=128)
    c.train.update(num_steps=4000, checkpoint_every=1000, log_every=100)
    if variant == "tiny":
      c.cache.update(max_examples=64, shard_size=32, batch_size=16, progress=False)
      c.loss.update(gan_start=2, disc_width=16, disc_layers=1)
      c.data.update(max_examples=64, global_batch_size=8)
      c.optim.warmup_steps = 1
      c.train.update(num_steps=4, checkpoint_every=2, log_every=2, progress_bar=False)
  else:
    raise ValueError(f"unknown kl_vae variant {variant!r}; use kl16, fmnist or tiny.")
  return c
