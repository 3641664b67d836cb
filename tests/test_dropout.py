"""nn/layers.Dropout: jax.random bits reproduce nnx.Dropout; counter-hash bits match a NumPy reference of the hash
and behave like independent uniform bits (keep rate, per-bit balance, neighbours and keys uncorrelated)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from himar_jax.nn.layers import Dropout, counter_hash_bits


def _mix32_numpy(h):
  h = h.astype(np.uint64)
  h ^= h >> 16
  h = (h * 0x7FEB352D) & 0xFFFFFFFF
  h ^= h >> 15
  h = (h * 0x846CA68B) & 0xFFFFFFFF
  return h ^ (h >> 16)


def test_counter_hash_bits_match_the_numpy_reference():
  key = jax.random.key(123)
  s0, s1 = (int(w) for w in np.asarray(jax.random.key_data(key)).reshape(-1)[:2])
  shape = (3, 5, 7)
  index = np.arange(np.prod(shape), dtype=np.uint64)
  expected = _mix32_numpy((_mix32_numpy(index ^ s0) + s1) & 0xFFFFFFFF).reshape(shape)
  np.testing.assert_array_equal(np.asarray(counter_hash_bits(key, shape)), expected.astype(np.uint32))
  # rbg keys (4 data words) use their first two
  rbg = jax.random.wrap_key_data(jnp.asarray([s0, s1, 9, 9], jnp.uint32), impl="rbg")
  np.testing.assert_array_equal(np.asarray(counter_hash_bits(rbg, shape)), expected.astype(np.uint32))


def test_counter_hash_bits_look_like_independent_uniform_bits():
  n = 1 << 20
  bits = np.asarray(counter_hash_bits(jax.random.key(0), (n,)))
  ones = np.unpackbits(bits.view(np.uint8)).reshape(n, 32).mean(0)
  assert np.abs(ones - 0.5).max() < 5 * 0.5 / np.sqrt(n)  # every bit position balanced
  p = 0.1
  drop = bits < np.uint32(round(p * 2 ** 32))
  sigma = np.sqrt(p * (1 - p) / n)
  assert abs(drop.mean() - p) < 5 * sigma
  # neighbours (along the last axis and a row of 768 apart) and another key's mask are independent
  for a, b in [(drop[:-1], drop[1:]), (drop[:-768], drop[768:]),
               (drop, np.asarray(counter_hash_bits(jax.random.key(1), (n,))) < np.uint32(round(p * 2 ** 32)))]:
    assert abs((a & b).mean() - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / n)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_random_bits_reproduce_nnx_dropout(rate):
  x = jax.random.normal(jax.random.key(0), (4, 33, 16))
  ours = Dropout(rate)(x, deterministic=False, rngs=nnx.Rngs(dropout=5))
  theirs = nnx.Dropout(rate)(x, deterministic=False, rngs=nnx.Rngs(dropout=5))
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_hash_dropout_scales_kept_values_and_depends_on_the_key_only():
  rate, shape = 0.25, (8, 64, 96)
  x = jax.random.normal(jax.random.key(0), shape) + 3.0  # no exact zeros among the inputs
  drop = Dropout(rate, bits="hash")
  y = np.asarray(drop(x, deterministic=False, rngs=nnx.Rngs(dropout=1)))
  kept = y != 0
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
  assert abs(1 - kept.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / kept.size)
  again = np.asarray(jax.jit(lambda v: drop(v, deterministic=False, rngs=nnx.Rngs(dropout=1)))(x))
  np.testing.assert_array_equal(again, y)
  other = np.asarray(drop(x, deterministic=False, rngs=nnx.Rngs(dropout=2))) != 0
  assert 0.5 < (other == kept).mean() < 0.7  # independent masks agree on (1-p)^2 + p^2 = 0.625
  np.testing.assert_array_equal(np.asarray(drop(x, deterministic=True)), np.asarray(x))


def test_dropout_errors_name_the_value():
  with pytest.raises(ValueError, match="rate 1.0"):
    Dropout(1.0)
  with pytest.raises(ValueError, match="bits='philox'"):
    Dropout(0.1, bits="philox")
  with pytest.raises(ValueError, match="needs rngs"):
    Dropout(0.1)(jnp.ones(3), deterministic=False)
