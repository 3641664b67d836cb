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


# ----------------------------------------------------------------------------------------------------------------
# fc2 + bias + gated residual
# ----------------------------------------------------------------------------------------------------------------

def _residual_operands(key=0, rows=(2, 128), k=64, n=128, width=None, mod_dtype=jnp.bfloat16):
  kh, kw, kb, kr, km = jax.random.split(jax.random.key(key), 5)
  width = width or 6 * n
  return (jax.random.normal(kh, (*rows, k), jnp.float32).astype(jnp.bfloat16),
          jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5,
          jax.random.normal(kb, (n,), jnp.float32),
          jax.random.normal(kr, (*rows, n), jnp.float32),
          jax.random.normal(km, (*rows, width), jnp.float32).astype(mod_dtype))


def test_gated_residual_reference_matches_float64_numpy():
  h, w, b, r, m = _residual_operands()
  got = np.asarray(fused_dense.gated_residual_reference(h, w, b, r, m, gate_col=5 * 128), np.float64)
  f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
  want = f64(r) + f64(m)[..., 640:768] * (f64(h) @ f64(w.astype(jnp.bfloat16)) + f64(b))
  assert got.shape == (2, 128, 128)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32 accumulation, no bfloat16 rounding
  # the unfused layer (matmul output rounded to bfloat16) differs from it by that rounding only
  unfused = np.asarray(fused_dense.gated_residual_unfused(h, w, b, r, m, gate_col=640), np.float64)
  assert 0 < np.max(np.abs(unfused - want)) < 0.1
  # a gate bias apart from the modulation: added to the gate in float32
  gb = jax.random.normal(jax.random.key(9), (128,), jnp.float32)
  got = np.asarray(fused_dense.gated_residual_reference(h, w, b, r, m, 640, gb), np.float64)
  want = f64(r) + (f64(m)[..., 640:768] + f64(gb)) * (f64(h) @ f64(w.astype(jnp.bfloat16)) + f64(b))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [fused_dense.RESIDUAL_TILES, fused_dense.TileConfig(128, 64, 64, 4)])
def test_gated_residual_kernel_lowers_for_hopper(config):
  h = jax.ShapeDtypeStruct((2, 256, 1024), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((1024, 256), jnp.float32)
  b = jax.ShapeDtypeStruct((256,), jnp.float32)
  r = jax.ShapeDtypeStruct((2, 256, 256), jnp.float32)
  m = jax.ShapeDtypeStruct((2, 256, 1536), jnp.bfloat16)
  fn = jax.jit(lambda h, w, b, r, m: fused_dense.dense_gated_residual(h, w, b, r, m, 1280, config=config,
                                                                      programs=132))
  out = jax.eval_shape(fn, h, w, b, r, m)
  assert out.shape == (2, 256, 256) and out.dtype == jnp.float32
  assert "mosaic_gpu" in fn.trace(h, w, b, r, m).lower(lowering_platforms=("cuda",)).as_text()


def test_gated_residual_unsupported_operands_are_named():
  h, w, b, r, m = _residual_operands()
  reason = functools.partial(fused_dense.gated_residual_unsupported_reason, h, w)
  assert reason(r, m, 640) is None
  assert "residual dtype bfloat16" in reason(r.astype(jnp.bfloat16), m, 640)
  assert "gate columns [3, 131)" in reason(r, m, 3)  # not 16-byte aligned
  assert "gate columns [704, 832)" in reason(r, m, 704)  # past the modulation's 768 columns
  assert "shapes residual (2, 128, 64)" in reason(r[..., :64], m, 640)
  with pytest.raises(ValueError, match=r"dense_gated_residual: gate columns \[3, 131\)"):
    fused_dense.dense_gated_residual(h, w, b, r, m, 3)
  assert fused_dense.gated_residual_or_none(h, w, b, r, m, 640) is None  # CPU: the caller's path


def _stand_ins(monkeypatch, calls):
  monkeypatch.setattr(fused_dense, "is_hopper", lambda: True)

  def gelu_stand_in(x, kernel, bias, approximate):
    calls.append("gelu")
    return fused_dense.reference(x, kernel, bias, approximate=approximate)

  def residual_stand_in(h, kernel, bias, residual, modulation, gate_col, gate_bias):
    calls.append(("residual", gate_col))
    return fused_dense.gated_residual_reference(h, kernel, bias, residual, modulation, gate_col, gate_bias)
  monkeypatch.setattr(fused_dense, "dense_gelu", gelu_stand_in)
  monkeypatch.setattr(fused_dense, "dense_gated_residual", residual_stand_in)


def _dit_mlp(fused):
  return Mlp(128, 512, rngs=nnx.Rngs(4), approximate_gelu=True, fused_gelu=fused)  # shapes the kernels take


def test_mlp_gated_residual_off_hopper_is_the_blocks_expression():
  _, _, _, r, m = _residual_operands()
  y = jax.random.normal(jax.random.key(7), (2, 128, 128), jnp.float32)
  fused, plain = _dit_mlp(True), _dit_mlp(False)
  want = r + m[..., 640:].astype(jnp.float32) * plain(y).astype(jnp.float32)
  np.testing.assert_array_equal(np.asarray(fused.gated_residual(r, y, m, gate_col=640)), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(plain.gated_residual(r, y, m, gate_col=640)), np.asarray(want))


@pytest.mark.parametrize("with_gate_bias", [False, True])
def test_mlp_gated_residual_fused_values_and_gradients(monkeypatch, with_gate_bias):
  # Where the kernels run (their XLA references stand in), the inference forward is fc1's and fc2's fused forms;
  # under differentiation the Mlp computes exactly the unfused expression (values and gradients).
  calls = []
  _stand_ins(monkeypatch, calls)
  _, _, _, r, m = _residual_operands()
  gb = jax.random.normal(jax.random.key(9), (128,), jnp.float32) if with_gate_bias else None
  y = jax.random.normal(jax.random.key(8), (2, 128, 128), jnp.float32)
  graph, params = nnx.split(_dit_mlp(True))
  plain_graph, plain_params = nnx.split(_dit_mlp(False))

  def loss(params, r, m, gb, graph=graph):
    return jnp.sum(nnx.merge(graph, params).gated_residual(r, y, m, gate_col=640, gate_bias=gb) ** 2)

  mlp = nnx.merge(graph, params)
  h = fused_dense.reference(y.astype(jnp.bfloat16), mlp.fc1.kernel[...], mlp.fc1.bias[...])
  want = fused_dense.gated_residual_reference(h, mlp.fc2.kernel[...], mlp.fc2.bias[...], r, m, 640, gb)
  np.testing.assert_array_equal(np.asarray(mlp.gated_residual(r, y, m, gate_col=640, gate_bias=gb)),
                                np.asarray(want))
  assert calls == ["gelu", ("residual", 640)]
  argnums = (0, 1, 2, 3) if with_gate_bias else (0, 1, 2)
  value, grads = jax.value_and_grad(loss, argnums=argnums)(params, r, m, gb)
  plain_value, plain_grads = jax.value_and_grad(functools.partial(loss, graph=plain_graph),
                                                argnums=argnums)(plain_params, r, m, gb)
  assert len(calls) == 2  # not under differentiation
  np.testing.assert_array_equal(np.asarray(value), np.asarray(plain_value))
  for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(ref))
  assert np.abs(np.asarray(grads[2], np.float32)).sum() > 0  # the gate's window gets gradients
  if with_gate_bias:
    assert np.abs(np.asarray(grads[3])).sum() > 0


