"""`python -m himar_jax evaluate --config=... --checkpoint=DIR [--num=N] [--ref=FILE] [--out=DIR]`.

1. Restores the checkpoint's EMA params onto every present device (sampling.restore_model_for_sampling); latent
   families (mar, himar, next_scale) decode their samples with config.tokenizer (sampling.load_image_decoder).
2. Generates `num` class-balanced samples (label of sample i = i mod num_classes; default 50 per class; families
   with `evaluation_conditions`, e.g. text-to-image, give their own: random validation captions) in chunks
   of `chunk_size`, sharded over the devices (sampling.sample_batches, one compiled sampler for all chunks).
   Sample i uses key fold_in(key(config.sample.seed), i): a pure function of (seed, i), whatever the chunking. Every chunk is written to <out>/chunks/ as it finishes (atomically); a
   rerun verifies finished chunks (indices, labels, seed, shape, dtype) and regenerates only missing or bad ones.
   manifest.json pins what the chunks depend on (checkpoint step, seed, chunk size, sampler settings).
3. Writes ADM's sample batch <out>/samples_<N>x<H>x<W>x<C>.npz (arr_0 uint8 NHWC, arr_1 labels).
4. Scores it and logs the scalars with CLU (TensorBoard in <out>) and a JSON summary <out>/metrics.json:
   - config.data.source == "fashion_mnist": the shipped Fashion-MNIST classifier (fmnist_classifier.py):
     Frechet distance of its penultimate features vs the test split (or --ref), its IS analogue, the accuracy of
     the class-conditional samples, precision/recall (k=3) on its features.
   - otherwise: the FID Inception (inception.py, weights from --inception_weights or
     $HIMAR_JAX_INCEPTION_WEIGHTS) against an ADM reference batch (--ref): FID, sFID, IS, precision, recall.

Multi-host: all processes sample (the model is sharded over the global mesh); process 0 writes the files and
computes the metrics (the output folder must be shared, like the checkpoint folder).

Reference batches from any image source:
  python -m himar_jax.evaluation.evaluate --make_reference --source=fashion_mnist:test --features=fmnist \
      --out=ref.npz
  python -m himar_jax.evaluation.evaluate --make_reference --source=DIR_OR_tfds:NAME:SPLIT --image_size=256 \
      --features=inception --inception_weights=pt_inception-2015-12-05-6726825d.pth --out=ref.npz
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time

import numpy as np

from himar_jax.data.images import IMAGE_EXTENSIONS, center_crop_adm
from himar_jax.evaluation import metrics as metrics_lib

log = logging.getLogger(__name__)

DEFAULT_PER_CLASS = 50
DEFAULT_CHUNK_SIZE = 5000   # samples per file on disk: the unit of resumption


def class_balanced_labels(num: int, num_classes: int) -> np.ndarray:
  return (np.arange(num) % num_classes).astype(np.int32)


# ---- chunked, resumable generation ---------------------------------------------------------------------------
def _chunk_path(out_dir: str, chunk: int) -> str:
  return os.path.join(out_dir, "chunks", f"chunk_{chunk:05d}.npz")


def _verify_chunk(path: str, *, start: int, labels: np.ndarray, seed: int, image_shape: tuple) -> str | None:
  """None if the chunk file holds exactly the expected samples, else why not."""
  if not os.path.isfile(path):
    return "missing"
  try:
    with np.load(path, allow_pickle=False) as f:
      images, stored_labels, indices, stored_seed = f["images"], f["labels"], f["indices"], int(f["seed"])
  except Exception as e:  # noqa: BLE001  (any unreadable file is regenerated)
    return f"unreadable ({type(e).__name__}: {e})"
  n = len(labels)
  if images.dtype != np.uint8 or images.shape != (n,) + tuple(image_shape):
    return f"images {images.dtype} {images.shape}, expected uint8 {(n,) + tuple(image_shape)}"
  if not np.array_equal(indices, np.arange(start, start + n)) or not np.array_equal(stored_labels, labels):
    return "indices or labels differ"
  if stored_seed != seed:
    return f"seed {stored_seed}, expected {seed}"
  return None


def _manifest(config, step: int, chunk_size: int, sample_kwargs: dict, tokenizer_fingerprint: str = "") -> dict:
  model_json = json.loads(config.model.to_json_best_effort())
  out = {"step": int(step), "seed": int(config.sample.seed), "chunk_size": int(chunk_size),
         "sample_kwargs": {k: v for k, v in sorted(sample_kwargs.items())},
         "model_fingerprint": hashlib.sha256(json.dumps(model_json, sort_keys=True).encode()).hexdigest()[:16]}
  if tokenizer_fingerprint:  # latent families: the images also depend on the decoder
    out["tokenizer_fingerprint"] = tokenizer_fingerprint[:16]
  return out


def _check_manifest(out_dir: str, manifest: dict) -> None:
  path = os.path.join(out_dir, "chunks", "manifest.json")
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    if old != manifest:
      diff = {k: (old.get(k), manifest.get(k)) for k in set(old) | set(manifest) if old.get(k) != manifest.get(k)}
      raise ValueError(f"{path} was written for another run ({diff} as (stored, now)); its chunks cannot be "
                       "reused: pass another --out, or delete that chunks folder to start over.")
  else:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(manifest, f, indent=2)
    os.replace(path + ".tmp", path)


def _broadcast_mask(mask: np.ndarray) -> np.ndarray:
  import jax
  if jax.process_count() == 1:
    return mask
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(mask.astype(np.int32))).astype(bool)


def generate_samples(config, checkpoint_dir: str, out_dir: str, *, num: int, step: int,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """All `num` samples as (uint8 NHWC images, labels), generating only the chunks not yet on disk."""
  import jax

  from himar_jax import models, sampling
  from himar_jax.evaluation.images import to_uint8
  from himar_jax.parallel import mesh as mesh_lib

  family = models.family_module(config)
  sample_kwargs = family.sample_kwargs(config)
  # What each sample is conditioned on: class-balanced labels, or a family's own (labels stored in the chunks and
  # the ADM batch, conditions(chunk labels) -> the sampler's input), e.g. text-to-image: validation captions.
  if hasattr(family, "evaluation_conditions"):
    labels, conditions = family.evaluation_conditions(config, num)
  else:
    labels, conditions = class_balanced_labels(num, config.model.num_classes), None
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  decoder = sampling.load_image_decoder(config, mesh=mesh)  # latent families: the tokenizer (errors before sampling)
  image_shape = tuple(decoder.image_shape)
  is_main = jax.process_index() == 0
  if is_main:
    _check_manifest(out_dir, _manifest(config, step, chunk_size, sample_kwargs, decoder.fingerprint))
  starts = list(range(0, num, chunk_size))
  reasons = [_verify_chunk(_chunk_path(out_dir, c), start=s, labels=labels[s:s + chunk_size],
                           seed=int(config.sample.seed), image_shape=image_shape) if is_main else None
             for c, s in enumerate(starts)]
  todo = _broadcast_mask(np.array([r is not None for r in reasons]))
  for c in np.flatnonzero(todo):
    if is_main and os.path.exists(_chunk_path(out_dir, c)):
      log.warning("regenerating %s: %s", _chunk_path(out_dir, c), reasons[c])
  log.info("%d of %d chunks already done in %s", len(starts) - int(todo.sum()), len(starts), out_dir)

  restored = None
  bar = None
  if progress and is_main:
    from tqdm.auto import tqdm
    bar = tqdm(total=num, initial=int(sum(min(chunk_size, num - s) for c, s in enumerate(starts) if not todo[c])),
               desc="sampling", unit="img")
  for c in np.flatnonzero(todo):
    if restored is None:  # only when something is left to sample
      restored = sampling.restore_model_for_sampling(config, checkpoint_dir, mesh=mesh, step=step)
    s = starts[c]
    chunk_labels = labels[s:s + chunk_size]
    seed = int(config.sample.seed)
    chunk_conditions = chunk_labels if conditions is None else conditions(chunk_labels)
    images = to_uint8(sampling.sample_batches(restored, chunk_conditions, seed=seed, start_index=s, decoder=decoder,
                                              **sample_kwargs))
    if is_main:
      path = _chunk_path(out_dir, int(c))
      np.savez(path + ".tmp.npz", images=images, labels=chunk_labels, indices=np.arange(s, s + len(chunk_labels)),
               seed=np.int64(seed))
      os.replace(path + ".tmp.npz", path)  # a killed run never leaves a half-written chunk under the final name
    if bar is not None:
      bar.update(len(chunk_labels))
  if bar is not None:
    bar.close()
  if not is_main:
    return np.zeros((0,) + image_shape, np.uint8), np.zeros((0,), np.int32)
  images = []
  for c, s in enumerate(starts):
    with np.load(_chunk_path(out_dir, c), allow_pickle=False) as f:
      images.append(f["images"])
  return np.concatenate(images), labels


# ---- scoring -------------------------------------------------------------------------------------------------
def score_fashion_mnist(images: np.ndarray, labels: np.ndarray, *, ref: str | None, data_path: str,
                        classifier=None) -> dict:
  """Classifier-based metrics of grey samples (N, H, W, 1) uint8 vs the Fashion-MNIST test split or `ref`."""
  from himar_jax.data import fashion_mnist
  from himar_jax.evaluation import fmnist_classifier as fc

  classifier = classifier or fc.Classifier()
  logits, feats = classifier(images)
  if ref:
    reference = metrics_lib.read_reference(ref, feature_dim=fc.FEATURE_DIM)
    if reference.stats is not None and reference.feature_extractor != fc.FEATURE_EXTRACTOR:
      raise ValueError(f"reference {ref!r} holds {reference.feature_extractor} statistics, but Fashion-MNIST runs "
                       f"are scored with {fc.FEATURE_EXTRACTOR}; write one with `python -m "
                       "himar_jax.evaluation.evaluate --make_reference --source=fashion_mnist:test "
                       "--features=fmnist --out=FILE`.")
    if reference.images is None:
      raise ValueError(f"reference {ref!r} has no images (arr_0), which precision/recall need.")
    ref_images = reference.images
  else:
    ref_images = fashion_mnist.load(data_path, "test")[0][..., None]
    reference = None
  ref_logits, ref_feats = classifier(ref_images)
  ref_stats = reference.stats if reference is not None and reference.stats is not None else \
      metrics_lib.Statistics.of(ref_feats)
  precision, recall = metrics_lib.precision_recall(ref_feats, feats, k=3)
  return {
      "fmnist_fd": metrics_lib.frechet_distance(metrics_lib.Statistics.of(feats), ref_stats),
      "fmnist_is": metrics_lib.inception_score(metrics_lib.softmax(logits)),
      "class_accuracy": fc.accuracy(logits, labels),
      "precision": precision, "recall": recall,
      "ref_fmnist_is": metrics_lib.inception_score(metrics_lib.softmax(ref_logits)),
  }


def _inception_activations(extractor, images, cache: str | None, progress: bool) -> dict:
  if cache and os.path.isfile(cache):
    with np.load(cache, allow_pickle=False) as f:
      if f["pool"].shape[0] == len(images):
        return {k: f[k] for k in f.files}
  acts = extractor(images, progress=progress)
  if cache:
    np.savez(cache + ".tmp.npz", **acts)
    os.replace(cache + ".tmp.npz", cache)
  return acts


def score_inception(images: np.ndarray, *, ref: str | None, weights: str | None, out_dir: str,
                    progress: bool = True, extractor=None) -> dict:
  """ADM's five numbers for uint8 NHWC samples vs an ADM reference batch."""
  from himar_jax.evaluation import inception

  if not ref:
    raise ValueError("Inception metrics need a reference batch: pass --ref=FILE (ADM's VIRTUAL_imagenet256_"
                     "labeled.npz, or one written with `python -m himar_jax.evaluation.evaluate --make_reference`).")
  reference = metrics_lib.read_reference(ref, feature_dim=inception.POOL_DIM, spatial_dim=inception.SPATIAL_DIM,
                                         image_size=images.shape[1])
  if reference.stats is not None and reference.feature_extractor != inception.FEATURE_EXTRACTOR:
    raise ValueError(f"reference {ref!r} holds {reference.feature_extractor} statistics, not Inception's.")
  if reference.images is None:
    raise ValueError(f"reference {ref!r} has no images (arr_0), which precision/recall need.")
  extractor = extractor or inception.InceptionFeatures(inception.load_pytorch_fid(weights))
  acts = extractor(images, progress=progress)
  stamp = os.stat(ref)
  cache = os.path.join(out_dir, f"ref_acts_{os.path.basename(ref)}_{stamp.st_size}_{int(stamp.st_mtime)}.npz")
  ref_acts = _inception_activations(extractor, reference.images, cache, progress)
  ref_stats = reference.stats or metrics_lib.Statistics.of(ref_acts["pool"])
  ref_spatial = reference.spatial_stats or metrics_lib.Statistics.of(ref_acts["spatial"])
  precision, recall = metrics_lib.precision_recall(ref_acts["pool"], acts["pool"], k=3)
  return {
      "inception_score": metrics_lib.inception_score(metrics_lib.softmax(acts["logits"])),
      "fid": metrics_lib.frechet_distance(metrics_lib.Statistics.of(acts["pool"]), ref_stats),
      "sfid": metrics_lib.frechet_distance(metrics_lib.Statistics.of(acts["spatial"]), ref_spatial),
      "precision": precision, "recall": recall,
  }


