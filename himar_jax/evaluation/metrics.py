"""Sample-quality metrics in float64 NumPy, following ADM's evaluator (openai/guided-diffusion evaluations/):

  FID / sFID   Frechet distance of Gaussians fitted to pool (2048-d) / spatial (mixed_6/conv, 2023-d) features:
               |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), scipy's sqrtm, eps * I added when the product is
               singular, a small imaginary part dropped (an error when it is large).
  IS           exp(mean_x KL(p(y|x) || p(y))) per split of 5,000 predictions, averaged over splits.
  precision /  improved precision and recall (Kynkaanniemi et al. 2019) with k = 3: a point is covered by the
  recall       other set's manifold when its squared distance to some point of that set is at most that point's
               squared distance to its k-th nearest neighbour (itself excluded). Distances are computed in
               row blocks (memory: `block_elements` float64 entries at a time). ADM computes them in float16
               first; here they are float64, which can only differ on near-ties.

Reference files: ADM's `.npz` (mu, sigma, mu_s, sigma_s, arr_0 = uint8 NHWC images) are read as they are; ours add
`feature_extractor` (which network made mu/sigma, so features of different networks are never compared) and, for
Fashion-MNIST classifier features, use the same mu/sigma keys.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile

import numpy as np

ADM_EXTRACTOR = "inception_2015_12_05"   # ADM reference files carry no name: their stats are Inception's


# ---- Frechet distance ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Statistics:
  """Mean and covariance (float64) of a feature set."""
  mu: np.ndarray
  sigma: np.ndarray

  @classmethod
  def of(cls, features) -> Statistics:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
      raise ValueError(f"statistics need (N >= 2, D) features; got shape {features.shape}.")
    return cls(features.mean(axis=0), np.cov(features, rowvar=False))


def frechet_distance(a: Statistics, b: Statistics, *, eps: float = 1e-6) -> float:
  from scipy import linalg
  mu1, mu2 = np.atleast_1d(np.asarray(a.mu, np.float64)), np.atleast_1d(np.asarray(b.mu, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(a.sigma, np.float64)), np.atleast_2d(np.asarray(b.sigma, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"Frechet distance of mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} "
                     f"vs {s2.shape}; both sets must come from the same feature extractor and layer.")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"Frechet distance: singular covariance product; adding {eps} to the diagonals.")
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Frechet distance: sqrtm has an imaginary part of {np.max(np.abs(covmean.imag)):.3g}; "
                       "the covariances are ill-conditioned (too few samples for the feature dimension?).")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# ---- Inception Score -----------------------------------------------------------------------------------------
def softmax(logits) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def inception_score(probs, *, split_size: int = 5000) -> float:
  """ADM's IS: mean over consecutive splits of `split_size` predictions of exp(E KL(p(y|x) || p(y)))."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or len(probs) == 0:
    raise ValueError(f"inception_score needs (N, classes) probabilities; got shape {probs.shape}.")
  scores = []
  for start in range(0, len(probs), split_size):
    part = probs[start:start + split_size]
    with np.errstate(divide="ignore", invalid="ignore"):
      kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    kl = np.where(part > 0, kl, 0.0)  # 0 log 0 = 0
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores))


# ---- precision / recall --------------------------------------------------------------------------------------
def pairwise_sq_distances(a, b) -> np.ndarray:
  """(len(a), len(b)) squared Euclidean distances in float64, clipped at 0 (|a|^2 - 2ab + |b|^2 as ADM)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
  return np.maximum(d, 0.0)


def _row_blocks(n_rows: int, n_cols: int, block_elements: int):
  rows = max(1, min(n_rows, block_elements // max(n_cols, 1)))
  for start in range(0, n_rows, rows):
    yield start, min(start + rows, n_rows)


def manifold_radii(features, *, k: int = 3, block_elements: int = 1 << 25) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in the same set (the point itself is the 0th)."""
  features = np.asarray(features, np.float64)
  if len(features) <= k:
    raise ValueError(f"manifold radii with k={k} need more than {k} points; got {len(features)}.")
  radii = np.empty(len(features), np.float64)
  for s, e in _row_blocks(len(features), len(features), block_elements):
    d = pairwise_sq_distances(features[s:e], features)
    radii[s:e] = np.partition(d, k, axis=1)[:, k]
  return radii


def precision_recall(ref_features, sample_features, *, k: int = 3,
                     block_elements: int = 1 << 25) -> tuple[float, float]:
  """(precision, recall): the fraction of samples inside the reference manifold, and of references inside the
  sample manifold."""
  ref = np.asarray(ref_features, np.float64)
  sample = np.asarray(sample_features, np.float64)
  if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
    raise ValueError(f"precision/recall need (N, D) features of one dimension; got {ref.shape} and {sample.shape}.")
  ref_radii = manifold_radii(ref, k=k, block_elements=block_elements)
  sample_radii = manifold_radii(sample, k=k, block_elements=block_elements)
  sample_covered = np.zeros(len(sample), bool)
  ref_covered = np.zeros(len(ref), bool)
  for s, e in _row_blocks(len(ref), len(sample), block_elements):
    d = pairwise_sq_distances(ref[s:e], sample)                    # (ref block, samples)
    sample_covered |= (d <= ref_radii[s:e, None]).any(axis=0)
    ref_covered[s:e] = (d <= sample_radii[None, :]).any(axis=1)
  return float(sample_covered.mean()), float(ref_covered.mean())


