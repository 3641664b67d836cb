"""VQ residual pyramid tokenizer (VAR's vae_ch160v4096z32 and small variants): conversion and token caching.

Variants (`--config=configs/vq_pyramid.py:<variant>`):
  vq256    VAR's released tokenizer, 256 px layout (patch_nums 1..16, L = 680).
  vq512    the same weights with the 512 px layout (patch_nums 1..32, L = 2240).
  fmnist   a small gray tokenizer for Fashion-MNIST (32 px, stride 4 -> 8x8, patch_nums 1,2,3,4,6,8).
  tiny     CPU seconds (tests, smoke runs).
Example:
  python -m himar_jax convert --config=configs/vq_pyramid.py:vq256 --config.convert.src=vae_ch160v4096z32.pth \
      --workdir=ckpt/vq256
"""
import ml_collections

from himar_jax import config_lib, tokenizers
from himar_jax.data.latent_cache import default_cache_config as cache_defaults


def get_config(variant: str = "vq256") -> ml_collections.ConfigDict:
  c = config_lib.trainer_defaults()
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.preset = "vq256"
  c.tokenizer.arch = tokenizers.arch_overrides("vq_pyramid")
  c.tokenizer.checkpoint = ""
  c.convert = ml_collections.ConfigDict({"src": "", "strict": False})
  c.cache = cache_defaults()
  if variant == "vq256":
    pass
  elif variant == "vq512":
    c.tokenizer.preset = "vq512"
    c.cache.image_size = 512
  elif variant in ("fmnist", "tiny"):
    c.tokenizer.preset = "vq_tiny_gray"
    c.tokenizer.arch.ch_mult = (1, 2, 2)
    c.cache = cache_defaults(source="fashion_mnist", image_size=32, shard_size=4096, batch_size=256)
    if variant == "tiny":
      c.cache.update(max_examples=64, shard_size=32, batch_size=16, progress=False)
  else:
    raise ValueError(f"unknown vq_pyramid variant {variant!r}; use vq256, vq512, fmnist or tiny.")
  return c
