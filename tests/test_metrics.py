"""Metrics against closed forms and brute-force float64 NumPy; reference / sample .npz files."""
from __future__ import annotations

import numpy as np
import pytest

from himar_jax.evaluation import metrics


def _sqrtm_psd(a):
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _random_cov(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero():
  feats = np.random.default_rng(0).standard_normal((400, 12)) @ np.diag(np.linspace(0.5, 3, 12))
  s = metrics.Statistics.of(feats)
  assert abs(metrics.frechet_distance(s, s)) < 1e-8
  assert s.mu.dtype == np.float64 and s.sigma.shape == (12, 12)


def test_fid_of_two_gaussians_matches_closed_form():
  rng = np.random.default_rng(1)
  d = 6
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  # W2^2 between Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), evaluated by eigh
  r = _sqrtm_psd(s1)
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _sqrtm_psd(r @ s2 @ r))
  got = metrics.frechet_distance(metrics.Statistics(mu1, s1), metrics.Statistics(mu2, s2))
  assert got == pytest.approx(expected, rel=1e-9)
  # diagonal covariances: sum (sqrt(v1) - sqrt(v2))^2
  v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
  got = metrics.frechet_distance(metrics.Statistics(mu1, np.diag(v1)), metrics.Statistics(mu2, np.diag(v2)))
  assert got == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2), rel=1e-9)


def test_fid_rejects_mismatched_statistics():
  a = metrics.Statistics(np.zeros(3), np.eye(3))
  b = metrics.Statistics(np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r"mu \(3,\) vs \(4,\)"):
    metrics.frechet_distance(a, b)


def test_inception_score_closed_forms():
  assert metrics.inception_score(np.full((50, 7), 1 / 7)) == pytest.approx(1.0, abs=1e-12)
  confident = np.eye(10)[np.arange(100) % 10]
  assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-12)
  # splits: the first split is all one class (IS 1), the second confident over 4 classes (IS 4)
  probs = np.concatenate([np.eye(4)[np.zeros(8, int)], np.eye(4)[np.arange(8) % 4]])
  assert metrics.inception_score(probs, split_size=8) == pytest.approx(2.5, rel=1e-12)
  # a general case against the definition exp(E_x KL(p(y|x) || p(y)))
  p = metrics.softmax(np.random.default_rng(2).standard_normal((30, 5)))
  expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), 1)))
  assert metrics.inception_score(p) == pytest.approx(expected, rel=1e-12)
  np.testing.assert_allclose(p.sum(1), 1.0)


def _brute_force_pr(ref, sample, k):
  def radii(x):
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]

  d = ((ref[:, None, :] - sample[None, :, :]) ** 2).sum(-1)
  r_ref, r_sample = radii(ref), radii(sample)
  precision = np.mean([any(d[j, i] <= r_ref[j] for j in range(len(ref))) for i in range(len(sample))])
  recall = np.mean([any(d[j, i] <= r_sample[i] for i in range(len(sample))) for j in range(len(ref))])
  return precision, recall


@pytest.mark.parametrize("block_elements", [7, 1 << 20])
def test_precision_recall_matches_brute_force(block_elements):
  rng = np.random.default_rng(3)
  ref = rng.standard_normal((60, 4))
  sample = rng.standard_normal((45, 4)) * 1.6 + 0.7   # partly outside the reference manifold
  got = metrics.precision_recall(ref, sample, k=3, block_elements=block_elements)
  expected = _brute_force_pr(ref, sample, 3)
  assert got == pytest.approx(expected, abs=1e-12)
  assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0
  np.testing.assert_allclose(metrics.manifold_radii(ref, k=3, block_elements=block_elements),
                             np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), 1)[:, 3], rtol=1e-10)
  assert metrics.precision_recall(ref, ref, block_elements=block_elements) == (1.0, 1.0)


def test_precision_recall_bad_input():
  with pytest.raises(ValueError, match="one dimension"):
    metrics.precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
  with pytest.raises(ValueError, match="more than 3 points"):
    metrics.manifold_radii(np.zeros((3, 2)))


def test_read_adm_reference_and_write_our_own(tmp_path):
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (5, 8, 8, 3)).astype(np.uint8)
  adm = tmp_path / "adm.npz"
  np.savez(adm, arr_0=images, mu=np.arange(4.0, dtype=np.float32), sigma=np.eye(4, dtype=np.float32),
           mu_s=np.zeros(3), sigma_s=2 * np.eye(3))
  ref = metrics.read_reference(str(adm), feature_dim=4, spatial_dim=3, image_size=8)
  np.testing.assert_array_equal(ref.images, images)
  assert ref.stats.mu.dtype == np.float64 and ref.feature_extractor == metrics.ADM_EXTRACTOR
  np.testing.assert_array_equal(ref.spatial_stats.sigma, 2 * np.eye(3))

  feats = rng.standard_normal((20, 4))
  ours = metrics.write_reference(str(tmp_path / "ours.npz"), images=images, features=feats,
                                 spatial_features=feats[:, :3], feature_extractor="fmnist_cnn_v1")
  back = metrics.read_reference(ours, feature_dim=4)
  assert back.feature_extractor == "fmnist_cnn_v1"
  np.testing.assert_allclose(back.stats.mu, feats.mean(0))
  np.testing.assert_allclose(back.stats.sigma, np.cov(feats, rowvar=False))
  np.testing.assert_allclose(back.spatial_stats.mu, feats[:, :3].mean(0))
  np.testing.assert_array_equal(back.images, images)

  sample_path = metrics.write_sample_batch(str(tmp_path / "samples.npz"), images, labels=[1, 2, 3, 4, 5])
  with np.load(sample_path) as f:
    assert sorted(f.files) == ["arr_0", "arr_1"] and f["arr_1"].tolist() == [1, 2, 3, 4, 5]


def test_bad_reference_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    metrics.read_reference(str(tmp_path / "missing.npz"))
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="junk.npz.*not a readable .npz"):
    metrics.read_reference(str(junk))
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, mu=np.zeros(5), sigma=np.eye(5))
  with pytest.raises(ValueError, match=r"wrong.npz.*\(2048,\)"):
    metrics.read_reference(str(wrong), feature_dim=2048)
  res = tmp_path / "res.npz"
  np.savez(res, arr_0=np.zeros((2, 64, 64, 3), np.uint8))
  with pytest.raises(ValueError, match="64x64 images but the samples are 256x256"):
    metrics.read_reference(str(res), image_size=256)
  floats = tmp_path / "floats.npz"
  np.savez(floats, arr_0=np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="uint8 NHWC"):
    metrics.read_reference(str(floats))
  empty = tmp_path / "empty.npz"
  np.savez(empty, labels=np.zeros(3))
  with pytest.raises(ValueError, match="neither images"):
    metrics.read_reference(str(empty))