# ---- reference / sample batch files --------------------------------------------------------------------------
@dataclasses.dataclass
class Reference:
  """A reference batch: images (uint8 NHWC, may be absent), pool / spatial statistics (may be absent)."""
  path: str
  images: np.ndarray | None
  stats: Statistics | None
  spatial_stats: Statistics | None
  feature_extractor: str | None


def _load_npz(path: str, what: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist.")
  try:
    with np.load(path, allow_pickle=False) as f:
      if not hasattr(f, "files"):
        raise ValueError("a single .npy array, not an .npz archive")
      return {k: f[k] for k in f.files}
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise ValueError(f"{what} {path!r} is not a readable .npz archive ({e}); expected ADM's format: arr_0 "
                     "(uint8 NHWC images) and/or mu, sigma, mu_s, sigma_s.") from e


def read_reference(path: str, *, feature_dim: int | None = None, spatial_dim: int | None = None,
                   image_size: int | None = None) -> Reference:
  """Reads an ADM (or our) reference .npz, checking keys and shapes; `feature_dim` / `spatial_dim` / `image_size`
  are what the caller's feature extractor and samples expect (None: not checked)."""
  arrays = _load_npz(path, "reference batch")
  if "arr_0" not in arrays and "mu" not in arrays:
    raise ValueError(f"reference batch {path!r} holds neither images (arr_0) nor statistics (mu, sigma); keys: "
                     f"{sorted(arrays)}.")
  images = arrays.get("arr_0")
  if images is not None:
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
      raise ValueError(f"reference batch {path!r}: arr_0 must be uint8 NHWC images (N, H, W, 3); got "
                       f"{images.dtype} {images.shape}.")
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
      raise ValueError(f"reference batch {path!r} holds {images.shape[1]}x{images.shape[2]} images but the samples "
                       f"are {image_size}x{image_size}; use the reference batch of the samples' resolution.")

  def stats(mu_key, sigma_key, dim):
    if mu_key not in arrays:
      return None
    if sigma_key not in arrays:
      raise ValueError(f"reference batch {path!r} has {mu_key} but no {sigma_key}.")
    mu, sigma = arrays[mu_key].astype(np.float64), arrays[sigma_key].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2 or (dim is not None and mu.shape[0] != dim):
      raise ValueError(f"reference batch {path!r}: {mu_key} {mu.shape} / {sigma_key} {sigma.shape} do not fit "
                       f"features of dimension {dim if dim is not None else 'D'} (expected ({dim},) and "
                       f"({dim}, {dim})); it was made with another feature extractor.")
    return Statistics(mu, sigma)

  extractor = str(arrays["feature_extractor"]) if "feature_extractor" in arrays else (
      ADM_EXTRACTOR if "mu" in arrays else None)
  return Reference(path=path, images=images, stats=stats("mu", "sigma", feature_dim),
                   spatial_stats=stats("mu_s", "sigma_s", spatial_dim), feature_extractor=extractor)


def _atomic_savez(path: str, arrays: dict) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # never leave a half-written file under the final name
  return path


def write_reference(path: str, *, images=None, features=None, spatial_features=None,
                    feature_extractor: str | None = None) -> str:
  """Writes a reference .npz in ADM's layout: arr_0 (uint8 NHWC images, optional), mu/sigma from `features`,
  mu_s/sigma_s from `spatial_features` (optional), plus the name of the feature extractor."""
  arrays = {}
  if images is not None:
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"reference images must be uint8 NHWC; got {images.dtype} {images.shape}.")
    arrays["arr_0"] = images
  if features is not None:
    if feature_extractor is None:
      raise ValueError("write_reference: name the feature_extractor that made the features.")
    s = Statistics.of(features)
    arrays.update(mu=s.mu, sigma=s.sigma, feature_extractor=np.array(feature_extractor))
  if spatial_features is not None:
    s = Statistics.of(spatial_features)
    arrays.update(mu_s=s.mu, sigma_s=s.sigma)
  if not arrays:
    raise ValueError("write_reference: nothing to write (give images and/or features).")
  return _atomic_savez(path, arrays)


def write_sample_batch(path: str, images, labels=None) -> str:
  """ADM's sample batch: arr_0 uint8 NHWC images, arr_1 class labels (when class-conditional)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"sample batch images must be uint8 NHWC; got {images.dtype} {images.shape}.")
  arrays = {"arr_0": images}
  if labels is not None:
    arrays["arr_1"] = np.asarray(labels, np.int64)
  return _atomic_savez(path, arrays)
