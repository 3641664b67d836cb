"""Sampling text-to-image Hi-MAR from a prompt file (`python -m himar_jax sample --prompts=FILE`), and the caption
conditions of evaluation (`evaluate`: FID of samples for N random validation captions).

sample_from_prompts writes under out_dir:
  prompts_grid.png        one row per prompt (captioned), `per_prompt` samples each
  prompts_samples.npz     arr_0 uint8 NHWC samples (prompt-major), arr_1 the prompt index of each, prompts
  prompts.json            prompts, token counts, seed, checkpoint step, sampler settings
Sample j of prompt p uses key fold_in(key(seed), p * per_prompt + j).
"""
from __future__ import annotations

import json
import logging
import os
import textwrap

import numpy as np

log = logging.getLogger(__name__)


def read_prompts(path: str) -> list[str]:
  """Non-blank lines of a UTF-8 text file, stripped."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path!r} does not exist; pass a text file with one prompt a line.")
  with open(path, encoding="utf-8") as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f"prompt file {path!r} holds no prompt (only empty lines); write one prompt a line.")
  return prompts


def _check_t2i(config) -> None:
  if config.model.family != "himar_t2i":
    raise ValueError(f"--prompts needs a text-to-image config (configs/himar_t2i.py); config.model.family is "
                     f"{config.model.family!r}.")


def check_empty_context(restored, embedder, config) -> None:
  """Warns when the checkpoint's empty-caption buffer is not this CLIP's empty caption (another text encoder)."""
  from himar_jax.data.coco import context_dtype
  stored = restored.buffers.get("empty_context")
  if stored is None:
    return
  import jax
  stored = np.asarray(jax.device_get(stored), np.float32)
  mine = embedder([""])[0][0].astype(context_dtype(config)).astype(np.float32)
  err = float(np.abs(stored - mine).max() / max(np.abs(mine).max(), 1e-6))
  if not np.isfinite(err) or err > 1e-2:
    log.warning("the checkpoint's empty-caption embedding differs from config.text.clip's (max relative difference "
                "%.3g): the model was trained with another text encoder, or the checkpoint holds no trained one", err)


def _row_label(prompt: str, tokens: int, width: int, lines: int) -> str:
  wrapped = textwrap.wrap(prompt, width) or [""]
  if len(wrapped) > lines:
    wrapped = wrapped[:lines]
    wrapped[-1] = wrapped[-1][:max(width - 3, 1)] + "..."
  return "\n".join(wrapped + ([f"({tokens} tokens, truncated)"] if tokens > 77 else []))


def sample_from_prompts(config, checkpoint_dir: str, prompts_path: str, out_dir: str, *, per_prompt: int,
                        seed: int) -> str:
  """Samples `per_prompt` images for every prompt of `prompts_path`; returns the grid's path (see module doc)."""
  import jax

  from himar_jax import models, sampling
  from himar_jax.data.coco import load_text_embedder
  from himar_jax.evaluation.images import save_grid, to_uint8
  from himar_jax.train import checkpoint as ckpt_lib

  _check_t2i(config)
  if per_prompt < 1:
    raise ValueError(f"per_prompt={per_prompt} must be >= 1.")
  prompts = read_prompts(prompts_path)
  _, step = ckpt_lib.resolve_step_dir(checkpoint_dir, None)  # a missing checkpoint fails before any work
  embedder = load_text_embedder(config)
  counts = [embedder.tokenizer.num_tokens(p) for p in prompts]
  contexts, _ = embedder(prompts)  # warns for prompts over 77 tokens (truncated)
  if contexts.shape[1:] != (config.model.context_length, config.model.context_dim):
    raise ValueError(f"config.text.clip gives contexts {contexts.shape[1:]}, the model takes "
                     f"({config.model.context_length}, {config.model.context_dim}); use the text encoder it was "
                     "trained with.")
  restored = sampling.restore_model_for_sampling(config, checkpoint_dir, step=step)
  check_empty_context(restored, embedder, config)
  decoder = sampling.load_image_decoder(config, restored)
  sample_kwargs = models.family_module(config).sample_kwargs(config)
  conditions = np.repeat(contexts, per_prompt, axis=0)
  images = to_uint8(sampling.sample_batches(restored, conditions, seed=seed, decoder=decoder, **sample_kwargs))
  if jax.process_index() != 0:
    return ""
  os.makedirs(out_dir, exist_ok=True)
  h = images.shape[1]
  scale = max(1, 128 // h)
  labels = [_row_label(p, n, 36, max(1, (h * scale) // 14 - 2)) for p, n in zip(prompts, counts)]  # ~14 px a line
  grid = save_grid(images.reshape((len(prompts), per_prompt) + images.shape[1:]),
                   os.path.join(out_dir, "prompts_grid.png"), row_labels=labels, scale=scale, label_width=230)
  npz = os.path.join(out_dir, "prompts_samples.npz")
  np.savez(npz + ".tmp.npz", arr_0=images, arr_1=np.repeat(np.arange(len(prompts)), per_prompt).astype(np.int32),
           prompts=np.asarray(prompts))
  os.replace(npz + ".tmp.npz", npz)
  meta = {"checkpoint": os.path.abspath(checkpoint_dir), "step": int(step), "seed": int(seed),
          "per_prompt": int(per_prompt), "prompts": prompts, "tokens": counts, "sample_kwargs": sample_kwargs,
          "grid": grid, "samples": npz}
  with open(os.path.join(out_dir, "prompts.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2, ensure_ascii=False)
  log.info("wrote %d samples of %d prompts to %s", len(images), len(prompts), out_dir)
  return grid


def caption_conditions(config, num: int):
  """(caption ids (num,) int32, ids -> contexts (n, L, D) float32) for `evaluate`: `num` captions drawn at random
  (seed config.eval.caption_seed; without replacement while num <= all captions) from the COCO caption cache of
  the validation split at config.eval.captions_cache. Caption id = record index x captions_per_image + k."""
  from himar_jax.data.coco import check_caption_cache
  from himar_jax.data.latent_pipeline import LatentCacheSource

  _check_t2i(config)
  cache_dir = config.eval.get("captions_cache", "")
  if not cache_dir:
    raise ValueError("config.eval.captions_cache is empty; set it to a COCO caption cache of the validation split "
                     "(`cache-latents --config=configs/himar_t2i.py:<variant> --config.cache.split=val "
                     "--config.cache.dir=DIR`).")
  source = LatentCacheSource(cache_dir)
  check_caption_cache(source.metadata, context_length=config.model.context_length,
                      context_dim=config.model.context_dim, where=cache_dir)
  per = int(source.metadata["captions_per_image"])
  total = len(source) * per
  rng = np.random.default_rng(int(config.eval.get("caption_seed", 0)))
  ids = rng.choice(total, size=num, replace=num > total).astype(np.int32)

  def conditions(chunk_ids):
    return np.stack([source[int(i) // per]["context"][int(i) % per] for i in chunk_ids]).astype(np.float32)

  return ids, conditions