def uses_fashion_mnist_classifier(config) -> bool:
  return config.data.get("source", "") == "fashion_mnist"


def _log_scalars(out_dir: str, step: int, scores: dict) -> None:
  """CLU's default writer (TensorBoard in out_dir + log lines); without clu installed, log lines only."""
  try:
    from clu import metric_writers
  except ImportError:
    log.warning("clu is not installed: eval scalars go to the log and metrics.json only")
    log.info("eval step %d: %s", step, scores)
    return
  writer = metric_writers.create_default_writer(out_dir, just_logging=False)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
  writer.flush()
  writer.close()


def evaluate(config, checkpoint_dir: str, out_dir: str, *, num: int | None = None, ref: str | None = None,
             inception_weights: str | None = None, step: int | None = None,
             chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True) -> dict:
  """Samples, writes the ADM batch, scores, logs; returns the JSON summary (also at <out_dir>/metrics.json)."""
  import jax

  from himar_jax.train import checkpoint as ckpt_lib

  _, step = ckpt_lib.resolve_step_dir(checkpoint_dir, step)
  num = num or config.get("eval", {}).get("num", 0) or DEFAULT_PER_CLASS * config.model.num_classes
  if num <= 0 or chunk_size <= 0:
    raise ValueError(f"--num={num} and chunk_size={chunk_size} must be positive.")
  fmnist = uses_fashion_mnist_classifier(config)
  if not fmnist:  # fail before hours of sampling
    from himar_jax.evaluation import inception
    inception.resolve_weights_path(inception_weights)
    if not ref:
      raise ValueError("Inception metrics need --ref=FILE (an ADM reference batch).")
  t0 = time.time()
  images, labels = generate_samples(config, checkpoint_dir, out_dir, num=num, step=step, chunk_size=chunk_size,
                                    progress=progress)
  sample_seconds = time.time() - t0
  if jax.process_index() != 0:
    return {}
  if not fmnist and images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)  # ADM batches are RGB
  batch_path = os.path.join(out_dir, "samples_{}.npz".format("x".join(map(str, images.shape))))
  metrics_lib.write_sample_batch(batch_path, images, labels)
  if fmnist:
    scores = score_fashion_mnist(images, labels, ref=ref, data_path=config.data.path)
  else:
    scores = score_inception(images, ref=ref, weights=inception_weights, out_dir=out_dir, progress=progress)
  summary = {"metrics": scores, "step": int(step), "num_samples": int(num), "checkpoint": os.path.abspath(
      checkpoint_dir), "reference": os.path.abspath(ref) if ref else "fashion_mnist:test",
             "feature_extractor": "fmnist_cnn_v1" if fmnist else "inception_2015_12_05",
             "sample_batch": batch_path, "sample_seconds": round(sample_seconds, 2),
             "total_seconds": round(time.time() - t0, 2), "devices": jax.device_count()}
  _log_scalars(out_dir, int(step), scores)
  path = os.path.join(out_dir, "metrics.json")
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(path + ".tmp", path)
  log.info("metrics: %s (summary %s)", json.dumps(scores), path)
  return summary


