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
  # Training (model family vq_pyramid): reconstruction + VQ losses (+ PatchGAN / LPIPS as for the KL VAE). VAR
  # publishes no tokenizer recipe; these follow the LDM / taming VQGAN setting.
  c.model = ml_collections.ConfigDict({"family": "vq_pyramid", "dtype": "bfloat16"})
  c.loss = ml_collections.ConfigDict({
      "reconstruction": "l1", "perceptual_weight": 1.0, "gan_weight": 0.5, "gan_start": 50001,
      "disc_width": 64, "disc_layers": 3,
      "lpips_vgg": "", "lpips_lin": ""})  # LPIPS weights: torchvision vgg16 .pth and LPIPS v0.1 vgg.pth
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
  if variant == "vq256":
    # ImageNet 256 training needs an ImageNet image source in himar_jax/data (config.data.source).
    pass
  elif variant == "vq512":
    c.tokenizer.preset = "vq512"
    c.cache.image_size = 512
  elif variant in ("fmnist", "tiny"):
    c.tokenizer.preset = "vq_tiny_gray"
    c.tokenizer.arch.ch_mult = (1, 2, 2)
    c.cache = cache_defaults(source="fashion_mnist", image_size=32, shard_size=4096, batch_size=256)
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
    raise ValueError(f"unknown vq_pyramid variant {variant!r}; use vq256, vq512, fmnist or tiny.")
  return c