def test_linear_parts_sum_to_the_layer():
  from himar_jax.nn.layers import dense, linear_parts
  for dtype in (jnp.bfloat16, jnp.float32):
    layer = dense(64, 96, ("embed", "mlp"), rngs=nnx.Rngs(0), dtype=dtype,
                  bias_init=nnx.initializers.normal(1.0))
    x = jax.random.normal(jax.random.key(1), (3, 5, 64), jnp.float32)
    matmul, bias = linear_parts(layer, x)
    assert matmul.dtype == bias.dtype == dtype
    np.testing.assert_array_equal(np.asarray(matmul + bias), np.asarray(layer(x)))


def test_dit_block_fused_mlp_is_the_plain_block_off_hopper():
  # The fused block keeps the adaLN bias apart (linear_parts) for fc2's epilogue; without the kernel it computes
  # exactly what the plain block does.
  from himar_jax.models.heads import DiTBlock
  blocks = [DiTBlock(128, 4, rngs=nnx.Rngs(5), fused_mlp=fused) for fused in (False, True)]
  for block in blocks:  # adaLN is zero at init: random weights and biases exercise the modulation
    block.adaln.kernel.set_value(jax.random.normal(jax.random.key(2), block.adaln.kernel.shape) * 0.05)
    block.adaln.bias.set_value(jax.random.normal(jax.random.key(3), block.adaln.bias.shape))
  x = jax.random.normal(jax.random.key(6), (2, 16, 128), jnp.float32)
  c = jax.random.normal(jax.random.key(7), (2, 16, 128), jnp.float32)
  np.testing.assert_array_equal(np.asarray(blocks[1](x, c)), np.asarray(blocks[0](x, c)))


def test_gated_residual_unsupported_shards_take_the_unfused_layer(monkeypatch):
  monkeypatch.setattr(fused_dense, "is_hopper", lambda: True)
  monkeypatch.setattr(fused_dense, "dense_gated_residual", lambda *a, **k: pytest.fail("kernel called"))
  h, w, b, r, m = _residual_operands(rows=(3,))  # 3 rows: not a multiple of tile_m
  np.testing.assert_array_equal(np.asarray(fused_dense.gated_residual_or_none(h, w, b, r, m, 640)),
                                np.asarray(fused_dense.gated_residual_unfused(h, w, b, r, m, 640)))
