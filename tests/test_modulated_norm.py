"""Fused gated residual + LayerNorm + adaLN modulation: the Pallas GPU kernel (interpret mode) against a float64
NumPy evaluation of the formula, the XLA path against the same, gradients through the custom_vjp, bad input."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from himar_jax.kernels.modulated_norm import modulated_layer_norm


def _numpy(x, mod, h, shift, scale, gate, eps=1e-6):
  x, mod = np.asarray(x, np.float64), np.asarray(mod, np.float64)
  w = x.shape[-1]
  chunk = lambda j: mod[..., j * w:(j + 1) * w]
  if h is not None:
    x = x + chunk(gate) * np.asarray(h, np.float64)
  mean = x.mean(-1, keepdims=True)
  y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  return x, y * (1 + chunk(scale)) + chunk(shift)


def _inputs(seed, shape, chunks, dtype=jnp.bfloat16):
  kx, km, kh = jax.random.split(jax.random.key(seed), 3)
  x = 3.0 * jax.random.normal(kx, shape, jnp.float32) + 1.0
  mod = jax.random.normal(km, shape[:-1] + (chunks * shape[-1],), jnp.float32).astype(dtype)
  h = jax.random.normal(kh, shape, jnp.float32).astype(dtype)
  return x, mod, h


@pytest.mark.parametrize("implementation", ["pallas_gpu", "xla"])
@pytest.mark.parametrize("shape,residual", [((2, 37, 64), True), ((3, 5, 24), False), ((1, 16, 512), True)])
def test_matches_the_formula(implementation, shape, residual):
  # Rows not a multiple of the kernel's 16, a width that is not a power of two, the DiT-B width.
  seed = int.from_bytes(os.urandom(4), "little")
  x, mod, h = _inputs(seed, shape, 6)
  kwargs = dict(h=h, gate=2) if residual else {}
  x_out, y = modulated_layer_norm(x, mod, shift=3, scale=4, implementation=implementation,
                                  interpret=implementation == "pallas_gpu", out_dtype=jnp.float32, **kwargs)
  want_x, want_y = _numpy(x, mod, h if residual else None, 3, 4, 2)
  assert x_out.dtype == jnp.float32 and y.dtype == jnp.float32 and y.shape == shape
  np.testing.assert_allclose(np.asarray(x_out), want_x, rtol=1e-6, atol=1e-6, err_msg=f"seed={seed}")
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=2e-5, atol=2e-5, err_msg=f"seed={seed}")


def test_bf16_output_and_kernel_equals_xla():
  x, mod, h = _inputs(0, (4, 33, 128), 6)
  got = modulated_layer_norm(x, mod, shift=0, scale=1, h=h, gate=5, implementation="pallas_gpu", interpret=True)
  want = modulated_layer_norm(x, mod, shift=0, scale=1, h=h, gate=5, implementation="xla")
  assert got[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32), rtol=1e-2, atol=1e-2)


def test_gradients_of_the_kernel_path_match_the_reference():
  x, mod, h = _inputs(1, (2, 20, 32), 3, jnp.float32)
  ct = jax.random.normal(jax.random.key(2), (2, 20, 32), jnp.float32)

  def loss(impl):
    def f(x, mod, h):
      x_out, y = modulated_layer_norm(x, mod, shift=0, scale=1, h=h, gate=2, implementation=impl,
                                      interpret=True, out_dtype=jnp.float32)
      return jnp.sum(x_out * ct) + jnp.sum(y * y * ct)
    return f
  got = jax.grad(loss("pallas_gpu"), argnums=(0, 1, 2))(x, mod, h)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(x, mod, h)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_the_value():
  x, mod, h = _inputs(0, (2, 4, 8), 6)
  with pytest.raises(ValueError, match="mod must be"):
    modulated_layer_norm(x, mod[..., :20], shift=0, scale=1)
  with pytest.raises(ValueError, match="scale=6 is not a chunk index"):
    modulated_layer_norm(x, mod, shift=0, scale=6)
  with pytest.raises(ValueError, match="pass h"):
    modulated_layer_norm(x, mod, shift=0, scale=1, h=h)
  with pytest.raises(ValueError, match="implementation='triton'"):
    modulated_layer_norm(x, mod, shift=0, scale=1, implementation="triton")


def test_kernel_runs_per_shard_under_a_sharded_step(monkeypatch):
  # Under the step's mesh the Pallas call sees each device's rows (shard_map), the values and gradients equal the
  # XLA path, and the compiled program gathers nothing.
  from jax.sharding import NamedSharding, PartitionSpec as P

  from himar_jax.kernels import modulated_norm
  from himar_jax.parallel import mesh as mesh_lib

  real, seen = modulated_norm._pallas_forward, []

  def recorded(x, mod, h, static, interpret):
    seen.append(x.shape)
    return real(x, mod, h, static, interpret)
  monkeypatch.setattr(modulated_norm, "_pallas_forward", recorded)
  mesh = mesh_lib.make_mesh((2, 2, 2))
  spec = NamedSharding(mesh, P(("data", "fsdp")))
  # GPU interpret mode pads masked loads with a constant that has no manual-axis type, which shard_map's type
  # check rejects (an interpreter limitation; the compiled Triton kernel does not go through it): check_vma=False.
  import functools
  monkeypatch.setattr(jax, "shard_map", functools.partial(jax.shard_map, check_vma=False))
  x, mod, h = _inputs(3, (8, 10, 32), 3, jnp.float32)

  def loss(impl):
    def f(x, mod, h):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        x_out, y = modulated_layer_norm(x, mod, shift=0, scale=1, h=h, gate=2, implementation=impl,
                                        interpret=True, out_dtype=jnp.float32)
      return jnp.sum(x_out * y)
    return f
  step = jax.jit(jax.value_and_grad(loss("pallas_gpu"), argnums=(0, 1, 2)), in_shardings=(spec,) * 3)
  placed = [jax.device_put(a, spec) for a in (x, mod, h)]
  value, grads = step(*placed)
  assert set(seen) == {(2, 10, 32)}
  want_value, want_grads = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(x, mod, h)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
  assert "all-gather" not in step.lower(*placed).compile().as_text()
