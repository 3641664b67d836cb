"""Model families. Each family module has `build(model_config, rngs) -> nnx.Module`; the module implements
`train_loss(batch, *, key, step)` and `sample(labels, *, key)`."""
from __future__ import annotations

import importlib

FAMILIES = {
    "pixel_mar": "himar_jax.models.himar",  # MAR on pixel patches (quickstart)
    "mar": "himar_jax.models.himar",  # MAR on KL-16 VAE latents (configs/himar.py:mar_*)
    "himar": "himar_jax.models.himar",  # Hi-MAR on KL-16 VAE latents + half-size pivots (configs/himar.py)
    "himar_t2i": "himar_jax.models.himar_t2i",  # text-to-image Hi-MAR on MS-COCO (configs/himar_t2i.py)
    "kl_vae": "himar_jax.tokenizers.training",  # tokenizer training (configs/kl_vae.py)
    "vq_pyramid": "himar_jax.tokenizers.training",  # tokenizer training (configs/vq_pyramid.py)
    "next_scale": "himar_jax.models.next_scale",  # VAR / HMAR on VQ-pyramid tokens (configs/next_scale.py)
}


def family_module(config):
  family = config.model.family
  if family not in FAMILIES:
    raise ValueError(f"config.model.family={family!r} is not one of {sorted(FAMILIES)}.")
  return importlib.import_module(FAMILIES[family])


def model_fn(config):
  """A function rngs -> model, for abstract tracing (eval_shape) and sharded init."""
  module = family_module(config)
  module.validate(config)
  return lambda rngs: module.build(config, rngs)
