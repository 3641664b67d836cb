"""Activations computed in float32 and rounded once: the exact-form GELU with a closed-form erf.

One home for the erf closed form: nn/layers' Mlp and the fused matmul epilogue (kernels/fused_dense) both use it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# erf(z) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2), t = 1 / (1 + P z), z >= 0: Abramowitz & Stegun
# 7.1.26, absolute error <= 1.5e-7 (a couple of float32 ulps near 1, far below bfloat16's resolution).
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf_f32(z):
  a = jnp.abs(z)
  t = 1.0 / (1.0 + _ERF_P * a)
  poly = t * (_ERF_A[0] + t * (_ERF_A[1] + t * (_ERF_A[2] + t * (_ERF_A[3] + t * _ERF_A[4]))))
  return jnp.sign(z) * (1.0 - poly * jnp.exp(-a * a))


_INV_SQRT2 = float(1.0 / np.sqrt(2.0))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


def normal_cdf_f32(x32):
  return 0.5 * (1.0 + erf_f32(x32 * _INV_SQRT2))


@jax.custom_jvp
def gelu_erf(x):
  """Exact-form GELU, x * Phi(x) (PyTorch's nn.GELU(), timm's default), computed in float32 and returned in x's
  dtype (as PyTorch's autocast does: one rounding at the end).

  erf comes from a 1.5e-7-accurate closed form (erf_f32) instead of XLA's erf: on the H100 XLA's erf made this
  activation compute-bound, 0.90 ms on the Hi-MAR-B decoder's (98304, 3072) bfloat16 activations against a
  0.40 ms bytes floor (bench/gelu.py). The derivative is the exact formula Phi(x) + x phi(x), not the derivative of
  the approximation."""
  x32 = x.astype(jnp.float32)
  return (x32 * normal_cdf_f32(x32)).astype(x.dtype)


@gelu_erf.defjvp
def _gelu_erf_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  x32 = x.astype(jnp.float32)
  cdf = normal_cdf_f32(x32)
  slope = cdf + x32 * _INV_SQRT_2PI * jnp.exp(-0.5 * x32 * x32)
  return (x32 * cdf).astype(x.dtype), (slope * dx.astype(jnp.float32)).astype(dx.dtype)
