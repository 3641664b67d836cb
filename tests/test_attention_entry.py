"""The attention entry point's cudnn path: odd lengths with a mask are padded to even ones (cudnn's masked
backward rejects odd lengths only when the backward is traced, e.g. under jax.checkpoint)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from himar_jax.nn import attention


def test_cudnn_path_pads_odd_masked_lengths_and_matches_reference(monkeypatch):
  seen = []

  def fake_cudnn(q, k, v, mask=None, scale=None, implementation=None):
    assert implementation == "cudnn"
    assert q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0, (q.shape, k.shape)
    assert mask.shape[2:] == (q.shape[1], k.shape[1])
    seen.append(q.shape[1])
    return attention.xla_attention(q, k, v, mask, scale=scale)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
  rng = np.random.default_rng(0)
  b, l, h, d = 2, 83, 2, 8
  q, k, v = (jnp.asarray(rng.standard_normal((b, l, h, d)), jnp.float32) for _ in range(3))
  key_mask = jnp.asarray(rng.random((b, l)) < 0.7).at[:, 0].set(True)[:, None, None, :]

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  ours = lambda q, k, v: attention.dot_product_attention(q, k, v, key_mask, implementation="cudnn")
  ref = lambda q, k, v: attention.xla_attention(q, k, v, key_mask)
  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
  g_ours = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(g_ours, g_ref):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
  assert seen and all(n == 84 for n in seen)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_self_attention_projects_q_k_v_separately_as_the_fused_qkv(dtype):
  """q, k, v come from three matmuls on the thirds of the one fused qkv kernel (the checkpoint layout): the same
  numbers as slicing qkv(x), without the slice copies (no dot in the layer writes the fused 3 x width output)."""
  from flax import nnx

  from himar_jax.nn.transformer import SelfAttention

  attn = SelfAttention(64, 4, rngs=nnx.Rngs(0), dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (2, 10, 64))
  fused = attn.qkv(x).reshape(2, 10, 3, 4, 16)
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(attn._project(x, i).reshape(2, 10, 4, 16), np.float32),
                                  np.asarray(fused[:, :, i], np.float32))
  jaxpr = jax.make_jaxpr(lambda x: attn(x))(x)
  widths = [eqn.outvars[0].aval.shape[-1] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "dot_general"]
  assert 3 * 64 not in widths and widths[:3] == [64, 64, 64]  # q, k, v first (then the scores, PV, proj)


def test_self_attention_with_k_and_v_biases_folded_equals_the_plain_layer():
  """k's bias dropped (softmax ignores a per-row constant) and v's folded into the output projection's bias give
  the plain timm computation: softmax((x Wq + bq)(x Wk + bk)^T / sqrt(d)) (x Wv + bv) Wp + bp, float64 NumPy, with
  random nonzero biases and a key mask."""
  from flax import nnx

  from himar_jax.nn.transformer import SelfAttention

  width, heads, length = 64, 4, 10
  attn = SelfAttention(width, heads, rngs=nnx.Rngs(0), dtype=jnp.float32, implementation="xla")
  keys = jax.random.split(jax.random.key(2), 4)
  attn.qkv.bias[...] = jax.random.normal(keys[0], (3 * width,))
  attn.proj.bias[...] = jax.random.normal(keys[1], (width,))
  x = jax.random.normal(keys[2], (2, length, width))
  key_mask = jnp.arange(length)[None, :] < jnp.array([[length], [6]])
  got = np.asarray(attn(x, key_mask=key_mask), np.float64)

  f64 = lambda a: np.asarray(a, np.float64)
  qkv = f64(x) @ f64(attn.qkv.kernel[...]) + f64(attn.qkv.bias[...])
  q, k, v = (qkv[..., i * width:(i + 1) * width].reshape(2, length, heads, -1) for i in range(3))
  logits = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(width // heads)
  logits = np.where(np.asarray(key_mask)[:, None, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  out = np.einsum("bhlm,bmhd->blhd", p / p.sum(-1, keepdims=True), v).reshape(2, length, width)
  want = out @ f64(attn.proj.kernel[...]) + f64(attn.proj.bias[...])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert np.abs(f64(attn.qkv.bias[...])[width:]).min() > 0  # the folded biases are really there
