import numpy as np
import pytest

from himar_jax import data
from himar_jax.data import fashion_mnist
from himar_jax.data.pipeline import ArraySource, make_iterator
from conftest import write_idx


def test_reads_idx_gz_and_raw(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
  write_idx(tmp_path / "a", images, compress=True)
  write_idx(tmp_path / "b", images, compress=False)
  np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / "a.gz")), images)
  np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / "b")), images)


def test_truncated_idx_names_file(tmp_path):
  write_idx(tmp_path / "t", np.zeros((4, 28, 28)), compress=False)
  raw = (tmp_path / "t").read_bytes()
  (tmp_path / "t").write_bytes(raw[:-10])
  with pytest.raises(ValueError, match=r"truncated or corrupt.*dataset-fashion-mnist"):
    fashion_mnist.read_idx(str(tmp_path / "t"))


def test_missing_dataset_names_path_and_install_command(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError) as err:
    fashion_mnist.load(missing)
  assert missing in str(err.value) and "apt-get install -y dataset-fashion-mnist" in str(err.value)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    fashion_mnist.load(str(tmp_path / "empty"))


def test_load_fake_dataset(fake_fashion_mnist):
  images, labels = fashion_mnist.load(fake_fashion_mnist, "train")
  assert images.shape == (200, 28, 28) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(200) % 10)


def _source(n=40):
  return ArraySource({"x": np.arange(n), "y": np.arange(n) * 2})


def test_per_host_shards_are_disjoint_and_cover_the_data():
  seen = []
  for p in range(4):
    it = make_iterator(_source(), global_batch_size=8, seed=1, process_index=p, process_count=4)
    batches = [next(it) for _ in range(5)]  # one epoch of the 10 records of this host
    xs = np.concatenate([b["x"] for b in batches])
    assert sorted(xs) == list(range(p, 40, 4))
    seen.extend(xs)
  assert sorted(seen) == list(range(40))


def test_iterator_is_deterministic_and_reshuffles_each_epoch():
  a = make_iterator(_source(), global_batch_size=8, seed=3, process_index=0, process_count=1)
  b = make_iterator(_source(), global_batch_size=8, seed=3, process_index=0, process_count=1)
  epoch1 = np.concatenate([next(a)["x"] for _ in range(5)])
  epoch2 = np.concatenate([next(a)["x"] for _ in range(5)])
  np.testing.assert_array_equal(epoch1, np.concatenate([next(b)["x"] for _ in range(5)]))
  assert sorted(epoch1) == sorted(epoch2) == list(range(40)) and not np.array_equal(epoch1, epoch2)


def test_iterator_state_restores_the_stream():
  a = make_iterator(_source(), global_batch_size=4, seed=0, transform=lambda r, rng: dict(r, u=rng.random()),
                    process_index=0, process_count=1)
  for _ in range(7):
    next(a)
  state = a.get_state()
  expected = [next(a) for _ in range(3)]
  b = make_iterator(_source(), global_batch_size=4, seed=0, transform=lambda r, rng: dict(r, u=rng.random()),
                    process_index=0, process_count=1)
  b.set_state(state)
  for want in expected:
    got = next(b)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_batch_size_must_divide_over_processes():
  with pytest.raises(ValueError, match="global_batch_size=10 must be a positive multiple of the process count 4"):
    make_iterator(_source(), global_batch_size=10, seed=0, process_index=0, process_count=4)


def test_image_transform_pads_scales_and_flips():
  record = {"image": np.tile(np.arange(28, dtype=np.uint8), (28, 1)) * 9, "label": 3}
  out = data.image_transform(32, random_flip=False)(record, np.random.default_rng(0))
  assert out["image"].shape == (32, 32, 1) and out["label"] == 3
  assert out["image"][0, 0, 0] == -1.0  # padding is background
  np.testing.assert_allclose(out["image"][2:30, 2:30, 0], record["image"] / 127.5 - 1.0, rtol=1e-6)

  class AlwaysFlip:
    def random(self):
      return 0.0
  flipped = data.image_transform(32, random_flip=True)(record, AlwaysFlip())
  np.testing.assert_array_equal(flipped["image"], out["image"][:, ::-1])


def test_image_folder_training_source(tmp_path):
  from PIL import Image

  from configs.quickstart import get_config
  rng = np.random.default_rng(0)
  for c, name in enumerate(("cat", "ant")):  # classes are sorted by name: ant = 0, cat = 1
    (tmp_path / name).mkdir()
    for i in range(3):
      Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
  config = get_config("tiny")
  config.data.source, config.data.path, config.data.image_size = "image_folder", str(tmp_path), 32
  config.data.global_batch_size, config.data.random_flip = 4, False
  batch = next(data.make_train_iterator(config))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert set(batch["label"]) <= {0, 1}
  source = data.train_source(config)
  image, label = source[0]
  assert label == 0 and source.files[0].endswith("ant/0.png")
  config.data.path = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="data.path for training"):
    data.train_source(config)
