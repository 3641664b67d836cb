"""Latent cache (ArrayRecord shards + metadata, resumable, verified) and the grain pipeline over it, on tiny
tokenizers: records equal direct encodes, resume rewrites only broken shards, mismatches stop with named files."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from himar_jax import tokenizers
from himar_jax.convert import tokenizers as conv
from himar_jax.data import latent_cache as lc
from himar_jax.data import latent_pipeline as lp
from himar_jax.tokenizers.resize import pivot_downsample

N, SIZE, PIVOT = 10, 16, 8


def _images(n=N, channels=1, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 12, 12, channels), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def _tokenizer(tmp_path, preset, seed=0, name="tok"):
  kind, config = tokenizers.preset(preset)
  model = tokenizers.build(kind, config, host_init=True, seed=seed)
  out = str(tmp_path / name)
  conv.save_tokenizer(model, kind, out)
  return model, kind, out


def _write(model, kind, tok_dir, cache_dir, source, **kw):
  return lc.write_cache(source, model, kind, directory=str(cache_dir), tokenizer_identity=lc.tokenizer_identity(tok_dir),
                        image_size=SIZE, pivot_size=PIVOT, shard_size=4, batch_size=8, progress=False, **kw)


@pytest.fixture(scope="module")
def kl_cache(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("kl")
  model, kind, tok_dir = _tokenizer(tmp, "kl_tiny_gray")
  images, labels = _images()
  source = lc.ArrayImageSource(images, labels, SIZE)
  meta = _write(model, kind, tok_dir, tmp / "cache", source)
  return dict(model=model, kind=kind, tok_dir=tok_dir, dir=tmp / "cache", source=source, meta=meta, tmp=tmp)


def test_kl_cache_records_equal_direct_encodes(kl_cache):
  meta, model, source = kl_cache["meta"], kl_cache["model"], kl_cache["source"]
  assert meta["complete"] and meta["count"] == N and meta["num_shards"] == 3
  assert meta["scale_factor"] == 1.0 and meta["tokenizer"]["kind"] == "kl_vae"
  cache = lp.LatentCacheSource(str(kl_cache["dir"]), tokenizer_dir=kl_cache["tok_dir"])
  assert len(cache) == N
  images = np.stack([source[i][0] for i in range(N)]).astype(np.float32) / 127.5 - 1
  x = jnp.asarray(images)
  want = nnx.jit(lambda m, x: {
      "moments": m.encode_moments(x), "moments_flip": m.encode_moments(x[:, :, ::-1]),
      "small_moments": m.encode_moments(pivot_downsample(x)),
      "small_moments_flip": m.encode_moments(pivot_downsample(x[:, :, ::-1]))})(model, x)
  for i in (0, 5, 9):
    rec = cache[i]
    assert rec["index"] == i and rec["label"] == source[i][1]
    assert rec["moments"].shape == (8, 8, 8) and rec["small_moments"].shape == (4, 4, 8)
    for name, value in want.items():
      np.testing.assert_allclose(rec[name], value[i], rtol=1e-4, atol=1e-5)


def test_resume_skips_verified_shards_and_rewrites_broken_ones(kl_cache, tmp_path):
  import shutil
  d = tmp_path / "cache"
  shutil.copytree(kl_cache["dir"], d)
  names = [lc.shard_name(k, 3) for k in range(3)]
  mtime0 = os.path.getmtime(d / names[0])
  os.remove(d / names[1].replace(".array_record", ".done.json"))   # interrupted before the marker
  with open(d / names[2], "r+b") as f:                               # corrupted after finishing
    f.truncate(10)
  with pytest.raises(lc.CacheError, match=r"shard-00001-of-00003.done.json is missing"):
    lp.LatentCacheSource(str(d))
  meta = _write(kl_cache["model"], kl_cache["kind"], kl_cache["tok_dir"], d, kl_cache["source"])
  assert meta["complete"]
  assert os.path.getmtime(d / names[0]) == mtime0
  for k in range(3):
    assert lc.verify_shard(str(d), k, 3, (4, 4, 2)[k]) is None
  a, b = lp.LatentCacheSource(str(d)), lp.LatentCacheSource(str(kl_cache["dir"]))
  np.testing.assert_array_equal(a[9]["moments"], b[9]["moments"])


def test_bad_caches_name_the_file(kl_cache, tmp_path):
  import shutil
  d = tmp_path / "cache"
  shutil.copytree(kl_cache["dir"], d)
  shard = d / lc.shard_name(1, 3)
  open(shard, "wb").close()  # empty shard
  with pytest.raises(lc.CacheError, match=r"shard-00001-of-00003.array_record has 0 bytes"):
    lp.LatentCacheSource(str(d))
  meta = json.loads((d / "metadata.json").read_text())
  meta["complete"] = False
  (d / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(lc.CacheError, match="incomplete"):
    lp.LatentCacheSource(str(d))
  with pytest.raises(FileNotFoundError, match="not a latent cache"):
    lp.LatentCacheSource(str(tmp_path / "nowhere"))
  with pytest.raises(lc.CacheError, match="bytes, the metadata's fields need"):
    lc.decode_record(b"\0" * 12, lp.LatentCacheSource(str(kl_cache["dir"])).fields)


def test_other_tokenizer_is_refused(kl_cache, tmp_path):
  other_model, kind, other_dir = _tokenizer(tmp_path, "kl_tiny_gray", seed=1, name="other")
  with pytest.raises(lc.CacheError, match="was made by tokenizer kl_vae with fingerprint"):
    lp.LatentCacheSource(str(kl_cache["dir"]), tokenizer_dir=other_dir)
  with pytest.raises(lc.CacheError, match="was made by tokenizer"):
    _write(other_model, kind, other_dir, kl_cache["dir"], kl_cache["source"])


def test_kl_transform_flip_pairs_and_posterior_sampling():
  mean = np.full((2, 2, 3), 1.0, np.float32)
  rec = {"moments": np.concatenate([mean, np.full_like(mean, np.log(0.25))], -1),
         "moments_flip": np.concatenate([-mean, np.full_like(mean, -40.0)], -1),
         "small_moments": np.concatenate([2 * mean[:1, :1], np.zeros((1, 1, 3), np.float32)], -1),
         "small_moments_flip": np.concatenate([-2 * mean[:1, :1], np.full((1, 1, 3), -40.0, np.float32)], -1),
         "label": np.int32(3), "index": np.int64(7)}
  t = lp.kl_transform(0.5)
  rng = np.random.default_rng(0)
  flips, unflipped = 0, []
  for _ in range(400):
    out = t(rec, rng)
    assert out["label"] == 3 and out["index"] == 7 and out["latent"].dtype == np.float32
    if np.allclose(out["latent"], -0.5, atol=1e-6):  # flipped: logvar -40 clamps to -30, sample = mean
      flips += 1
      np.testing.assert_allclose(out["latent_small"], -1.0, atol=1e-6)  # same flip at both resolutions
    else:
      unflipped.append((out["latent"] / 0.5, out["latent_small"] / 0.5))
  assert 150 < flips < 250
  big = np.stack([u[0] for u in unflipped])
  small = np.stack([u[1] for u in unflipped])
  assert abs(big.mean() - 1.0) < 0.05 and abs(big.std() - 0.5) < 0.05   # N(1, 0.25)
  assert abs(small.mean() - 2.0) < 0.1 and abs(small.std() - 1.0) < 0.1  # N(2, 1)
  no_flip = lp.kl_transform(1.0, random_flip=False)
  assert not any(np.allclose(no_flip(rec, rng)["latent"], -1.0, atol=1e-6) for _ in range(50))


def test_latent_iterator_batches_and_checkpoint_state(kl_cache):
  it = lp.make_latent_iterator(str(kl_cache["dir"]), global_batch_size=4, seed=0,
                               tokenizer_dir=kl_cache["tok_dir"])
  batch = next(it)
  assert batch["latent"].shape == (4, 8, 8, 4) and batch["latent_small"].shape == (4, 4, 4, 4)
  source = kl_cache["source"]
  np.testing.assert_array_equal(batch["label"], [source[int(i)][1] for i in batch["index"]])
  state = it.get_state()
  want = next(it)
  it2 = lp.make_latent_iterator(str(kl_cache["dir"]), global_batch_size=4, seed=0)
  it2.set_state(state)
  got = next(it2)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  # Per-host sharding: two processes see disjoint examples.
  seen = []
  for p in range(2):
    itp = lp.make_latent_iterator(str(kl_cache["dir"]), global_batch_size=4, seed=0, process_index=p,
                                  process_count=2)
    seen.append({int(i) for _ in range(3) for i in next(itp)["index"]})
  assert not seen[0] & seen[1]


def test_vq_cache_holds_per_scale_indices(tmp_path):
  model, kind, tok_dir = _tokenizer(tmp_path, "vq_tiny")
  images, labels = _images(n=5, channels=3, seed=2)
  source = lc.ArrayImageSource(images, labels, SIZE)
  one_device = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ("data",))  # the KL cache covers 8 devices
  meta = _write(model, kind, tok_dir, tmp_path / "cache", source, mesh=one_device)
  assert meta["complete"] and meta["pivot_size"] is None
  cache = lp.LatentCacheSource(str(tmp_path / "cache"))
  x = jnp.asarray(np.stack([source[i][0] for i in range(5)]).astype(np.float32) / 127.5 - 1)
  both = nnx.jit(lambda m, x: jnp.concatenate(m.img_to_indices(x), 1))(model, jnp.concatenate([x, x[:, :, ::-1]]))
  want, want_flip = np.asarray(both[:5]), np.asarray(both[5:])
  assert cache[0]["indices"].dtype == np.int16 and cache[0]["indices"].shape == (model.config.seq_len,)
  for i in range(5):
    np.testing.assert_array_equal(cache[i]["indices"], want[i])
    np.testing.assert_array_equal(cache[i]["indices_flip"], want_flip[i])
  batch = next(lp.make_latent_iterator(str(tmp_path / "cache"), global_batch_size=2, seed=0))
  assert batch["indices"].shape == (2, model.config.seq_len) and batch["indices"].dtype == np.int32
  with pytest.raises(ValueError, match="does not match the VQ layout"):
    lc.record_fields(kind, model.config, 32, 8)


def test_config_driven_convert_and_cache_latents(tmp_path):
  """The `convert` and `cache-latents` verbs on configs/kl_vae.py:tiny (random-weight tokenizer)."""
  import types

  from configs import kl_vae as kl_config  # noqa: PLC0415
  from himar_jax.data import fashion_mnist
  if not os.path.isdir(fashion_mnist.DEFAULT_PATH):
    pytest.skip(f"Fashion-MNIST not installed at {fashion_mnist.DEFAULT_PATH}")
  config = kl_config.get_config("tiny")
  config.convert.src = "random:3"
  config.cache.dir = str(tmp_path / "cache")
  config.cache.max_examples = 20
  config.cache.batch_size = 8
  assert conv.convert_verb(types.SimpleNamespace(config=config, workdir=str(tmp_path / "tok"))) == 0
  config.tokenizer.checkpoint = str(tmp_path / "tok")
  assert lc.cache_latents_verb(types.SimpleNamespace(config=config)) == 0
  cache = lp.LatentCacheSource(config.cache.dir, tokenizer_dir=config.tokenizer.checkpoint)
  assert len(cache) == 20 and cache[0]["moments"].shape == (8, 8, 8) and cache[0]["small_moments"].shape == (4, 4, 8)
  _, labels = fashion_mnist.load(fashion_mnist.DEFAULT_PATH, "train")
  assert [int(cache[i]["label"]) for i in range(20)] == labels[:20].tolist()
  config.tokenizer.arch.ch = 64  # a config naming another architecture than the checkpoint holds
  with pytest.raises(lc.CacheError, match="but config.tokenizer names"):
    lc.cache_latents(config)


def test_trainer_data_dispatch_reads_the_cache(kl_cache):
  """config.data.source == 'latent_cache' (configs/himar.py) makes the trainer's iterator the latent pipeline."""
  from himar_jax import config_lib, data
  config = config_lib.trainer_defaults()
  config.data.source = "latent_cache"
  config.data.cache_dir = str(kl_cache["dir"])
  config.data.global_batch_size = 4
  config_lib.validate(config)
  batch = next(data.make_train_iterator(config))
  assert set(batch) == {"latent", "latent_small", "label", "index"}
  assert batch["latent"].shape == (4, 8, 8, 4) and batch["latent_small"].shape == (4, 4, 4, 4)
  config.data.cache_dir = ""
  with pytest.raises(ValueError, match="config.data.cache_dir is empty"):
    data.make_train_iterator(config)
