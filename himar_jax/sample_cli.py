"""`python -m himar_jax sample --config=... --checkpoint=DIR [--num=N] [--labels=3,7] [--seed=S] [--step=K] --out=DIR`.

Restores the checkpoint's EMA params onto every device, draws `num` samples in global batches sharded over the
devices (sampling.sample_batches, tqdm bar over batches), decodes latent families with config.tokenizer
(sampling.load_image_decoder) and writes, under --out:
  images/<index>_class<label>.png   one PNG per sample (index = the sample's key index: seed and index fix it)
  grid.png                          one row per class (the first GRID_ROWS classes, GRID_COLUMNS samples each)
  samples_<N>x<H>x<W>x<C>.npz       ADM's sample batch: arr_0 uint8 NHWC, arr_1 labels
  samples.json                      what was sampled (checkpoint, step, seed, labels, sampler settings)
Labels: class-balanced by default (label of sample i = i mod num_classes; num defaults to config.sample.per_class
per class); --labels=3,7 cycles through those classes (num defaults to per_class per listed class). Sampler
settings come from the config, so `--config.model.cfg=2.5 --config.model.num_iter=64` change them.
--prompts=FILE hands over to the text-to-image family (himar_jax.text.sampling.sample_from_prompts).
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

log = logging.getLogger(__name__)

GRID_COLUMNS = 16   # samples per class row of grid.png
GRID_ROWS = 32      # classes (rows) of grid.png: the first ones present


def parse_labels(text: str | None, num_classes: int) -> np.ndarray | None:
  """"3,7" -> array([3, 7]); None / "" -> None. Labels outside [0, num_classes) raise."""
  if not text:
    return None
  try:
    labels = np.asarray([int(t) for t in str(text).split(",") if t.strip()], np.int32)
  except ValueError:
    raise ValueError(f"--labels={text!r} must be comma-separated class indices, e.g. --labels=3,7.") from None
  if labels.size == 0:
    raise ValueError(f"--labels={text!r} names no class; e.g. --labels=3,7.")
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(f"--labels={text!r}: {bad.tolist()} outside [0, {num_classes}) (config.model.num_classes="
                     f"{num_classes}).")
  return labels


def sample_labels(num: int | None, labels: np.ndarray | None, *, num_classes: int, per_class: int) -> np.ndarray:
  """The label of every sample: `labels` cycled, else class-balanced (i mod num_classes)."""
  classes = labels if labels is not None else np.arange(num_classes, dtype=np.int32)
  num = len(classes) * per_class if num is None else num
  if num <= 0:
    raise ValueError(f"--num={num} must be positive.")
  return classes[np.arange(num) % len(classes)].astype(np.int32)


def class_names(num_classes: int) -> list[str]:
  if num_classes == 10:  # Fashion-MNIST configs
    from himar_jax.data.fashion_mnist import CLASS_NAMES
    return [f"{i}: {n}" for i, n in enumerate(CLASS_NAMES)]
  return [f"class {i}" for i in range(num_classes)]


def class_grid(images: np.ndarray, labels: np.ndarray, *, columns: int = GRID_COLUMNS, rows: int = GRID_ROWS):
  """(rows, cols, H, W, C) uint8, one row per class present (ascending; at most `rows` classes), its first
  `columns` samples; rows with fewer samples are padded with white tiles. Returns (grid, row classes)."""
  classes = np.unique(labels)[:rows]
  cols = min(columns, max(int(np.sum(labels == c)) for c in classes))
  grid = np.full((len(classes), cols) + images.shape[1:], 255, np.uint8)
  for r, c in enumerate(classes):
    picked = images[labels == c][:cols]
    grid[r, :len(picked)] = picked
  return grid, classes


def save_png(image: np.ndarray, path: str) -> str:
  """One uint8 (H, W, C) image as a PNG (grey when C == 1), written atomically."""
  from PIL import Image
  tile = image[..., 0] if image.shape[-1] == 1 else image
  Image.fromarray(tile).save(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)  # never a half-written file under the final name
  return path


def write_outputs(images: np.ndarray, labels: np.ndarray, out_dir: str, *, num_classes: int,
                  indices: np.ndarray | None = None, meta: dict | None = None) -> dict:
  """PNG per sample, labelled grid, ADM batch and samples.json; returns the paths written."""
  from himar_jax.evaluation import metrics as metrics_lib
  from himar_jax.evaluation.images import save_grid

  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  indices = np.arange(len(images)) if indices is None else indices
  for i, image, label in zip(indices, images, labels):
    save_png(image, os.path.join(out_dir, "images", f"{int(i):06d}_class{int(label)}.png"))
  grid, rows = class_grid(images, labels)
  names = class_names(num_classes)
  grid_path = save_grid(grid, os.path.join(out_dir, "grid.png"), row_labels=[names[r] for r in rows])
  batch_path = metrics_lib.write_sample_batch(
      os.path.join(out_dir, "samples_{}.npz".format("x".join(map(str, images.shape)))), images, labels)
  summary = {"num_samples": int(len(images)), "images": os.path.join(out_dir, "images"), "grid": grid_path,
             "sample_batch": batch_path, **(meta or {})}
  with open(os.path.join(out_dir, "samples.json.tmp"), "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(os.path.join(out_dir, "samples.json.tmp"), os.path.join(out_dir, "samples.json"))
  return summary


def sample(config, checkpoint_dir: str, out_dir: str, *, num: int | None = None, labels: str | None = None,
           seed: int | None = None, step: int | None = None, batch_size: int | None = None,
           progress: bool = True) -> dict:
  """Samples and writes the outputs (process 0); returns the summary (also <out_dir>/samples.json)."""
  import jax

  from himar_jax import models, sampling
  from himar_jax.evaluation.images import to_uint8
  from himar_jax.train import checkpoint as ckpt_lib

  num_classes = int(config.model.num_classes)
  chosen = parse_labels(labels, num_classes)
  all_labels = sample_labels(num, chosen, num_classes=num_classes, per_class=int(config.sample.per_class))
  seed = int(config.sample.seed if seed is None else seed)
  _, step = ckpt_lib.resolve_step_dir(checkpoint_dir, step)  # a missing checkpoint fails before any work
  sample_kwargs = models.family_module(config).sample_kwargs(config)
  t0 = time.time()
  restored = sampling.restore_model_for_sampling(config, checkpoint_dir, step=step)
  decoder = sampling.load_image_decoder(config, restored)
  t1 = time.time()
  images = to_uint8(sampling.sample_batches(restored, all_labels, seed=seed, batch_size=batch_size,
                                            decoder=decoder, progress=progress, **sample_kwargs))
  sample_seconds = time.time() - t1
  if jax.process_index() != 0:
    return {}
  meta = {"checkpoint": os.path.abspath(checkpoint_dir), "step": int(step), "seed": seed,
          "family": config.model.family, "labels": all_labels.tolist(), "sample_kwargs": sample_kwargs,
          "restore_seconds": round(t1 - t0, 2), "sample_seconds": round(sample_seconds, 2),
          "devices": jax.device_count()}
  summary = write_outputs(images, all_labels, out_dir, num_classes=num_classes, meta=meta)
  log.info("wrote %d samples to %s", len(images), out_dir)
  return summary


def sample_prompts(config, checkpoint_dir: str, prompts_path: str, out_dir: str, *, per_prompt: int, seed: int):
  """The text-to-image family's sampler (himar_jax.text.sampling.sample_from_prompts)."""
  if not os.path.isfile(prompts_path):
    raise FileNotFoundError(f"--prompts={prompts_path!r} does not exist; pass a text file with one prompt a line.")
  try:
    from himar_jax.text import sampling as text_sampling
  except ModuleNotFoundError as e:
    if not (e.name or "").startswith("himar_jax.text"):
      raise
    raise RuntimeError("--prompts needs the text-to-image family (himar_jax/text/sampling.py), which this "
                       "checkout does not have yet; sample class-conditional models without --prompts.") from e
  fn = getattr(text_sampling, "sample_from_prompts", None)
  if fn is None:
    raise RuntimeError("himar_jax.text.sampling has no sample_from_prompts(config, checkpoint_dir, prompts_path, "
                       "out_dir, per_prompt=, seed=) yet; sample class-conditional models without --prompts.")
  return fn(config, checkpoint_dir, prompts_path, out_dir, per_prompt=per_prompt, seed=seed)


