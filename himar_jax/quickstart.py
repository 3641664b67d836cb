"""The main job on the embedded default: train a small class-conditional model on Fashion-MNIST, then write a
labelled PNG grid of EMA samples (one row per class), next to the TensorBoard log and checkpoints in workdir."""
from __future__ import annotations

import logging
import os

import jax
import numpy as np

from himar_jax.data import fashion_mnist
from himar_jax.evaluation.images import save_grid
from himar_jax.sampling import restore_model_for_sampling, sample_class_grid
from himar_jax.train import loop

log = logging.getLogger(__name__)


def run(config, workdir: str) -> str:
  loop.train(config, workdir)
  model = restore_model_for_sampling(config, loop.checkpoint_dir(workdir))
  images = sample_class_grid(model, config, num_classes=config.model.num_classes,
                             per_class=config.sample.per_class, seed=config.sample.seed)
  path = os.path.join(workdir, "samples", "grid.png")
  if jax.process_index() == 0:
    labels = fashion_mnist.CLASS_NAMES if config.model.num_classes == 10 else None
    save_grid(np.asarray(images), path, row_labels=labels)
    log.info("wrote %s", path)
  return path
