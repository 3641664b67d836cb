"""The `quickstart` verb: a labelled grid of class-conditional Fashion-MNIST samples (one row per class).

Two model families (configs/quickstart.py):
- himar (the default): Hi-MAR on the latents of a small KL VAE. Without `from_scratch` it samples the trained
  export shipped in himar_jax/assets/quickstart (seconds on a CPU). With it, the whole pipeline runs in the
  workdir, each stage resuming where it stopped:
    <workdir>/vae/         KL VAE training (config.vae, the trainer of himar_jax/tokenizers/training.py)
    <workdir>/tokenizer/   its EMA weights, latents normalised per channel (normalize_latents)
    <workdir>/latents/     the latent cache: 32 px image + 16 px pivot copy, both flips (himar_jax/data/latent_cache)
    <workdir>/checkpoints/ Hi-MAR training on that cache (himar_jax/train/loop.py)
    <workdir>/export/      tokenizer/ + checkpoints/<step>/state (EMA params only, config.quickstart.store_dtype)
                           + quickstart.json: the layout of himar_jax/assets/quickstart
  and then samples the export.
- pixel_mar (variants pixel / tiny): MAR on pixel patches, trained in the workdir, then sampled.
The grid is written to <workdir>/samples/grid.png.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from himar_jax.data import fashion_mnist
from himar_jax.evaluation.images import save_grid, to_uint8
from himar_jax.sampling import restore_model_for_sampling, sample_batches, sample_class_grid
from himar_jax.train import loop

log = logging.getLogger(__name__)

EXPORT_INFO = "quickstart.json"


# ---- the tokenizer ---------------------------------------------------------------------------------------------
def normalize_latents(tokenizer, images: np.ndarray, *, batch_size: int = 256):
  """A copy of a KL VAE whose posterior means on `images` (uint8 (N, S, S, C)) have per-channel mean 0 and std 1.

  The map z' = (z - mu) / s is folded into the 1x1 convs around the latent (quant_conv's mean outputs and bias,
  its log-variance bias by -2 log s; post_quant_conv's input rows by s and its bias by mu W), so decode(encode(x))
  is unchanged and the VAE's scale_factor stays 1: the role of LDM's measured scale factor, per channel, with no
  number to carry in the generator's config. Returns (new tokenizer, mu, s).
  """
  from flax import nnx

  graphdef, state = nnx.split(tokenizer)

  @jax.jit
  def means(state, x):
    return nnx.merge(graphdef, state).encode(x.astype(jnp.float32) / 127.5 - 1.0).mean

  z = np.concatenate([np.asarray(means(state, images[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)])
  z = z.reshape(-1, z.shape[-1]).astype(np.float64)
  mu, s = z.mean(0), np.maximum(z.std(0), 1e-6)
  new = nnx.clone(tokenizer)  # the input stays as it was
  zdim = tokenizer.config.embed_dim
  q, pq = new.quant_conv, new.post_quant_conv
  qk, qb = np.asarray(q.kernel[...], np.float64), np.asarray(q.bias[...], np.float64)
  qk[..., :zdim] /= s
  qb[:zdim] = (qb[:zdim] - mu) / s
  qb[zdim:] -= 2.0 * np.log(s)
  pk, pb = np.asarray(pq.kernel[...], np.float64), np.asarray(pq.bias[...], np.float64)
  pb = pb + mu @ pk[0, 0]
  pk = pk * s[None, None, :, None]
  for var, value in ((q.kernel, qk), (q.bias, qb), (pq.kernel, pk), (pq.bias, pb)):
    var.set_value(jnp.asarray(value, jnp.float32))
  return new, mu, s


def _training_images(vae_config, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """uint8 (N, S, S, 1) padded Fashion-MNIST training images (the cache's source) and labels."""
  from himar_jax.data.images import ArrayImageSource

  c = vae_config.cache
  images, labels = fashion_mnist.load(c.path or vae_config.data.path, c.split)
  n = min(x for x in (len(images), c.max_examples or len(images), limit or len(images)))
  source = ArrayImageSource(images[:n], labels[:n], c.image_size)
  return np.stack([source[i][0] for i in range(n)]), labels[:n]


def train_tokenizer(config, workdir: str) -> str:
  """Trains config.vae in <workdir>/vae and writes the normalised tokenizer directory <workdir>/tokenizer."""
  from himar_jax.convert.tokenizers import load_tokenizer, save_tokenizer
  from himar_jax.tokenizers.training import export_tokenizer

  tok_dir = os.path.join(workdir, "tokenizer")
  if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
    log.info("tokenizer %s exists; skipping VAE training", tok_dir)
    return tok_dir
  vae_dir = os.path.join(workdir, "vae")
  t0 = time.time()
  loop.train(config.vae, vae_dir)
  raw_dir = os.path.join(vae_dir, "export")
  if os.path.isdir(raw_dir):
    shutil.rmtree(raw_dir)  # a stale export of an interrupted run
  export_tokenizer(vae_dir, config.vae, raw_dir)
  tokenizer, _ = load_tokenizer(raw_dir)
  images, _ = _training_images(config.vae, config.quickstart.normalize_samples)
  tokenizer, mu, s = normalize_latents(tokenizer, images)
  log.info("VAE trained in %.0f s; latent channel means %s, stds %s folded into the tokenizer",
           time.time() - t0, np.round(mu, 3).tolist(), np.round(s, 3).tolist())
  tmp = tok_dir + ".tmp"
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)
  save_tokenizer(tokenizer, "kl_vae", tmp, source=f"quickstart:{os.path.abspath(vae_dir)} (normalised latents)")
  os.replace(tmp, tok_dir)
  return tok_dir


