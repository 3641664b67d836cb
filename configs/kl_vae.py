"""KL VAE tokenizer (MAR's kl16 and small variants): conversion, latent caching and training settings.

Variants (`--config=configs/kl_vae.py:<variant>`):
  kl16     MAR's released tokenizer; ImageNet 256 cache with 128 pivots (Hi-MAR), scale factor 0.2325; training
           with LDM's recipe (L1 + 1e-6 KL + LPIPS when its weights are given + PatchGAN from step 50001) reads an
           ImageFolder tree: --config.data.path=/data/imagenet/train.
  fmnist   a small gray VAE for Fashion-MNIST (32 px -> 8x8x4 latents, 16 px pivots -> 4x4); trains in minutes.
  tiny     CPU seconds: like fmnist with 64 examples (tests, smoke runs).
Examples:
  python -m himar_jax convert --config=configs/kl_vae.py:kl16 --config.convert.src=kl16.ckpt --workdir=ckpt/kl16
  python -m himar_jax cache-latents --config=configs/kl_vae.py:kl16 --config.tokenizer.checkpoint=ckpt/kl16 \
      --config.cache.path=/data/imagenet/train --config.cache.dir=/data/cache/kl16
  python -m himar_jax train --config=configs/kl_vae.py:fmnist --workdir=runs/kl_fmnist
  python -m himar_jax convert --config=configs/kl_vae.py:fmnist --config.convert.src=train:runs/kl_fmnist \
      --workdir=ckpt/kl_fmnist
"""
import ml_collections

from himar_jax.tokenizers.training import default_config

VARIANTS = {"kl16": ("kl16", ""), "fmnist": ("kl_tiny_gray", "fmnist"), "tiny": ("kl_tiny_gray", "tiny")}


def get_config(variant: str = "kl16") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown kl_vae variant {variant!r}; use one of {sorted(VARIANTS)}.")
  preset, small = VARIANTS[variant]
  c = default_config("kl_vae", preset, small)
  c.loss.kl_weight = 1e-6  # LDM kl-f16: relative to the per-image summed L1
  return c
