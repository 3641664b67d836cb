"""VQ residual pyramid tokenizer (VAR's vae_ch160v4096z32 and small variants): conversion, token caching, training.

Variants (`--config=configs/vq_pyramid.py:<variant>`):
  vq256    VAR's released tokenizer, 256 px layout (patch_nums 1..16, L = 680).
  vq512    the same weights with the 512 px layout (patch_nums 1..32, L = 2240).
  fmnist   a small gray tokenizer for Fashion-MNIST (32 px, stride 4 -> 8x8, patch_nums 1,2,3,4,6,8).
  tiny     CPU seconds (tests, smoke runs).
Training: reconstruction + VQ losses (+ LPIPS / PatchGAN as for the KL VAE). VAR publishes no tokenizer recipe;
these follow the LDM / taming VQGAN setting. vq256 / vq512 train from an ImageFolder tree:
--config.data.path=/data/imagenet/train.
Example:
  python -m himar_jax convert --config=configs/vq_pyramid.py:vq256 --config.convert.src=vae_ch160v4096z32.pth \
      --workdir=ckpt/vq256
"""
import ml_collections

from himar_jax.tokenizers.training import default_config

VARIANTS = {"vq256": ("vq256", ""), "vq512": ("vq512", ""), "fmnist": ("vq_tiny_gray", "fmnist"),
            "tiny": ("vq_tiny_gray", "tiny")}


def get_config(variant: str = "vq256") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown vq_pyramid variant {variant!r}; use one of {sorted(VARIANTS)}.")
  preset, small = VARIANTS[variant]
  c = default_config("vq_pyramid", preset, small)
  if variant == "vq512":
    c.cache.image_size = c.data.image_size = 512
  return c