def cache_latents(config, tok_dir: str, cache_dir: str) -> dict:
  """Writes (or resumes) the latent cache of the training images with the tokenizer in `tok_dir`."""
  from himar_jax.convert.tokenizers import load_tokenizer
  from himar_jax.data import latent_cache as lc

  c = config.vae.cache
  tokenizer, meta = load_tokenizer(tok_dir)
  images, labels = _training_images(config.vae)
  return lc.write_cache(lc.ArrayImageSource(images, labels, c.image_size), tokenizer, meta["kind"],
                        directory=cache_dir, tokenizer_identity=lc.tokenizer_identity(tok_dir),
                        image_size=c.image_size, pivot_size=c.pivot_size, shard_size=c.shard_size,
                        batch_size=c.batch_size, source_name=f"fashion_mnist:{c.split}",
                        progress=c.get("progress", True))


# ---- export ----------------------------------------------------------------------------------------------------
def export(config, workdir: str, out_dir: str) -> str:
  """Writes <out_dir>/tokenizer (copy of config.tokenizer.checkpoint), <out_dir>/checkpoints/<step>/state (the EMA
  params of the latest checkpoint in <workdir>/checkpoints, stored as config.quickstart.store_dtype, plus the
  model's buffers) and <out_dir>/quickstart.json; replaces an existing out_dir."""
  import orbax.checkpoint as ocp

  from himar_jax.train.checkpoint import resolve_step_dir

  out_dir = os.path.abspath(out_dir)
  _, step = resolve_step_dir(loop.checkpoint_dir(workdir))
  restored = restore_model_for_sampling(config, loop.checkpoint_dir(workdir), step=step)
  store = jnp.dtype(config.quickstart.store_dtype)
  tmp = out_dir + ".tmp"
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)
  shutil.copytree(config.tokenizer.checkpoint, os.path.join(tmp, "tokenizer"))
  tree = {"ema_params": jax.tree.map(lambda x: jnp.asarray(jax.device_get(x), store), restored.params),
          "buffers": jax.tree.map(lambda x: jnp.asarray(jax.device_get(x)), restored.buffers)}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(tmp, "checkpoints", str(step), "state"), tree)
  ckptr.wait_until_finished()
  info = {"step": step, "store_dtype": store.name, "model": config.model.to_dict(),
          "num_params": int(sum(x.size for x in jax.tree.leaves(restored.params)))}
  with open(os.path.join(tmp, EXPORT_INFO), "w") as f:
    json.dump(info, f, indent=2, default=str)
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return out_dir


