"""kernels/fused_dense: the GELU epilogues' formulas, the Mosaic GPU kernel's lowering for Hopper, the dispatch
and its gradients (the kernel's numbers and speed are checked on the H100 by bench/fused_dense.py)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from himar_jax.kernels import fused_dense
from himar_jax.nn.layers import Mlp


def test_gelu_tanh_f32_is_the_tanh_form_in_float64():
  h = np.linspace(-12.0, 12.0, 20001)
  u = np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)
  want = 0.5 * h * (1.0 + np.tanh(u))
  got = np.asarray(fused_dense.gelu_tanh_f32(jnp.asarray(h, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-7)
  # and jax's own float32 tanh GELU, the unfused path's formula (both round differently in the far negative tail)
  np.testing.assert_allclose(got, np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32), approximate=True)),
                             rtol=2e-6, atol=1e-6)
  via_tanh = np.asarray(fused_dense.gelu_tanh_f32(jnp.asarray(h, jnp.float32), use_tanh=True), np.float64)
  np.testing.assert_allclose(via_tanh, want, rtol=2e-6, atol=1e-6)  # 1 + tanh u cancels in the negative tail


@pytest.mark.parametrize("approximate", [True, False])
def test_reference_matches_float64_numpy(approximate):
  kx, kw, kb = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 5, 64), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (64, 256), jnp.float32) * 0.125
  b = jax.random.normal(kb, (256,), jnp.float32)
  got = np.asarray(fused_dense.reference(x, w, b, approximate=approximate), np.float64)
  h = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.bfloat16), np.float64) + np.asarray(b, np.float64)
  if approximate:
    want = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  else:
    want = h * 0.5 * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
  assert got.shape == (3, 5, 256)
  np.testing.assert_allclose(got, want, rtol=8e-3, atol=8e-3)  # one bfloat16 rounding of the output


@pytest.mark.parametrize("config,approximate", [(fused_dense.TileConfig(), True),
                                                (fused_dense.TileConfig(64, 128, 64, 4), True),
                                                (fused_dense.TileConfig(128, 64, 64, 4, tanh=False), True),
                                                (fused_dense.TileConfig(), False)])
def test_kernel_lowers_for_hopper(config, approximate):
  x = jax.ShapeDtypeStruct((2, 256, 512), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((512, 1024), jnp.float32)
  b = jax.ShapeDtypeStruct((1024,), jnp.float32)
  fn = jax.jit(lambda x, w, b: fused_dense.dense_gelu(x, w, b, approximate=approximate, config=config,
                                                      programs=132))
  out = jax.eval_shape(fn, x, w, b)
  assert out.shape == (2, 256, 1024) and out.dtype == jnp.bfloat16
  text = fn.trace(x, w, b).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_unsupported_operands_are_named():
  w = jnp.zeros((512, 1024))
  assert "rows=100" in fused_dense.unsupported_reason(jnp.zeros((100, 512), jnp.bfloat16), w)
  assert "dtype float32" in fused_dense.unsupported_reason(jnp.zeros((128, 512)), w)
  assert fused_dense.unsupported_reason(jnp.zeros((128, 512), jnp.bfloat16), w) is None
  with pytest.raises(ValueError, match=r"rows=100, K=512, N=1024"):
    fused_dense.dense_gelu(jnp.zeros((100, 512), jnp.bfloat16), w, jnp.zeros(1024))
  assert fused_dense.fused_or_none(jnp.zeros((128, 512), jnp.bfloat16), w, jnp.zeros(1024)) is None  # CPU


def _mlp(fused, approximate=True):
  return Mlp(64, 256, rngs=nnx.Rngs(3), approximate_gelu=approximate, fused_gelu=fused)


@pytest.mark.parametrize("approximate", [True, False])
def test_mlp_fused_gelu_falls_back_off_hopper(approximate):
  x = jax.random.normal(jax.random.key(1), (2, 128, 64), jnp.float32)
  fused, plain = _mlp(True, approximate), _mlp(False, approximate)
  np.testing.assert_array_equal(np.asarray(fused(x)), np.asarray(plain(x)))


@pytest.mark.parametrize("approximate", [True, False])
def test_mlp_fused_path_values_and_gradients(monkeypatch, approximate):
  # Where the kernel runs (here: its XLA reference stands in for it), the Mlp's inference forward is
  # reference(x, fc1) before fc2 with the Mlp's GELU form; under differentiation it computes exactly the unfused
  # Mlp (values and gradients).
  monkeypatch.setattr(fused_dense, "is_hopper", lambda: True)
  calls = []

  def kernel_stand_in(x, kernel, bias, approximate):
    calls.append((x.shape, approximate))
    return fused_dense.reference(x, kernel, bias, approximate=approximate)
  monkeypatch.setattr(fused_dense, "dense_gelu", kernel_stand_in)
  x = jax.random.normal(jax.random.key(2), (2, 128, 64), jnp.float32)
  graph, params = nnx.split(_mlp(True, approximate))
  plain_graph, plain_params = nnx.split(_mlp(False, approximate))

  def loss(params, x, graph=graph):
    return jnp.sum(nnx.merge(graph, params)(x).astype(jnp.float32) ** 2)

  def loss_ref(params, x):
    m = nnx.merge(graph, params)
    h = fused_dense.reference(x.astype(jnp.bfloat16), m.fc1.kernel[...], m.fc1.bias[...], approximate=approximate)
    return jnp.sum(m.fc2(h).astype(jnp.float32) ** 2)

  np.testing.assert_array_equal(np.asarray(loss(params, x)), np.asarray(loss_ref(params, x)))
  assert calls == [((2, 128, 64), approximate)]  # the inference forward went through the kernel's entry point
  value, grads = jax.value_and_grad(loss)(params, x)
  plain_value, plain_grads = jax.value_and_grad(functools.partial(loss, graph=plain_graph))(plain_params, x)
  assert len(calls) == 1  # not under differentiation
  np.testing.assert_array_equal(np.asarray(value), np.asarray(plain_value))
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_unsupported_shard_shapes_take_the_unfused_layer(monkeypatch):
  # On a Hopper GPU (pretended) rows that are not a multiple of tile_m compute the unfused layer, without the kernel.
  monkeypatch.setattr(fused_dense, "is_hopper", lambda: True)
  monkeypatch.setattr(fused_dense, "dense_gelu", lambda *a, **k: pytest.fail("kernel called"))
  x = jax.random.normal(jax.random.key(4), (3, 64), jnp.float32).astype(jnp.bfloat16)
  w, b = jax.random.normal(jax.random.key(5), (64, 256)), jnp.ones(256)
  np.testing.assert_array_equal(np.asarray(fused_dense.fused_or_none(x, w, b)),
                                np.asarray(fused_dense.unfused(x, w, b)))
  assert fused_dense.fused_or_none(x.astype(jnp.float32), w, b) is None  # float32: the caller's path


def test_kernel_runs_per_device_at_inference_and_not_in_training(monkeypatch):
  # Under an 8-device mesh the inference forward runs the kernel through the per-device wrapper (per_shard); the
  # differentiated (training) program has neither, and its values and gradients are the plain Mlp's.
  from himar_jax.parallel import mesh as mesh_lib, sharding
  monkeypatch.setattr(fused_dense, "is_hopper", lambda: True)
  monkeypatch.setattr(fused_dense, "dense_gelu", lambda x, kernel, bias, approximate: fused_dense.reference(
      x, kernel, bias, approximate=approximate))
  wrapped = []
  monkeypatch.setattr(fused_dense, "per_shard", lambda fn, *xs, logical: wrapped.append(xs[0].shape) or
                      sharding.per_shard(fn, *xs, logical=logical))
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  x = jax.device_put(jax.random.normal(jax.random.key(6), (8, 128, 64), jnp.float32), sharding.batch_sharding(mesh, 3))
  graph, params = nnx.split(_mlp(True))
  params = jax.device_put(params, sharding.replicated(mesh))
  plain_graph, _ = nnx.split(_mlp(False))

  def loss(params, x, graph=graph):
    with sharding.use_mesh_for_tracing(mesh):
      return jnp.sum(nnx.merge(graph, params)(x).astype(jnp.float32) ** 2)

  inference = jax.jit(loss)(params, x)
  assert wrapped == [(8, 128, 64)]  # the global rows; per_shard hands each device its 128
  value, grads = jax.jit(jax.value_and_grad(loss))(params, x)
  assert len(wrapped) == 1  # differentiation: no kernel, no wrapper
  plain_value, plain_grads = jax.jit(jax.value_and_grad(functools.partial(loss, graph=plain_graph)))(params, x)
  np.testing.assert_array_equal(np.asarray(value), np.asarray(plain_value))
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(ref))
  assert np.isfinite(float(inference)) and abs(float(inference) - float(value)) <= 1e-2 * abs(float(value))
