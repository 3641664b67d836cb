"""resize.py against torch.nn.functional.interpolate (committed fixtures) and closed forms."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from himar_jax.tokenizers import resize

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers", "resize.npz")


def _cases():
  with np.load(FIXTURE) as f:
    names = sorted({k.split("/")[0] for k in f.files})
  return names


def _nchw_to_nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


@pytest.mark.parametrize("name", _cases())
def test_matches_torch_interpolate_fixture(name):
  method, size_in, size_out = name.split("_")
  with np.load(FIXTURE) as f:
    x, y = f[f"{name}/x"], f[f"{name}/y"]
  assert x.shape[-1] == int(size_in) and y.shape[-1] == int(size_out)
  got = resize.resize(jnp.asarray(_nchw_to_nhwc(x)), int(size_out), method)
  np.testing.assert_allclose(np.asarray(got), _nchw_to_nhwc(y), rtol=1e-5, atol=1e-5)


def test_fixture_covers_every_layout_pair_and_pivot():
  names = set(_cases())
  for pns in ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)):
    for size_in, size_out, method in resize.layout_resize_pairs(pns):
      assert f"{method}_{size_in}_{size_out}" in names
  assert "bicubic_256_128" in names


def test_matches_torch_directly_when_importable():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 2, 9, 14)).astype(np.float32)
  for method, size in (("area", (4, 5)), ("bicubic", (13, 6)), ("bicubic", (3, 20))):
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=method).numpy()
    got = resize.resize(jnp.asarray(_nchw_to_nhwc(x)), size, method)
    np.testing.assert_allclose(np.asarray(got), _nchw_to_nhwc(want), rtol=1e-5, atol=1e-5)


def test_matrix_closed_forms():
  # Area: rows sum to 1 and 16 -> 4 is a plain 4-wide mean.
  m = resize.area_matrix(16, 4)
  np.testing.assert_allclose(m, np.kron(np.eye(4), np.full((1, 4), 0.25)))
  # Overlapping adaptive windows: 5 -> 3 uses [0,2), [1,4), [3,5).
  np.testing.assert_allclose(resize.area_matrix(5, 3),
                             [[.5, .5, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, .5, .5]])
  # Bicubic rows sum to 1 (partition of unity survives edge clamping); 2x downsample has t = 0.5 taps
  # (-0.09375, 0.59375, 0.59375, -0.09375) = Keys A=-0.75 at distances 1.5, 0.5.
  for n_in, n_out in ((3, 16), (16, 13), (256, 128)):
    np.testing.assert_allclose(resize.bicubic_matrix(n_in, n_out).sum(1), 1.0, rtol=0, atol=1e-12)
  row = resize.bicubic_matrix(256, 128)[10]
  np.testing.assert_allclose(row[19:23], [-0.09375, 0.59375, 0.59375, -0.09375])
  # Identity sizes are exact identities.
  np.testing.assert_allclose(resize.bicubic_matrix(7, 7), np.eye(7), atol=1e-12)
  np.testing.assert_allclose(resize.area_matrix(7, 7), np.eye(7))


def test_pivot_downsample_shape_and_errors():
  x = jnp.ones((2, 32, 32, 3))
  y = resize.pivot_downsample(x)
  assert y.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(y), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="not divisible"):
    resize.pivot_downsample(jnp.ones((1, 33, 32, 3)))
  with pytest.raises(ValueError, match="not one of"):
    resize.resize(x, 8, "bilinear")
  with pytest.raises(ValueError, match="channels-last"):
    resize.resize(jnp.ones((4, 4)), 2, "area")