def export_config(config, export_dir: str):
  """A copy of `config` that decodes with the export's tokenizer."""
  config = copy.deepcopy(config)
  config.tokenizer.checkpoint = os.path.join(export_dir, "tokenizer")
  return config


def check_export(config, export_dir: str) -> None:
  """Clear errors for a missing export or one made with another model layout."""
  for part in (EXPORT_INFO, "tokenizer", "checkpoints"):
    if not os.path.exists(os.path.join(export_dir, part)):
      raise FileNotFoundError(f"{export_dir!r} is not a quickstart export (no {part}); pass "
                              "--config.quickstart.checkpoint=DIR with a folder written by `quickstart "
                              "--from_scratch` (<workdir>/export), or train one with --from_scratch.")
  with open(os.path.join(export_dir, EXPORT_INFO)) as f:
    stored = json.load(f)["model"]
  layout = ("family", "token_dim", "grid_size", "lowres_grid", "buffer_size", "encoder_dim", "encoder_depth",
            "decoder_dim", "decoder_depth", "head_width", "head_depth", "dit_width", "dit_depth", "num_classes")
  diff = {k: (stored.get(k), config.model.get(k)) for k in layout if stored.get(k) != config.model.get(k)}
  if diff:
    raise ValueError(f"the quickstart export {export_dir!r} holds another model ({ {k: v[0] for k, v in diff.items()} }"
                     f") than the config ({ {k: v[1] for k, v in diff.items()} }); sample it with the config it "
                     "was trained with, or train a new one with --from_scratch.")


# ---- the pipeline ----------------------------------------------------------------------------------------------
def himar_training_config(config, tok_dir: str, cache_dir: str):
  config = copy.deepcopy(config)
  config.tokenizer.checkpoint = tok_dir
  config.data.cache_dir = cache_dir
  return config


def train_from_scratch(config, workdir: str) -> str:
  """VAE -> normalised tokenizer -> latent cache -> Hi-MAR -> export; returns the export directory."""
  t0 = time.time()
  tok_dir = train_tokenizer(config, workdir)
  t1 = time.time()
  cache_dir = os.path.join(workdir, "latents")
  cache_latents(config, tok_dir, cache_dir)
  t2 = time.time()
  himar_config = himar_training_config(config, tok_dir, cache_dir)
  loop.train(himar_config, workdir)
  t3 = time.time()
  out = export(himar_config, workdir, os.path.join(workdir, "export"))
  log.info("from scratch: VAE %.0f s, cache %.0f s, Hi-MAR %.0f s; export %s", t1 - t0, t2 - t1, t3 - t2, out)
  return out


