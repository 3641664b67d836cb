"""The shipped Fashion-MNIST classifier: accuracy on the real test split, centre-crop input, weights round trip."""
from __future__ import annotations

import os

import numpy as np
import pytest

from himar_jax.data import fashion_mnist
from himar_jax.evaluation import fmnist_classifier as fc


@pytest.fixture(scope="module")
def classifier():
  return fc.Classifier()


def test_shipped_weights_are_small_and_documented():
  assert os.path.getsize(fc.WEIGHTS_PATH) < 2 * 1024 * 1024
  info = fc.weights_info()
  assert info["feature_extractor"] == fc.FEATURE_EXTRACTOR
  assert "--train" in info["command"] and info["test_accuracy"] >= 0.90


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEFAULT_PATH), reason="Fashion-MNIST is not installed")
def test_shipped_weights_reach_90_percent_on_the_test_split(classifier):
  images, labels = fashion_mnist.load(fashion_mnist.DEFAULT_PATH, "test")
  logits, features = classifier(images)
  assert logits.shape == (10000, 10) and features.shape == (10000, fc.FEATURE_DIM)
  acc = fc.accuracy(logits, labels)
  assert acc >= 0.90
  assert acc == pytest.approx(fc.weights_info()["test_accuracy"], abs=1e-3)  # what the training run measured


def test_padded_32x32_images_are_centre_cropped(classifier, fake_fashion_mnist):
  images, _ = fashion_mnist.load(fake_fashion_mnist, "test")
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]  # as the trainer centres 28x28 on 32x32
  np.testing.assert_array_equal(fc.preprocess(padded), fc.preprocess(images))
  np.testing.assert_allclose(classifier(padded)[0], classifier(images)[0], rtol=1e-6, atol=1e-6)
  x = fc.preprocess(images[:1])
  assert x.min() >= -1.0 and x.max() <= 1.0 and x[0, 0, 0, 0] == pytest.approx(images[0, 0, 0] / 127.5 - 1.0)


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match="grey"):
    fc.preprocess(np.zeros((2, 28, 28, 3), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    fc.preprocess(np.zeros((2, 28, 28), np.float32))
  with pytest.raises(ValueError, match=r"H, W >= 28.*\(2, 16, 16\)"):
    fc.preprocess(np.zeros((2, 16, 16), np.uint8))
  with pytest.raises(FileNotFoundError, match="--train"):
    fc.load("/nonexistent/weights.npz")


def test_training_learns_and_weights_round_trip(fake_fashion_mnist, tmp_path):
  images, labels = fashion_mnist.load(fake_fashion_mnist, "train")
  model = fc.train(images, labels, epochs=3, batch_size=50, lr=3e-3)
  test_images, test_labels = fashion_mnist.load(fake_fashion_mnist, "test")
  logits, _ = fc.Classifier(model)(test_images)
  assert fc.accuracy(logits, test_labels) >= 0.5  # 10 stripe classes: chance is 0.1
  path = fc.save_weights(model, str(tmp_path / "w.npz"), {"test_accuracy": 0.0})
  np.testing.assert_array_equal(fc.Classifier(fc.load(path))(test_images)[0], logits)
  np.savez(tmp_path / "bad.npz", conv1=np.zeros(3))
  with pytest.raises(ValueError, match="does not hold FashionCNN weights"):
    fc.load(str(tmp_path / "bad.npz"))
