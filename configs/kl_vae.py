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
  if variant == "kl16":
    pass
  elif variant in ("fmnist", "tiny"):
    c.tokenizer.preset = "kl_tiny_gray"
    c.tokenizer.arch.ch_mult = (1, 2, 2)
    c.cache = cache_defaults(source="fashion_mnist", image_size=32, pivot_size=16, shard_size=4096, batch_size=256)
    if variant == "tiny":
      c.cache.update(max_examples=64, shard_size=32, batch_size=16, progress=False)
  else:
    raise ValueError(f"unknown kl_vae variant {variant!r}; use kl16, fmnist or tiny.")
  return c