def sample_verb(flags) -> int:
  """The CLI verb; flags are defined in himar_jax/cli.py."""
  from absl import app

  from himar_jax.sampling import config_and_checkpoint
  config, checkpoint = config_and_checkpoint(flags, "sample")
  out = flags.out or (os.path.join(flags.workdir, "samples") if flags.workdir else None)
  if not out:
    raise app.UsageError("`sample` needs --out=DIR (created if missing) or --workdir=DIR (writes <workdir>/samples).")
  if flags.prompts:
    if flags.labels:
      raise app.UsageError("--prompts and --labels exclude each other (text-to-image vs class-conditional).")
    seed = int(config.sample.seed if flags.seed is None else flags.seed)
    per_prompt = flags.per_prompt or int(config.sample.per_class)
    result = sample_prompts(config, checkpoint, flags.prompts, out, per_prompt=per_prompt, seed=seed)
    if result:
      print(json.dumps(result if isinstance(result, dict) else {"output": result}, indent=2, default=str))
    return 0
  summary = sample(config, checkpoint, out, num=flags.num, labels=flags.labels, seed=flags.seed, step=flags.step,
                   batch_size=flags.batch_size)
  if summary:
    print(json.dumps({k: v for k, v in summary.items() if k != "labels"}, indent=2))
  return 0
