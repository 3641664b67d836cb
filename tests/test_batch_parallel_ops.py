"""Ops that must stay batch-parallel on a sharded mesh: sharding.constrain pins activations to the batch axes, and
nn/indexing.scatter_rows (a per-example scatter) compiles without gathering the batch onto every device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from himar_jax.nn.indexing import scatter_rows
from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib


def test_constrain_pins_the_batch_axes_under_the_abstract_mesh_only():
  x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
  assert sharding_lib.constrain(x) is x  # no mesh set: unchanged
  mesh = mesh_lib.make_mesh((2, 4, 1))

  def f(v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return sharding_lib.constrain(v * 2.0)

  y = jax.jit(f, in_shardings=NamedSharding(mesh, P()), out_shardings=None)(x)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)
  np.testing.assert_array_equal(np.asarray(y), 2.0 * np.asarray(x))
  one = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with jax.sharding.use_abstract_mesh(one.abstract_mesh):
    assert sharding_lib.constrain(x) is x  # one device: nothing to pin


def test_scatter_rows_matches_indexing_and_stays_batch_sharded():
  b, n, k, d = 8, 10, 4, 3
  rng = np.random.default_rng(0)
  dest = rng.standard_normal((b, n, d)).astype(np.float32)
  rows = np.stack([rng.permutation(n)[:k] for _ in range(b)]).astype(np.int32)
  values = rng.standard_normal((b, k, d)).astype(np.float32)
  expected = dest.copy()
  expected[np.arange(b)[:, None], rows] = values
  np.testing.assert_array_equal(np.asarray(scatter_rows(dest, rows, values)), expected)

  mesh = mesh_lib.make_mesh((8, 1, 1))
  sharded = NamedSharding(mesh, P("data"))
  fn = jax.jit(scatter_rows, in_shardings=(sharded,) * 3, out_shardings=sharded)
  hlo = fn.lower(dest, rows, values).compile().as_text()
  assert "all-gather" not in hlo and "all-reduce" not in hlo
  np.testing.assert_array_equal(np.asarray(fn(dest, rows, values)), expected)
  # the explicit arange(B) index that scatter_rows replaces does gather the batch (what this guards against)
  explicit = jax.jit(lambda d_, r, v: d_.at[jnp.arange(b)[:, None], r].set(v), in_shardings=(sharded,) * 3,
                     out_shardings=sharded)
  assert "all-gather" in explicit.lower(dest, rows, values).compile().as_text()
