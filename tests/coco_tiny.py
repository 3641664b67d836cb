"""A tiny synthetic MS-COCO folder, a tiny random KL VAE and the tiny random CLIP fixture, for the text-to-image
tests (tests/test_coco.py, tests/test_himar_t2i.py)."""
from __future__ import annotations

import json
import os

import numpy as np

CLIP_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "clip_text")
# image id -> captions (one image has 6 captions: the first 5 by annotation id are kept; one has 3: cycled)
CAPTIONS = {
    42: ["A red square on a blue wall.", "a RED box", "red thing, blue background", "square!", "a  red   square"],
    7: ["two dogs playing in the park", "dogs", "a dog and another dog", "puppies at play", "dogs running",
        "a sixth caption that is dropped"],
    99: ["a cat sitting on a laptop keyboard", "cat", "a laptop"],
    13: ["people standing at a train station", "a train", "commuters", "a platform", "people waiting"],
}
SIZES = {42: (24, 20), 7: (20, 30), 99: (18, 18), 13: (40, 26)}  # (width, height); JPEG for odd ids


def write_coco(root: str, split: str = "train", seed: int = 0) -> str:
  from PIL import Image
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, f"{split}2014"), exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  images, anns, ann_id = [], [], 1000
  for image_id, caps in CAPTIONS.items():
    w, h = SIZES[image_id]
    name = f"COCO_{split}2014_{image_id:012d}." + ("jpg" if image_id % 2 else "png")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, f"{split}2014", name))
    images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    for cap in caps:
      anns.append({"id": ann_id, "image_id": image_id, "caption": cap})
      ann_id -= 7  # annotation ids not in file order
  with open(os.path.join(root, "annotations", f"captions_{split}2014.json"), "w") as f:
    json.dump({"images": images, "annotations": anns[::-1]}, f)
  return root


def tiny_vae(directory: str, seed: int = 0):
  """A random RGB KL VAE (stride 2, 4 channels) saved as a tokenizer directory."""
  from himar_jax import tokenizers
  from himar_jax.convert import tokenizers as conv
  kind, cfg = tokenizers.preset("kl_tiny")
  model = tokenizers.build(kind, cfg, host_init=True, seed=seed)
  conv.save_tokenizer(model, kind, directory)
  return model


def tiny_config(root: str, cache_dir: str, vae_dir: str):
  from configs import himar_t2i
  c = himar_t2i.get_config("himar_t2i_tiny")
  c.cache.path, c.cache.dir = root, cache_dir
  c.text.clip = CLIP_FIXTURE
  c.tokenizer.checkpoint = vae_dir
  c.data.cache_dir = cache_dir
  return c


_CACHED: dict = {}


def cached_coco() -> dict:
  """One tiny COCO folder, VAE and caption cache per test process (tests only read them)."""
  if not _CACHED:
    import atexit
    import shutil
    import tempfile

    from himar_jax.data import latent_cache as lc
    tmp = tempfile.mkdtemp(prefix="himar_t2i_coco_")
    atexit.register(shutil.rmtree, tmp, True)
    root = write_coco(os.path.join(tmp, "coco"))
    vae = tiny_vae(os.path.join(tmp, "vae"))
    config = tiny_config(root, os.path.join(tmp, "cache"), os.path.join(tmp, "vae"))
    meta = lc.cache_latents(config)
    _CACHED.update(tmp=tmp, root=root, vae=vae, config=config, meta=meta, dir=os.path.join(tmp, "cache"))
  return dict(_CACHED, config=_CACHED["config"].copy_and_resolve_references())
