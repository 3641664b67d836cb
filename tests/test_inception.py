"""FID Inception: parity with pytorch-fid's InceptionV3 at seeded random weights, the weight import (keys, shapes,
.pth file), TF1's legacy resize, and input checks."""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from himar_jax.evaluation import inception

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
sys.path.insert(0, FIXTURES)
from make_inception import synthetic_state_dict  # noqa: E402

DIR = os.path.join(FIXTURES, "inception")


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def state_dict():
  with open(os.path.join(DIR, "keys.json")) as f:
    return synthetic_state_dict(json.load(f))


@pytest.fixture(scope="module")
def model(state_dict):
  return inception.load_state_dict(nnx.eval_shape(lambda: inception.FIDInception(rngs=nnx.Rngs(0))), state_dict)


def test_matches_pytorch_fid(model):
  ref = np.load(os.path.join(DIR, "pytorch_fid.npz"))
  features = inception.InceptionFeatures(model, batch_size=2, mode="pytorch_fid", devices=jax.devices()[:1])
  out = features(ref["images"])
  assert out["pool"].shape == (2, inception.POOL_DIM) and out["pool"].dtype == np.float64
  assert _rel(out["pool"], ref["pool"]) <= 1e-4
  assert out["spatial"].shape == (2, inception.SPATIAL_DIM)
  spatial7 = ref["spatial"][..., :inception.SPATIAL_CHANNELS].reshape(2, -1)  # NHWC flattening, as ADM
  assert _rel(out["spatial"], spatial7) <= 1e-4
  assert _rel(out["logits"], ref["logits"]) <= 1e-4
  # the whole mixed_6/conv map, through the module directly
  x = inception.preprocess(ref["images"], "pytorch_fid")
  full = jax.jit(lambda x: model(x, spatial_channels=192)["spatial"])(x)
  assert full.shape == (2, 17, 17, 192) and _rel(full, ref["spatial"]) <= 1e-4


def test_tf_legacy_resize_matches_tensorflow():
  ref = np.load(os.path.join(DIR, "resize.npz"))
  for name, src, shape in (("tf_small", "small", (31, 29)), ("tf_299", "tiny", (299, 299))):
    x = ref[src][0, ..., 0].astype(np.float64)
    got = inception.resize_matrix(x.shape[0], shape[0], "tf") @ x @ inception.resize_matrix(x.shape[1], shape[1],
                                                                                             "tf").T
    np.testing.assert_allclose(got, ref[name][0, ..., 0], rtol=1e-5, atol=1e-3)
  x = ref["small"][0, ..., 0].astype(np.float64)
  got = inception.resize_matrix(13, 31, "pytorch_fid") @ x @ inception.resize_matrix(17, 29, "pytorch_fid").T
  np.testing.assert_allclose(got, ref["torch_small"][0, ..., 0], rtol=1e-5, atol=1e-3)


def test_preprocess_ranges_and_grey():
  images = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1) * np.ones((1, 299, 1, 1), np.uint8)
  tf_out = np.asarray(inception.preprocess(images, "tf"))
  assert tf_out.shape == (1, 299, 299, 3)  # grey repeated to RGB, already 299 tall: rows untouched
  np.testing.assert_allclose(tf_out[0, 0, 0], [-1.0] * 3)
  pt_out = np.asarray(inception.preprocess(images.astype(np.uint8), "pytorch_fid"))
  np.testing.assert_allclose(pt_out[0, 0, 0], [-1.0] * 3, atol=1e-6)
  with pytest.raises(ValueError, match="preprocess mode 'bicubic'"):
    inception.resize_matrix(3, 4, "bicubic")


def test_load_from_pth_file_and_mismatches(tmp_path, state_dict):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / inception.WEIGHTS_FILE)
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path)
  model = inception.load_pytorch_fid(path)
  np.testing.assert_array_equal(np.asarray(model.Mixed_7c.branch_pool.conv.kernel.get_value()),
                                np.transpose(state_dict["Mixed_7c.branch_pool.conv.weight"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(np.asarray(model.Mixed_6d.branch1x1.bn.var.get_value()),
                                state_dict["Mixed_6d.branch1x1.bn.running_var"])
  bad = dict(state_dict)
  bad["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
  with pytest.raises(inception.WeightsMismatchError, match="Mixed_5b.branch1x1.conv.weight"):
    inception.load_state_dict(nnx.eval_shape(lambda: inception.FIDInception(rngs=nnx.Rngs(0))), bad)
  partial = {k: v for k, v in state_dict.items() if not k.startswith("Mixed_7c")}
  with pytest.raises(inception.WeightsMismatchError, match="missing"):
    inception.load_state_dict(nnx.eval_shape(lambda: inception.FIDInception(rngs=nnx.Rngs(0))), partial)


def test_missing_weights_and_bad_images(monkeypatch, tmp_path):
  monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
  with pytest.raises(FileNotFoundError, match="HIMAR_JAX_INCEPTION_WEIGHTS"):
    inception.load_pytorch_fid(None)
  with pytest.raises(FileNotFoundError, match="do not exist"):
    inception.load_pytorch_fid(str(tmp_path / "nope.pth"))
  with pytest.raises(ValueError, match="uint8"):
    inception.check_images(np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"NHWC.*\(2, 3, 8, 8\)"):
    inception.check_images(np.zeros((2, 3, 8, 8), np.uint8))
