"""MS-COCO captions: the folder source (order, five captions, ADM crop), `cache-latents` with caption contexts
(tiny random VAE + tiny random CLIP), and the training pipeline drawing one caption per example."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from coco_tiny import CAPTIONS, CLIP_FIXTURE, cached_coco, tiny_config
from himar_jax.data import coco
from himar_jax.data import latent_cache as lc
from himar_jax.data import latent_pipeline as lp
from himar_jax.data.images import center_crop_adm
from himar_jax.text.clip import TextEmbedder


@pytest.fixture(scope="module")
def cached():
  return cached_coco()


def test_source_orders_by_id_and_keeps_five_captions(cached):
  source = coco.CocoCaptionsSource(cached["root"], "train", 16)
  assert source.image_ids == sorted(CAPTIONS) and len(source) == 4
  for i, image_id in enumerate(source.image_ids):
    caps = CAPTIONS[image_id]
    # annotation ids decrease in file order here, so "first by annotation id" = the last ones written
    want = [" ".join(c.split()) for c in caps[::-1]]
    assert source.captions[i] == [want[k % len(want)] for k in range(5)]
    image, label = source[i]
    with Image.open(source.files[i]) as im:
      np.testing.assert_array_equal(image, center_crop_adm(im.convert("RGB"), 16))
    assert label == image_id and image.shape == (16, 16, 3)


def test_cache_holds_caption_contexts_and_empty_caption(cached):
  meta, d = cached["meta"], cached["dir"]
  assert meta["complete"] and meta["count"] == 4 and meta["captions_per_image"] == 5
  fields = {f["name"]: tuple(f["shape"]) for f in meta["fields"]}
  assert fields["context"] == (5, 77, 32) and fields["moments"] == (8, 8, 8)
  source = coco.CocoCaptionsSource(cached["root"], "train", 16)
  embedder = TextEmbedder.from_dir(CLIP_FIXTURE, batch_size=8)
  cache = lp.LatentCacheSource(d, tokenizer_dir=cached["config"].tokenizer.checkpoint)
  for i in (0, 3):
    rec = cache[i]
    want, _ = embedder(source.captions[i])
    np.testing.assert_allclose(rec["context"], want, rtol=1e-5, atol=1e-5)
    assert rec["label"] == source.image_ids[i]
  empty = coco.read_empty_context(d)
  np.testing.assert_allclose(empty, embedder([""])[0][0], rtol=1e-5, atol=1e-5)
  assert meta["text_encoder"]["context_length"] == 77 and len(meta["text_encoder"]["empty_context_sha256"]) == 64
  assert coco.read_captions(d)["captions"] == source.captions
  # The text-encoder entries are part of the layout: a cache of another width is refused.
  other = dict(meta["text_encoder"], width=64)
  with pytest.raises(lc.CacheError, match="another layout"):
    lc.write_cache(source, cached["vae"], "kl_vae", directory=d, tokenizer_identity=meta["tokenizer"], image_size=16,
                   pivot_size=8, shard_size=4, batch_size=8, progress=False, extra_metadata={"text_encoder": other})


def test_train_batches_draw_one_caption_per_example(cached):
  it = coco.make_train_iterator(cached["config"])
  cache = lp.LatentCacheSource(cached["dir"])
  seen = set()
  for _ in range(4):
    batch = next(it)
    assert batch["latent"].shape == (8, 8, 8, 4) and batch["latent_small"].shape == (8, 4, 4, 4)
    assert batch["context"].shape == (8, 77, 32) and batch["context"].dtype == np.float32
    for row in range(8):
      rec = cache[int(batch["index"][row])]
      np.testing.assert_array_equal(batch["context"][row], rec["context"][batch["caption"][row]])
      seen.add(int(batch["caption"][row]))
  assert len(seen) >= 3  # captions vary from step to step


def test_bad_inputs_name_the_fix(cached, tmp_path):
  with pytest.raises(FileNotFoundError, match="captions_val2014.json not found"):
    coco.CocoCaptionsSource(cached["root"], "val")
  os.makedirs(tmp_path / "annotations")
  with open(tmp_path / "annotations" / "captions_train2014.json", "w") as f:
    json.dump({"images": [], "annotations": []}, f)
  with pytest.raises(FileNotFoundError, match="image folder"):
    coco.CocoCaptionsSource(str(tmp_path), "train")
  config = tiny_config(cached["root"], cached["dir"], cached["config"].tokenizer.checkpoint)
  config.model.context_dim = 64
  with pytest.raises(lc.CacheError, match=r"\(77, 64\)"):
    coco.make_train_iterator(config)
  config.text.clip = ""
  with pytest.raises(ValueError, match="config.text.clip is empty"):
    coco.load_text_embedder(config)