def decode(config, latents: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
  """Generator latents (N, h, w, z) -> images (N, H, W, C) in [-1, 1] through config.tokenizer.checkpoint."""
  from flax import nnx

  from himar_jax.convert.tokenizers import load_tokenizer

  tokenizer, _ = load_tokenizer(config.tokenizer.checkpoint)
  graphdef, state = nnx.split(tokenizer)
  run = jax.jit(lambda state, z: jnp.clip(nnx.merge(graphdef, state).decode_scaled(z), -1.0, 1.0))
  return np.concatenate([np.asarray(run(state, jnp.asarray(latents[i:i + batch_size])))
                         for i in range(0, len(latents), batch_size)])


def sample_export(config, export_dir: str, labels, *, seed: int, batch_size: int | None = None,
                  **overrides) -> np.ndarray:
  """uint8 images (N, H, W, 1), one per label, from a quickstart export (sample i uses fold_in(key(seed), i));
  `overrides` replace the config's sampler settings (num_iter, cfg, re_cfg, ...)."""
  from himar_jax import models

  check_export(config, export_dir)
  config = export_config(config, export_dir)
  restored = restore_model_for_sampling(config, os.path.join(export_dir, "checkpoints"))
  kwargs = {**models.family_module(config).sample_kwargs(config), **overrides}
  latents = sample_batches(restored, np.asarray(labels), seed=seed, batch_size=batch_size, **kwargs)
  return to_uint8(decode(config, latents))


def run(config, workdir: str, *, from_scratch: bool | None = None) -> str:
  """Writes <workdir>/samples/grid.png and returns its path (see the module docstring)."""
  num_classes, per_class, seed = config.model.num_classes, config.sample.per_class, config.sample.seed
  if config.model.family == "pixel_mar":
    loop.train(config, workdir)
    model = restore_model_for_sampling(config, loop.checkpoint_dir(workdir))
    images = sample_class_grid(model, config, num_classes=num_classes, per_class=per_class, seed=seed)
  else:
    if from_scratch is None:
      from_scratch = bool(config.quickstart.from_scratch)
    export_dir = train_from_scratch(config, workdir) if from_scratch else config.quickstart.checkpoint
    t0 = time.time()
    labels = np.repeat(np.arange(num_classes), per_class)
    images = sample_export(config, export_dir, labels, seed=seed)
    images = images.reshape((num_classes, per_class) + images.shape[1:])
    log.info("sampled %d images from %s in %.1f s", len(labels), export_dir, time.time() - t0)
  path = os.path.join(workdir, "samples", "grid.png")
  if jax.process_index() == 0:
    row_labels = fashion_mnist.CLASS_NAMES if num_classes == 10 else None
    save_grid(np.asarray(images), path, row_labels=row_labels)
    log.info("wrote %s", path)
  return path


# ---- evaluation of an export (launch/train_quickstart.sh) --------------------------------------------------------
def evaluate_export(config, export_dir: str, *, num: int, data_path: str, settings: dict | None = None,
                    seed: int = 0, batch_size: int | None = None) -> dict:
  """Fashion-MNIST classifier scores of `num` class-balanced samples of an export: class_accuracy (argmax vs
  the label asked for), fmnist_fd (Frechet distance of the classifier's features to the test split), precision,
  recall; `settings` override the sampler's. Returns the scores, the settings and the seconds taken."""
  from himar_jax.evaluation.evaluate import class_balanced_labels, score_fashion_mnist

  t0 = time.time()
  labels = class_balanced_labels(num, config.model.num_classes)
  images = sample_export(config, export_dir, labels, seed=seed, batch_size=batch_size, **(settings or {}))
  seconds = time.time() - t0
  scores = score_fashion_mnist(images, labels, ref=None, data_path=data_path)
  return {"num": num, "settings": settings or {}, "sample_seconds": round(seconds, 1),
          **{k: float(v) for k, v in scores.items()}}


def main(argv=None) -> int:
  """`python -m himar_jax.quickstart --export=DIR --num=N [--setting='{"cfg": 2.0}' ...] --out=scores.json`."""
  import argparse

  parser = argparse.ArgumentParser(description="Scores a quickstart export with the Fashion-MNIST classifier.")
  parser.add_argument("--export", required=True, help="a quickstart export (<workdir>/export or the shipped one)")
  parser.add_argument("--config", default="", help="configs/quickstart.py variant ('' = the Hi-MAR quickstart)")
  parser.add_argument("--num", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=500)
  parser.add_argument("--data", default=fashion_mnist.DEFAULT_PATH, help="folder with the test split IDX files")
  parser.add_argument("--setting", action="append", default=[], help="JSON dict of sampler overrides; repeatable")
  parser.add_argument("--out", default="", help="JSON file for the list of results")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  from configs.quickstart import get_config

  config = get_config(args.config)
  results = []
  for setting in args.setting or ["{}"]:
    results.append(evaluate_export(config, args.export, num=args.num, data_path=args.data,
                                   settings=json.loads(setting), batch_size=args.batch_size))
    print(json.dumps(results[-1]), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
