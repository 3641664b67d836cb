"""The 'token_cache' data source: a `cache-latents` cache of VQ-pyramid indices read by next-scale configs.
Batches equal the tokenizer's own per-scale indices (image or flip), a next-scale model's train_loss consumes them,
and caches of another layout / codebook / tokenizer or out-of-range indices stop with the values named."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.next_scale import get_config
from himar_jax import data, models, tokenizers
from himar_jax.convert import tokenizers as conv
from himar_jax.data import latent_cache as lc
from himar_jax.data import latent_pipeline as lp

N, SIZE = 6, 16
PN = (1, 2, 3, 4, 6, 8)  # tokenizers.tiny_config's layout, stride 2 -> 16 px


def _tokenizer(tmp, name, seed):
  kind, config = tokenizers.preset("vq_tiny")
  model = tokenizers.build(kind, config, host_init=True, seed=seed)
  return model, conv.save_tokenizer(model, kind, str(tmp / name))


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tok")
  model, tok_dir = _tokenizer(tmp, "tok", 0)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, 12, 12, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, N).astype(np.int32)
  source = lc.ArrayImageSource(images, labels, SIZE)
  one_device = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
  lc.write_cache(source, model, "vq_pyramid", directory=str(tmp / "cache"),
                 tokenizer_identity=lc.tokenizer_identity(tok_dir), image_size=SIZE, pivot_size=SIZE, shard_size=4,
                 batch_size=4, progress=False, mesh=one_device)
  # The records are the tokenizer's own indices of each image and its flip (tests/test_latent_cache.py checks
  # them against direct encodes); here the source must hand them out unchanged.
  records = lp.LatentCacheSource(str(tmp / "cache"))
  want = np.stack([records[i]["indices"] for i in range(N)])
  want_flip = np.stack([records[i]["indices_flip"] for i in range(N)])
  assert want.shape == (N, sum(p * p for p in PN)) and not np.array_equal(want, want_flip)
  return dict(dir=str(tmp / "cache"), tok_dir=tok_dir, tmp=tmp, labels=labels, want=want, want_flip=want_flip)


def _config(cache, kind="hmar"):
  c = get_config(f"{kind}_tiny")
  c.model.patch_nums, c.model.vocab_size, c.model.z_channels = PN, 64, 8
  c.model.mask_schedule = tuple((p * p,) for p in PN)
  c.model.tokenizer = cache["tok_dir"]  # a directory: the cache must come from this tokenizer
  c.data.cache_dir = cache["dir"]
  c.data.global_batch_size = 4
  return c


def test_batches_are_the_tokenizers_indices_of_image_or_flip(token_cache):
  config = _config(token_cache)
  it = data.make_train_iterator(config)
  seen = set()
  for _ in range(3):
    batch = next(it)
    assert batch["indices"].shape == (4, sum(p * p for p in PN)) and batch["indices"].dtype == np.int32
    for idx, label, i in zip(batch["indices"], batch["label"], batch["index"]):
      assert label == token_cache["labels"][i]
      flipped = np.array_equal(idx, token_cache["want_flip"][i])
      assert flipped or np.array_equal(idx, token_cache["want"][i])
      seen.add(flipped)
  assert seen == {False, True}  # random flips pick both records
  config.data.random_flip = False
  batch = next(data.make_train_iterator(config))
  np.testing.assert_array_equal(batch["indices"], token_cache["want"][batch["index"]])


def test_next_scale_train_loss_consumes_a_token_batch(token_cache):
  config = _config(token_cache, "var")
  batch = next(data.make_train_iterator(config))
  build = lambda: models.model_fn(config)(nnx.Rngs(0))
  nnx.eval_shape(build).check_indices(batch["indices"])  # shape (B, L) and codebook range, on the values
  # Traced, not compiled (the loss itself is tested in tests/test_next_scale.py): the batch fits train_loss.
  loss, metrics = jax.eval_shape(lambda b: build().train_loss(b, key=jax.random.key(0)), batch)
  assert loss.shape == () and loss.dtype == jnp.float32 and "acc" in metrics


def test_layout_codebook_and_tokenizer_mismatches_are_named(token_cache):
  config = _config(token_cache)
  config.model.patch_nums = (1, 2, 3, 4)
  with pytest.raises(lc.CacheError, match=r"patch_nums=\(1, 2, 3, 4, 6, 8\) \(L=130\) but "
                                          r"config.model.patch_nums=\(1, 2, 3, 4\) \(L=30\)"):
    data.make_train_iterator(config)
  config = _config(token_cache)
  config.model.vocab_size = 4096
  with pytest.raises(lc.CacheError, match="codebook of 64 entries but config.model.vocab_size=4096"):
    data.make_train_iterator(config)
  _, other = _tokenizer(token_cache["tmp"], "other", 1)
  config = _config(token_cache)
  config.model.tokenizer = other
  with pytest.raises(lc.CacheError, match="fingerprint"):
    data.make_train_iterator(config)
  config = _config(token_cache)
  config.data.cache_dir = ""
  with pytest.raises(ValueError, match="config.data.cache_dir is empty"):
    data.make_train_iterator(config)
  config = _config(token_cache)
  config.model.tokenizer = ""
  with pytest.raises(ValueError, match=f"config.model.tokenizer is empty.*tokenizer={token_cache['tok_dir']}"):
    data.make_train_iterator(config)
  config.train.init_from = "/some/stage1/checkpoints"  # its buffers hold the codebook
  assert next(data.make_train_iterator(config))["indices"].shape == (4, 130)


def test_kl_cache_is_refused_and_out_of_range_indices_raise(token_cache, tmp_path):
  meta = lc.read_metadata(token_cache["dir"])
  meta["tokenizer"] = dict(meta["tokenizer"], kind="kl_vae")
  with pytest.raises(lc.CacheError, match="holds kl_vae latents"):
    lp.check_token_cache(meta, patch_nums=PN, vocab_size=64, where="x")
  record = {"indices": np.array([0, 3, 70], np.int16), "indices_flip": np.array([0, 1, 2], np.int16),
            "label": 1, "index": 5}
  transform = lp.vq_transform(random_flip=False, vocab_size=64)
  with pytest.raises(lc.CacheError, match=r"record 5 has indices in \[0, 70\], outside the codebook range \[0, 64\)"):
    transform(record, np.random.default_rng(0))
  record["indices"] = np.array([0, -1, 2], np.int16)
  with pytest.raises(lc.CacheError, match=r"indices in \[-1, 2\]"):
    transform(record, np.random.default_rng(0))
  record["indices"] = np.array([0, 63, 2], np.int16)
  np.testing.assert_array_equal(transform(record, np.random.default_rng(0))["indices"], [0, 63, 2])
