"""MS-COCO 2014 captions for text-to-image Hi-MAR: the image + caption source, the caption-embedding part of the
latent cache, and the training pipeline over it.

Source (a local folder, the layout of cocodataset.org's downloads):
  ROOT/train2014/*.jpg, ROOT/val2014/*.jpg, ROOT/annotations/captions_train2014.json, captions_val2014.json
Images are ordered by COCO image id; each keeps its first `captions_per_image` (5) captions by annotation id (the
few images with fewer are cycled); ADM center crop to 256 (and, through the latent cache, the bicubic 128 pivot).

Cache (`python -m himar_jax cache-latents --config=configs/himar_t2i.py:himar_s_t2i --config.cache.dir=DIR
--config.cache.path=ROOT --config.text.clip=CLIP_DIR --config.tokenizer.checkpoint=KL16_DIR`): the records of
himar_jax/data/latent_cache.py (moments of the image and its pivot, both flips) plus
  context   (captions_per_image, 77, 768) CLIP ViT-L/14 last hidden states of the five captions (float16 by default)
and in the cache folder
  empty_context.npy  (77, 768) float32: the empty caption's states (rounded through the context dtype), the
                     unconditional input of classifier-free guidance (the model loads it as a buffer);
  captions.json      the caption strings per record, for evaluation and inspection.
Training batches (grain, per example): latent, latent_small (a posterior sample of the same flip, x scale), one
of the five caption contexts drawn per example and step (`context` (77, 768) float32, `caption` its number),
`label` (the COCO image id) and `index`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict

import numpy as np

from himar_jax.data.images import center_crop_adm

log = logging.getLogger(__name__)

CAPTIONS_PER_IMAGE = 5
EMPTY_CONTEXT = "empty_context.npy"
CAPTIONS_FILE = "captions.json"


class CocoCaptionsSource:
  """(uint8 (S, S, 3) ADM center crop, COCO image id) per image, and `captions[i]`: its caption strings."""

  def __init__(self, root: str, split: str = "train", image_size: int = 256, *,
               captions_per_image: int = CAPTIONS_PER_IMAGE, max_examples: int = 0):
    ann_path = os.path.join(root, "annotations", f"captions_{split}2014.json")
    image_dir = os.path.join(root, f"{split}2014")
    if not os.path.isfile(ann_path):
      raise FileNotFoundError(f"{ann_path} not found: point the COCO path (cache.path) at the folder holding "
                              f"annotations/captions_{{train,val}}2014.json and {{train,val}}2014/ (split={split!r}).")
    if not os.path.isdir(image_dir):
      raise FileNotFoundError(f"COCO image folder {image_dir} not found next to {ann_path}.")
    if captions_per_image < 1:
      raise ValueError(f"captions_per_image={captions_per_image} must be >= 1.")
    with open(ann_path, encoding="utf-8") as f:
      ann = json.load(f)
    by_image = defaultdict(list)
    for a in sorted(ann["annotations"], key=lambda a: a["id"]):
      by_image[a["image_id"]].append(" ".join(str(a["caption"]).split()))
    images = sorted((im for im in ann["images"] if by_image.get(im["id"])), key=lambda im: im["id"])
    if max_examples:
      images = images[:max_examples]
    if not images:
      raise ValueError(f"{ann_path} lists no image with captions.")
    short = sum(len(by_image[im["id"]]) < captions_per_image for im in images)
    if short:
      log.warning("%d of %d COCO images have fewer than %d captions; theirs are repeated", short, len(images),
                  captions_per_image)
    self.files = [os.path.join(image_dir, im["file_name"]) for im in images]
    self.image_ids = [int(im["id"]) for im in images]
    self.captions = [[by_image[im["id"]][k % len(by_image[im["id"]])] for k in range(captions_per_image)]
                     for im in images]
    self.image_size, self.captions_per_image, self.split = image_size, captions_per_image, split

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    from PIL import Image
    if not os.path.isfile(self.files[i]):
      raise FileNotFoundError(f"COCO image {self.files[i]} (id {self.image_ids[i]}) listed in the captions json "
                              "is missing; download the complete split.")
    with Image.open(self.files[i]) as im:
      return center_crop_adm(im.convert("RGB"), self.image_size), self.image_ids[i]


# ---- cache: caption embeddings next to the latents ---------------------------------------------------------------
def context_dtype(config) -> str:
  dtype = config.text.get("context_dtype", "float16")
  if dtype not in ("float16", "float32"):
    raise ValueError(f"config.text.context_dtype={dtype!r} must be 'float16' (half the disk) or 'float32'.")
  return dtype


def load_text_embedder(config):
  """The CLIP TextEmbedder of config.text (clip: a Hugging Face folder; dtype of its matmuls)."""
  import jax.numpy as jnp

  from himar_jax.text.clip import TextEmbedder
  path = config.text.get("clip", "")
  if not path:
    raise ValueError("config.text.clip is empty; set it to a download of openai/clip-vit-large-patch14 (vocab.json, "
                     "merges.txt, config.json, model.safetensors).")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.text.get("dtype", "float32")]
  return TextEmbedder.from_dir(path, dtype=dtype, batch_size=config.text.get("batch_size", 320))


def caption_cache_extras(config, source: CocoCaptionsSource, directory: str, embedder=None) -> dict:
  """write_cache's extra_fields / extra_values / extra_metadata for caption contexts; writes empty_context.npy and
  captions.json into `directory` (process 0)."""
  import jax

  from himar_jax.data.latent_cache import Field

  embedder = embedder or load_text_embedder(config)
  dtype = context_dtype(config)
  n, length, width = source.captions_per_image, embedder.context_length, embedder.width
  empty = embedder([""])[0][0].astype(dtype).astype(np.float32)
  fingerprint = hashlib.sha256(empty.tobytes()).hexdigest()
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, EMPTY_CONTEXT + ".tmp.npy"), empty)
    os.replace(os.path.join(directory, EMPTY_CONTEXT + ".tmp.npy"), os.path.join(directory, EMPTY_CONTEXT))
    with open(os.path.join(directory, CAPTIONS_FILE + ".tmp"), "w", encoding="utf-8") as f:
      json.dump({"split": source.split, "image_ids": source.image_ids, "captions": source.captions}, f)
    os.replace(os.path.join(directory, CAPTIONS_FILE + ".tmp"), os.path.join(directory, CAPTIONS_FILE))

  def values(indices):
    texts = [c for i in indices for c in source.captions[i]]
    hidden, _ = embedder(texts)
    return {"context": hidden.reshape(len(indices), n, length, width).astype(dtype)}

  meta = {"text_encoder": {"kind": "clip_text", "context_length": length, "width": width,
                           "empty_context_sha256": fingerprint},
          "captions_per_image": n}
  return {"extra_fields": (Field("context", (n, length, width), dtype),), "extra_values": values,
          "extra_metadata": meta}


def read_empty_context(cache_dir: str) -> np.ndarray:
  path = os.path.join(cache_dir, EMPTY_CONTEXT)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {cache_dir!r} is not a COCO caption cache (make one with "
                            "`cache-latents --config=configs/himar_t2i.py:...`), or set config.model.empty_context "
                            "to an empty-caption embedding .npy.")
  return np.load(path, allow_pickle=False).astype(np.float32)


def read_captions(cache_dir: str) -> dict:
  path = os.path.join(cache_dir, CAPTIONS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {cache_dir!r} is not a COCO caption cache.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def check_caption_cache(metadata: dict, *, context_length: int, context_dim: int, where: str) -> None:
  from himar_jax.data.latent_cache import CacheError
  fields = {f["name"]: tuple(f["shape"]) for f in metadata["fields"]}
  if "context" not in fields:
    raise CacheError(f"latent cache {where!r} has no caption contexts (fields {sorted(fields)}); build a COCO cache "
                     "with `cache-latents --config=configs/himar_t2i.py:<variant>`.")
  have = fields["context"][1:]
  if have != (context_length, context_dim):
    raise CacheError(f"caption contexts in {where!r} are {have} (tokens, width), the model expects "
                     f"({context_length}, {context_dim}) (config.model.context_length / context_dim); use the CLIP "
                     "encoder the model was configured for.")


# ---- training pipeline -------------------------------------------------------------------------------------------
def caption_transform(scale_factor: float, random_flip: bool):
  """record, rng -> the KL latents of latent_pipeline.kl_transform plus one of the record's caption contexts."""
  from himar_jax.data.latent_pipeline import kl_transform
  latents = kl_transform(scale_factor, random_flip)

  def transform(record: dict, rng: np.random.Generator) -> dict:
    out = latents(record, rng)
    k = int(rng.integers(record["context"].shape[0]))
    out["context"] = record["context"][k].astype(np.float32)
    out["caption"] = np.int32(k)
    return out

  return transform


def make_train_iterator(config):
  """Batches of a COCO caption cache (config.data.source == "coco_cache", config.data.cache_dir)."""
  from himar_jax.data.latent_pipeline import LatentCacheSource
  from himar_jax.data.pipeline import make_iterator

  cache_dir = config.data.get("cache_dir", "")
  if not cache_dir:
    raise ValueError("config.data.cache_dir is empty; set it to a COCO caption cache made by `cache-latents "
                     "--config=configs/himar_t2i.py:<variant>`.")
  tok = config.get("tokenizer", None)
  source = LatentCacheSource(cache_dir, tokenizer_dir=(tok.get("checkpoint", "") or None) if tok is not None else None)
  check_caption_cache(source.metadata, context_length=config.model.context_length,
                      context_dim=config.model.context_dim, where=cache_dir)
  return make_iterator(source, global_batch_size=config.data.global_batch_size, seed=config.data.shuffle_seed,
                       transform=caption_transform(source.scale_factor, config.data.random_flip),
                       num_workers=config.data.num_workers)
