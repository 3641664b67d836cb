"""PyTorch-exact image resizes as separable 1-D matrices: `area` and `bicubic` (F.interpolate semantics).

The multi-scale VQ quantizer and Hi-MAR's pivot images depend on the exact interpolation weights PyTorch uses;
`jax.image.resize` uses different ones (antialiasing on downsampling, other edge handling). Each resize here is a
(out, in) matrix per spatial axis, built in float64 NumPy at trace time and applied with two einsums at HIGHEST
precision (no TF32), so the result equals `torch.nn.functional.interpolate(..., mode=...)` up to float rounding.

Layout: images are channels-last, (..., H, W, C).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's cubic convolution coefficient (upsample_bicubic2d and the antialias-free kernels).
BICUBIC_A = -0.75
METHODS = ("area", "bicubic")


@functools.lru_cache(maxsize=None)
def area_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(out, in) weights of adaptive average pooling: row i averages inputs [floor(i*in/out), ceil((i+1)*in/out))."""
  _check_sizes(size_in, size_out)
  m = np.zeros((size_out, size_in), np.float64)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -((-(i + 1) * size_in) // size_out)  # ceil division, exact in integers
    m[i, start:end] = 1.0 / (end - start)
  m.setflags(write=False)
  return m


def _cubic_weights(t: np.ndarray, a: float = BICUBIC_A) -> np.ndarray:
  """Keys cubic-convolution weights for taps at offsets -1, 0, 1, 2 from floor(src); t in [0, 1)."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(out, in) weights of PyTorch bicubic (A=-0.75, align_corners=False, edge taps clamped, no antialias)."""
  _check_sizes(size_in, size_out)
  scale = size_in / size_out
  # align_corners=False source coordinate; PyTorch does not clamp it at 0 for cubic interpolation.
  src = (np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  w = _cubic_weights(src - base)
  m = np.zeros((size_out, size_in), np.float64)
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, size_in - 1)
    np.add.at(m, (np.arange(size_out), idx), w[:, tap])
  m.setflags(write=False)
  return m


def resize_matrix(size_in: int, size_out: int, method: str) -> np.ndarray:
  if method == "area":
    return area_matrix(size_in, size_out)
  if method == "bicubic":
    return bicubic_matrix(size_in, size_out)
  raise ValueError(f"resize method={method!r} is not one of {METHODS}.")


def _check_sizes(size_in: int, size_out: int):
  if int(size_in) != size_in or int(size_out) != size_out or size_in < 1 or size_out < 1:
    raise ValueError(f"resize sizes must be positive integers, got in={size_in!r} out={size_out!r}.")


def resize(x: jax.Array, size: int | tuple[int, int], method: str) -> jax.Array:
  """Resizes channels-last images x (..., H, W, C) to `size` like F.interpolate(mode=method), in float32.

  Identity sizes return x unchanged (PyTorch's area and bicubic are exact identities there too).
  """
  if x.ndim < 3:
    raise ValueError(f"resize expects channels-last images (..., H, W, C); got shape {x.shape}.")
  out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
  in_h, in_w = x.shape[-3], x.shape[-2]
  if (in_h, in_w) == (out_h, out_w):
    return x
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  mh = jnp.asarray(resize_matrix(in_h, out_h, method), jnp.float32)
  mw = jnp.asarray(resize_matrix(in_w, out_w, method), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,...hwc->...owc", mh, x.astype(jnp.float32), precision=hi)
  y = jnp.einsum("pw,...owc->...opc", mw, y, precision=hi)
  return y.astype(dtype)


def area(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  return resize(x, size, "area")


def bicubic(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  return resize(x, size, "bicubic")


def pivot_downsample(images: jax.Array, factor: int = 2) -> jax.Array:
  """Hi-MAR's low-resolution pivot images: bicubic downsample by `factor` (256 -> 128), no antialias.

  Works on float images in any range (the result is not clamped, as in the official data pipeline's
  F.interpolate call); channels-last (..., H, W, C).
  """
  h, w = images.shape[-3], images.shape[-2]
  if h % factor or w % factor:
    raise ValueError(f"pivot_downsample: image size {(h, w)} is not divisible by factor {factor}; "
                     "center-crop to a multiple first.")
  return bicubic(images, (h // factor, w // factor))


def layout_resize_pairs(patch_nums) -> list[tuple[int, int, str]]:
  """The (in, out, method) resizes the VQ pyramid performs for a patch_nums layout (quantize, f_hat, inputs)."""
  last = patch_nums[-1]
  pairs = []
  for pn in patch_nums[:-1]:
    pairs.append((last, pn, "area"))      # residual -> scale pn, and f_hat -> next-scale input
    pairs.append((pn, last, "bicubic"))   # token embedding map -> full resolution
  return pairs