def evaluate_verb(flags) -> int:
  """The CLI verb; flags are defined in himar_jax/cli.py."""
  from himar_jax.sampling import config_and_checkpoint
  config, checkpoint = config_and_checkpoint(flags, "evaluate")
  out = flags.out or os.path.join(flags.workdir or os.path.dirname(os.path.abspath(checkpoint)), "eval")
  summary = evaluate(config, checkpoint, out, num=flags.num, ref=flags.ref, inception_weights=flags.inception_weights)
  if summary:
    print(json.dumps(summary, indent=2))
  return 0


# ---- reference batches from image sources --------------------------------------------------------------------
def center_crop_resize(image, size: int) -> np.ndarray:
  """ADM's loader: convert to RGB, then center_crop_arr (himar_jax/data/images.py); uint8 (size, size, 3)."""
  return center_crop_adm(image.convert("RGB"), size)


def load_image_source(source: str, *, image_size: int | None = None, limit: int = 0) -> np.ndarray:
  """uint8 NHWC images from "fashion_mnist[:split[:path]]" (grey, 28x28, or centred on an image_size canvas),
  "tfds:name[:split]", or a folder of image files (ADM centre crop to image_size)."""
  from PIL import Image

  if source.startswith("fashion_mnist"):
    from himar_jax.data import fashion_mnist
    parts = source.split(":", 2)
    split = parts[1] if len(parts) > 1 and parts[1] else "test"
    images = fashion_mnist.load(parts[2] if len(parts) > 2 else fashion_mnist.DEFAULT_PATH, split)[0]
    if limit:
      images = images[:limit]
    if image_size and image_size != images.shape[1]:
      if image_size < images.shape[1]:
        raise ValueError(f"--image_size={image_size} is smaller than Fashion-MNIST's {images.shape[1]}.")
      pad = image_size - images.shape[1]
      images = np.pad(images, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    return images[..., None]
  if not image_size:
    raise ValueError(f"--image_size is needed to read {source!r} (images are centre-cropped to it).")
  if source.startswith("tfds:"):
    import tensorflow_datasets as tfds
    parts = source.split(":")
    ds = tfds.load(parts[1], split=parts[2] if len(parts) > 2 else "train", shuffle_files=False)
    out = []
    for example in tfds.as_numpy(ds):
      out.append(center_crop_resize(Image.fromarray(example["image"].squeeze()), image_size))
      if limit and len(out) >= limit:
        break
    return np.stack(out)
  if not os.path.isdir(source):
    raise FileNotFoundError(f"image source {source!r} is neither fashion_mnist[:split], tfds:name[:split] nor a "
                            "folder of images.")
  files = sorted(os.path.join(root, f) for root, _, names in os.walk(source) for f in names
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise FileNotFoundError(f"no {IMAGE_EXTENSIONS} images under {source!r}.")
  files = files[:limit] if limit else files
  return np.stack([center_crop_resize(Image.open(f), image_size) for f in files])


def make_reference(source: str, out: str, *, features: str, image_size: int | None = None,
                   inception_weights: str | None = None, limit: int = 0) -> str:
  """Writes a reference .npz (images + statistics of `features`: "inception" or "fmnist") from an image source."""
  images = load_image_source(source, image_size=image_size, limit=limit)
  if features == "fmnist":
    from himar_jax.evaluation import fmnist_classifier as fc
    _, feats = fc.Classifier()(images)
    return metrics_lib.write_reference(out, images=images, features=feats, feature_extractor=fc.FEATURE_EXTRACTOR)
  if features == "inception":
    from himar_jax.evaluation import inception
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    acts = inception.InceptionFeatures(inception.load_pytorch_fid(inception_weights))(images, progress=True)
    return metrics_lib.write_reference(out, images=images, features=acts["pool"], spatial_features=acts["spatial"],
                                       feature_extractor=inception.FEATURE_EXTRACTOR)
  raise ValueError(f"--features={features!r} must be 'inception' or 'fmnist'.")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Write a reference batch (.npz) for `evaluate`.")
  parser.add_argument("--make_reference", action="store_true", required=True)
  parser.add_argument("--source", required=True, help="fashion_mnist[:split[:path]], tfds:name[:split], or a folder")
  parser.add_argument("--out", required=True)
  parser.add_argument("--features", choices=("inception", "fmnist"), default="inception")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--inception_weights", default=None)
  parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  path = make_reference(args.source, args.out, features=args.features, image_size=args.image_size,
                        inception_weights=args.inception_weights, limit=args.limit)
  print(path)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
