"""gelu_erf (the backbone's exact-form GELU with a closed-form erf) against float64 math.erf: values and derivative."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from himar_jax.nn.activations import gelu_erf


def _gelu64(x):
  return np.array([v * (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0 for v in x])


def _slope64(x):
  return np.array([(1.0 + math.erf(v / math.sqrt(2.0))) / 2.0 + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
                   for v in x])


def test_values_and_derivative_match_float64():
  x = np.concatenate([np.linspace(-12.0, 12.0, 4001), np.random.default_rng(0).normal(size=2000) * 3.0])
  x32 = jnp.asarray(x, jnp.float32)
  xs = np.asarray(x32, np.float64)  # the float32-rounded inputs
  got = np.asarray(gelu_erf(x32), np.float64)
  np.testing.assert_allclose(got, _gelu64(xs), rtol=0, atol=2e-6)  # 1.5e-7 (erf) x |x| <= 12, plus rounding
  slope = np.asarray(jax.vmap(jax.grad(gelu_erf))(x32), np.float64)
  np.testing.assert_allclose(slope, _slope64(xs), rtol=0, atol=1e-6)
  assert np.max(np.abs(got - _gelu64(xs))) < 5e-7 * np.max(np.abs(xs)) + 1e-6


def test_bfloat16_in_bfloat16_out_with_one_rounding():
  x = jnp.linspace(-6.0, 6.0, 1025).astype(jnp.bfloat16)
  got = gelu_erf(x)
  assert got.dtype == jnp.bfloat16
  want = _gelu64(np.asarray(x, np.float64))
  # One rounding of the float32 result to bfloat16: within half a bf16 ulp (2^-9 relative) plus the erf error.
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2.0 ** -8, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gelu_erf(x.astype(jnp.float32))), np.asarray(
      jax.nn.gelu(x.astype(jnp.float32), approximate=False)), rtol=0, atol=3e-7 * 6 + 1e-7)
