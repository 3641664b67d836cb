"""Data sources and grain pipelines. `make_train_iterator(config)` yields this process's share of each batch."""
from __future__ import annotations

import numpy as np

from himar_jax.data import fashion_mnist
from himar_jax.data.images import ImageFolderSource
from himar_jax.data.pipeline import ArraySource, make_iterator


def image_transform(image_size: int, random_flip: bool):
  """uint8 (h, w) -> float32 (image_size, image_size, 1) in [-1, 1], centred on a background (-1) canvas."""

  def transform(record, rng: np.random.Generator):
    image = record["image"].astype(np.float32) / 127.5 - 1.0
    h, w = image.shape[:2]
    top, left = (image_size - h) // 2, (image_size - w) // 2
    canvas = np.full((image_size, image_size), -1.0, np.float32)
    canvas[top:top + h, left:left + w] = image
    if random_flip and rng.random() < 0.5:
      canvas = canvas[:, ::-1]
    return {"image": np.ascontiguousarray(canvas[..., None]), "label": np.int32(record["label"])}

  return transform


def folder_transform(random_flip: bool):
  """(uint8 (s, s, C) image, label) from an image folder -> float32 image in [-1, 1], optionally flipped."""

  def transform(record, rng: np.random.Generator):
    image, label = record
    image = image.astype(np.float32) / 127.5 - 1.0
    if random_flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": np.int32(label)}

  return transform


def train_source(config):
  if config.data.source == "image_folder":  # ImageFolder layout, ADM center crop (e.g. ImageNet for tokenizers)
    source = ImageFolderSource(config.data.path, config.data.image_size)
    if config.data.max_examples:
      source.files = source.files[:config.data.max_examples]
      source.labels = source.labels[:config.data.max_examples]
    return source
  images, labels = fashion_mnist.load(config.data.path, "train")
  if config.data.max_examples:
    images, labels = images[:config.data.max_examples], labels[:config.data.max_examples]
  return ArraySource({"image": images, "label": labels})


def make_train_iterator(config):
  if config.data.source == "latent_cache":  # `cache-latents` output (himar_jax/data/latent_pipeline.py)
    from himar_jax.data import latent_pipeline
    return latent_pipeline.make_train_iterator(config)
  if config.data.source == "token_cache":  # VQ-pyramid token indices for next-scale models
    from himar_jax.data import latent_pipeline
    return latent_pipeline.make_token_iterator(config)
  if config.data.source == "coco_cache":  # MS-COCO latents + caption contexts (himar_jax/data/coco.py)
    from himar_jax.data import coco
    return coco.make_train_iterator(config)
  transform = (folder_transform(config.data.random_flip) if config.data.source == "image_folder"
               else image_transform(config.data.image_size, config.data.random_flip))
  return make_iterator(train_source(config), global_batch_size=config.data.global_batch_size,
                       seed=config.data.shuffle_seed, transform=transform,
                       num_workers=config.data.num_workers)
