"""The evaluate path end to end on a tiny trained model and the fake Fashion-MNIST: chunks, resume, ADM batch,
classifier metrics, CLU log, JSON summary; the Inception scoring path on a random-weight Inception."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from configs.quickstart import get_config
from himar_jax.data import fashion_mnist
from himar_jax.evaluation import evaluate as ev
from himar_jax.evaluation import fmnist_classifier as fc
from himar_jax.evaluation import metrics
from himar_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(fake_fashion_mnist, tmp_path_factory):
  config = get_config("tiny")
  config.data.path = fake_fashion_mnist
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  loop.train(config, workdir)
  return config, loop.checkpoint_dir(workdir)


def _chunks(out):
  return sorted(glob.glob(os.path.join(out, "chunks", "chunk_*.npz")))


def test_evaluate_end_to_end_with_resume(trained, fake_fashion_mnist, tmp_path):
  config, ckpt = trained
  out = str(tmp_path / "eval")
  summary = ev.evaluate(config, ckpt, out, num=20, chunk_size=8, progress=False)
  assert [os.path.basename(p) for p in _chunks(out)] == ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"]
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert summary["step"] == config.train.num_steps and summary["num_samples"] == 20

  # ADM sample batch: uint8 NHWC, class-balanced labels i mod 10
  with np.load(summary["sample_batch"]) as f:
    images, labels = f["arr_0"], f["arr_1"]
  assert images.shape == (20, 32, 32, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(20) % 10)

  # the metrics are those of the stored batch against the test split
  clf = fc.Classifier()
  logits, feats = clf(images)
  ref_logits, ref_feats = clf(fashion_mnist.load(fake_fashion_mnist, "test")[0])
  m = summary["metrics"]
  assert m["fmnist_fd"] == pytest.approx(metrics.frechet_distance(metrics.Statistics.of(feats),
                                                                  metrics.Statistics.of(ref_feats)), rel=1e-9)
  assert m["class_accuracy"] == fc.accuracy(logits, labels)
  assert m["fmnist_is"] == pytest.approx(metrics.inception_score(metrics.softmax(logits)), rel=1e-9)
  assert (m["precision"], m["recall"]) == pytest.approx(metrics.precision_recall(ref_feats, feats), abs=1e-12)
  assert 1.0 <= m["fmnist_is"] <= 10.0 and m["fmnist_fd"] > 0
  assert glob.glob(os.path.join(out, "events.out.tfevents.*"))  # CLU's TensorBoard log

  # resume: a missing and a corrupt chunk are regenerated identically, the intact one is not touched
  chunk0, chunk1, chunk2 = _chunks(out)
  before = [dict(np.load(p)) for p in (chunk1, chunk2)]
  mtime0 = os.stat(chunk0).st_mtime_ns
  os.remove(chunk1)
  with open(chunk2, "wb") as f:
    f.write(b"truncated")
  again = ev.evaluate(config, ckpt, out, num=20, chunk_size=8, progress=False)
  assert os.stat(chunk0).st_mtime_ns == mtime0
  for path, old in zip((chunk1, chunk2), before):
    new = np.load(path)
    for key in ("images", "labels", "indices", "seed"):
      np.testing.assert_array_equal(new[key], old[key])
  assert again["metrics"] == summary["metrics"]

  # chunks from another run setting are refused, naming the manifest
  other = get_config("tiny")
  other.data.path = fake_fashion_mnist
  other.sample.seed = 5
  with pytest.raises(ValueError, match="manifest.json.*seed"):
    ev.evaluate(other, ckpt, out, num=20, chunk_size=8, progress=False)


def test_evaluate_verb_defaults_and_errors(trained, tmp_path):
  config, ckpt = trained
  flags = types.SimpleNamespace(config=config, checkpoint=None, workdir=os.path.dirname(ckpt), out=None, num=10,
                                ref=None, inception_weights=None)
  assert ev.evaluate_verb(flags) == 0
  with open(os.path.join(os.path.dirname(ckpt), "eval", "metrics.json")) as f:
    assert json.load(f)["num_samples"] == 10
  # a non-Fashion-MNIST config is scored with Inception: missing weights / reference stop before any sampling
  other = config.copy_and_resolve_references()
  other.data.source = "imagenet"
  out = str(tmp_path / "inception_eval")
  with pytest.MonkeyPatch.context() as mp:
    mp.delenv("HIMAR_JAX_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="HIMAR_JAX_INCEPTION_WEIGHTS"):
      ev.evaluate(other, ckpt, out, num=10, progress=False)
  weights = tmp_path / "w.pth"
  weights.write_bytes(b"")
  with pytest.raises(ValueError, match="--ref"):
    ev.evaluate(other, ckpt, out, num=10, inception_weights=str(weights), progress=False)
  assert not os.path.exists(out)
  # through the CLI: the verb is registered and its flags exist; a missing checkpoint is named
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-m", "himar_jax", "evaluate", "--config=configs/quickstart.py:tiny",
                        f"--checkpoint={tmp_path}/nothing", "--num=10"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode != 0 and "nothing' does not exist" in run.stderr, run.stderr[-2000:]


def test_class_balanced_labels():
  labels = ev.class_balanced_labels(25, 10)
  assert np.bincount(labels).tolist() == [3] * 5 + [2] * 5


class _FakeInception:
  """Stands in for InceptionFeatures: deterministic features of the pixels (the real network is tested in
  test_inception.py; this checks the scoring path's wiring and the reference handling)."""

  def __call__(self, images, progress=False):
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    rng = np.random.default_rng(0)
    pool = x @ rng.standard_normal((x.shape[1], 16)) * 0.1   # small dimensions keep sqrtm cheap
    spatial = x @ rng.standard_normal((x.shape[1], 12)) * 0.1
    return {"pool": pool, "spatial": spatial, "logits": pool[:, :10]}


def test_inception_scoring_against_an_adm_reference(tmp_path):
  rng = np.random.default_rng(1)
  ref_images = rng.integers(0, 256, (40, 8, 8, 3)).astype(np.uint8)
  samples = rng.integers(0, 256, (30, 8, 8, 3)).astype(np.uint8)
  fake = _FakeInception()
  ref_path = str(tmp_path / "ref.npz")
  np.savez(ref_path, arr_0=ref_images)   # ADM-format reference without precomputed statistics
  scores = ev.score_inception(samples, ref=ref_path, weights=None, out_dir=str(tmp_path), extractor=fake)
  acts, ref_acts = fake(samples), fake(ref_images)
  assert scores["fid"] == pytest.approx(metrics.frechet_distance(metrics.Statistics.of(acts["pool"]),
                                                                 metrics.Statistics.of(ref_acts["pool"])), rel=1e-9)
  assert scores["sfid"] == pytest.approx(metrics.frechet_distance(
      metrics.Statistics.of(acts["spatial"]), metrics.Statistics.of(ref_acts["spatial"])), rel=1e-9)
  assert scores["inception_score"] == pytest.approx(metrics.inception_score(metrics.softmax(acts["logits"])))
  assert glob.glob(str(tmp_path / "ref_acts_ref.npz_*.npz"))  # reference activations cached for the next run
  with pytest.raises(ValueError, match="8x8 images but the samples are 16x16"):
    ev.score_inception(np.zeros((4, 16, 16, 3), np.uint8), ref=ref_path, weights=None, out_dir=str(tmp_path),
                       extractor=fake)
  with pytest.raises(ValueError, match="--ref"):
    ev.score_inception(samples, ref=None, weights=None, out_dir=str(tmp_path), extractor=fake)


def test_reference_from_sources(fake_fashion_mnist, tmp_path):
  path = ev.make_reference(f"fashion_mnist:test:{fake_fashion_mnist}", str(tmp_path / "fm.npz"), features="fmnist")
  ref = metrics.read_reference(path, feature_dim=fc.FEATURE_DIM)
  test_images = fashion_mnist.load(fake_fashion_mnist, "test")[0]
  _, feats = fc.Classifier()(test_images)
  assert ref.feature_extractor == fc.FEATURE_EXTRACTOR and ref.images.shape == (50, 28, 28, 1)
  np.testing.assert_allclose(ref.stats.mu, feats.mean(0), rtol=1e-12)
  # scoring against the written reference equals scoring against the split itself
  samples = np.pad(test_images[:20], ((0, 0), (2, 2), (2, 2)))[..., None]
  labels = np.arange(20) % 10
  a = ev.score_fashion_mnist(samples, labels, ref=path, data_path=fake_fashion_mnist)
  b = ev.score_fashion_mnist(samples, labels, ref=None, data_path=fake_fashion_mnist)
  assert a == pytest.approx(b, rel=1e-9)
  padded = ev.load_image_source(f"fashion_mnist:test:{fake_fashion_mnist}", image_size=32, limit=3)
  np.testing.assert_array_equal(padded[:, 2:30, 2:30, 0], test_images[:3])
  # a folder: ADM's centre crop keeps the middle of a wide image
  from PIL import Image
  folder = tmp_path / "images"
  folder.mkdir()
  wide = np.zeros((32, 64, 3), np.uint8)
  wide[:, :16] = (255, 0, 0)
  wide[:, 16:48] = (0, 255, 0)
  wide[:, 48:] = (0, 0, 255)
  Image.fromarray(wide).save(folder / "a.png")
  images = ev.load_image_source(str(folder), image_size=16)
  assert images.shape == (1, 16, 16, 3)
  assert np.all(np.abs(images[0].astype(int) - (0, 255, 0)) <= 2)
  with pytest.raises(FileNotFoundError, match="neither fashion_mnist"):
    ev.load_image_source(str(tmp_path / "nowhere"), image_size=16)
