"""Ops that must stay batch-parallel on a sharded mesh: sharding.constrain pins activations to the batch axes,
nn/indexing.scatter_rows (a per-example scatter) compiles without gathering the batch onto every device, and the
FSDP training steps move weights, not activations."""
from __future__ import annotations

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from himar_jax import models
from himar_jax.nn.indexing import lookup_rows, scatter_rows
from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
from himar_jax.train.optimizer import make_optimizer
from himar_jax.train.state import make_train_setup
from himar_jax.train.step import make_train_step


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


def test_lookup_rows_gradient_is_a_batch_contracting_matmul():
  """Class-embedding lookups: values are table rows, the table's gradient sums the rows' cotangents per id (float64
  NumPy reference, repeated ids), and the backward pass is a dot_general with no scatter: a matmul contracting the
  batch is partitioned as local products + an all-reduce, where XLA's GPU partitioner split the scatter-add of
  Hi-MAR-B's class embedding along its width (all-gather / all-to-all mid-backward on two GPUs)."""
  rng = np.random.default_rng(1)
  table = rng.standard_normal((11, 6)).astype(np.float32)
  ids = np.array([[3, 0, 3], [10, 3, 7]], np.int32)
  g = rng.standard_normal((2, 3, 6)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(lookup_rows(table, ids)), table[ids])
  loss = lambda t: jnp.sum(lookup_rows(t, ids) * g)
  expected = np.zeros(table.shape, np.float64)
  np.add.at(expected, ids.reshape(-1), g.reshape(-1, 6).astype(np.float64))
  np.testing.assert_allclose(np.asarray(jax.grad(loss)(table)), expected, rtol=1e-6, atol=1e-6)
  backward = str(jax.make_jaxpr(jax.grad(loss))(table))
  assert "dot_general" in backward and "scatter" not in backward
  assert "scatter" in str(jax.make_jaxpr(jax.grad(lambda t: jnp.sum(t[ids] * g)))(table))  # what it replaces

  mesh = mesh_lib.make_mesh((8, 1, 1))
  labels = np.arange(16, dtype=np.int32) % 11
  cot = rng.standard_normal((16, 6)).astype(np.float32)
  sharded = NamedSharding(mesh, P("data"))
  step = jax.jit(jax.grad(lambda t, i, c: jnp.sum(lookup_rows(t, i) * c)),
                 in_shardings=(NamedSharding(mesh, P()), sharded, sharded))
  hlo = step.lower(table, labels, cot).compile().as_text()
  assert not re.search(r"all-gather|all-to-all", hlo) and "all-reduce" in hlo
  expected = np.zeros(table.shape, np.float64)
  np.add.at(expected, labels, cot.astype(np.float64))
  np.testing.assert_allclose(np.asarray(step(table, labels, cot)), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["next_scale:hmar_tiny", "himar:himar_tiny"])
def test_fsdp_step_moves_weights_not_activations(spec):
  """On an 8-way FSDP mesh the compiled training step gathers weights only: no all-reduce / all-gather of a
  batch-leading activation (before activations were pinned, the partitioner sharded them along their width like
  the weights and all-reduced matmul outputs: 14 such collectives in HMAR-tiny, 6x the temporaries in HMAR-d30)."""
  module, _, variant = spec.partition(":")
  config = importlib.import_module(f"configs.{module}").get_config(variant)
  gb = 16
  config.data.global_batch_size, config.mesh.shape, config.model.scan_blocks = gb, (1, 8, 1), True
  mesh = mesh_lib.mesh_from_config(config)
  setup = make_train_setup(models.model_fn(config), make_optimizer(config, 10), mesh)
  step = make_train_step(setup, config.optim.ema_decay)
  m, bs = config.model, sharding_lib.batch_sharding(mesh, 1)
  if m.family == "himar":
    shapes = {"latent": (gb, m.grid_size, m.grid_size, m.token_dim),
              "latent_small": (gb, m.lowres_grid, m.lowres_grid, m.token_dim)}
    batch = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=bs) for k, s in shapes.items()}
  else:
    batch = {"indices": jax.ShapeDtypeStruct((gb, sum(p * p for p in m.patch_nums)), jnp.int32, sharding=bs)}
  batch["label"] = jax.ShapeDtypeStruct((gb,), jnp.int32, sharding=bs)
  hlo = step.lower(setup.abstract_state, batch).compile().as_text()
  moved = re.findall(r"= (?:f32|bf16)\[(\d+),\d+,\d+[^\]]*\]\S* (all-reduce|all-gather)", hlo)
  assert [m_ for m_ in moved if int(m_[0]) >= gb] == []
  assert re.search(r"all-gather", hlo)  # the weights are gathered (FSDP is active)


def test_example_major_draws_pair_with_repeated_rows_as_with_tiled_ones():
  from himar_jax.models.himar import example_major

  b, mul = 5, 3
  x = np.arange(b * 2).reshape(b, 2)
  draws = np.arange(mul * b * 4).reshape(mul * b, 4)  # one draw per tiled row
  tiled_pairs = {(tuple(r), tuple(d)) for r, d in zip(np.tile(x, (mul, 1)), draws)}
  repeated = np.repeat(x, mul, axis=0)
  reordered = np.asarray(example_major(jnp.asarray(draws), mul))
  assert {(tuple(r), tuple(d)) for r, d in zip(repeated, reordered)} == tiled_pairs
  assert len(tiled_pairs) == mul * b and sorted(map(tuple, reordered)) == sorted(map(tuple, draws))


def test_block_sparse_kernel_runs_per_shard_under_a_sharded_step(monkeypatch):
  """Under the step's mesh the block-sparse kernel is called per device through shard_map (batch over data x fsdp,
  heads over tensor): it sees the local shapes, forward and gradients equal the dense reference, and the compiled
  program gathers nothing (left to the SPMD partitioner, a Pallas call gets its operands all-gathered). On the CPU
  the kernel entry falls back to its XLA reference (interpret-mode kernels inside this shard_map are covered by
  tests/test_block_sparse_attention.py::test_shard_map_over_batch_and_heads)."""
  from himar_jax.kernels import block_sparse
  from himar_jax.kernels.layout import ScaleLayout
  from himar_jax.kernels.reference import reference_attention
  from himar_jax.nn.attention import dot_product_attention

  real, seen = block_sparse.block_sparse_attention, []

  def recorded(q, k, v, layout, **kwargs):
    seen.append(q.shape)
    return real(q, k, v, layout, **kwargs)

  monkeypatch.setattr(block_sparse, "block_sparse_attention", recorded)
  layout = ScaleLayout((1, 4, 9, 16), "block_diagonal")
  mesh = mesh_lib.make_mesh((2, 2, 2))
  spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  keys = jax.random.split(jax.random.key(3), 4)
  q, k, v, do = (jax.random.normal(key, (8, layout.length, 4, 16), jnp.float32) for key in keys)

  def loss(q, k, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jnp.sum(dot_product_attention(q, k, v, layout=layout, implementation="pallas_tpu") * do)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=(spec,) * 3)
  placed = [jax.device_put(x, spec) for x in (q, k, v)]
  value, grads = step(*placed)
  assert set(seen) == {(2, layout.length, 2, 16)}  # batch 8 / 4 devices, heads 4 / 2
  ref_value, ref_grads = jax.value_and_grad(
      lambda q, k, v: jnp.sum(reference_attention(q, k, v, layout) * do), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
  assert "all-gather" not in step.lower(*placed).compile().as_text()
