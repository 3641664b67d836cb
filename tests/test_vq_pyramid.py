"""VQ residual pyramid: published size, phi map, quantizer identities against float64 NumPy, straight-through
gradients, usage statistics and layouts (parity vs VAR's classes: test_convert_tokenizers)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from himar_jax import tokenizers
from himar_jax.tokenizers import resize
from himar_jax.tokenizers import vq_pyramid as vq


def test_published_parameter_count_and_layouts():
  for res, L in ((256, 680), (512, 2240)):
    config = vq.var_vqvae_config(res)
    assert config.seq_len == L
    model = nnx.eval_shape(lambda c=config: vq.VQPyramid(c, rngs=nnx.Rngs(0)))
    assert vq.count_params(model) == 108_948_355
    assert model.image_size == res
  assert [len(level.attn) for level in model.encoder.down] == [0, 0, 0, 0, 2]
  assert [len(level.attn) for level in model.decoder.up] == [0, 0, 0, 0, 3]
  with pytest.raises(ValueError, match="resolution=384"):
    vq.var_vqvae_config(384)


def test_phi_index_map():
  assert vq.phi_index_map(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
  assert vq.phi_index_map(14, 4) == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)
  assert vq.phi_index_map(5, 1) == (0,) * 5
  assert vq.phi_index_map(6, 6) == tuple(range(6))  # non-shared: one phi per scale


def _quantizer(**kw):
  config = vq.tiny_config(**kw).replace(patch_nums=kw.get("patch_nums", (1, 2, 3, 5, 6)))
  return tokenizers.host_initialize(nnx.eval_shape(lambda: vq.ResidualQuantizer(config, rngs=nnx.Rngs(0))), 3)


def _np_nearest(z, e):
  d = ((z[:, None, :].astype(np.float64) - e[None].astype(np.float64)) ** 2).sum(-1)
  return d.argmin(-1)


def test_quantizer_matches_float64_numpy_loop_with_identity_phi():
  # With quant_resi = 0 phi is the identity and the whole residual loop is resizes + nearest neighbours.
  config = vq.tiny_config(vocab_size=32, z_channels=4, patch_nums=(1, 2, 3, 5, 6)).replace(quant_resi=0.0)
  q = tokenizers.host_initialize(nnx.eval_shape(lambda: vq.ResidualQuantizer(config, rngs=nnx.Rngs(0))))
  e = np.asarray(q.embedding.embedding[...]) * 200.0  # spread the codebook so ties are impossible
  q.embedding.embedding[...] = jnp.asarray(e)
  f = np.random.default_rng(0).standard_normal((2, 6, 6, 4)).astype(np.float32)
  rest, fhat = f.astype(np.float64), np.zeros_like(f, np.float64)
  want_idx = []
  for k, pn in enumerate((1, 2, 3, 5, 6)):
    a, b = resize.area_matrix(6, pn), resize.bicubic_matrix(pn, 6)
    z = np.einsum("oh,bhwc,pw->bopc", a, rest, a) if pn != 6 else rest
    idx = _np_nearest(z.reshape(-1, 4), e).reshape(2, pn * pn)
    want_idx.append(idx)
    h = e[idx].reshape(2, pn, pn, 4)
    h = np.einsum("oh,bhwc,pw->bopc", b, h, b) if pn != 6 else h
    fhat, rest = fhat + h, rest - h
  got_idx = q.f_to_indices(jnp.asarray(f))
  for g, w in zip(got_idx, want_idx):
    np.testing.assert_array_equal(np.asarray(g), w)
  np.testing.assert_allclose(q.f_to_fhats(jnp.asarray(f))[-1], fhat, rtol=1e-4, atol=1e-4)


def test_fhat_paths_agree_and_inputs_are_area_of_fhat():
  q = _quantizer()
  f = jax.random.normal(jax.random.key(0), (2, 6, 6, 8)) * 0.05

  @nnx.jit
  def paths(q, f):
    idx = q.f_to_indices(f)
    # Incremental inference, scale by scale.
    f_hat, pieces = jnp.zeros((2, 6, 6, 8)), []
    for k, pn in enumerate((1, 2, 3, 5, 6)):
      f_hat, nxt = q.next_autoregressive_input(k, f_hat, q.embed(idx[k], (pn, pn)))
      if k < 4:
        pieces.append(nxt.reshape(2, -1, 8))
    return idx, q.f_to_fhats(f), q.indices_to_fhats(idx), q.next_scale_inputs(idx), pieces, f_hat

  idx, fhats, fhats2, inputs, pieces, f_hat = paths(q, f)
  assert [i.shape for i in idx] == [(2, 1), (2, 4), (2, 9), (2, 25), (2, 36)]
  assert all(i.dtype == jnp.int32 for i in idx)
  for a, b in zip(fhats, fhats2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert inputs.shape == (2, 4 + 9 + 25 + 36, 8)
  want = np.concatenate([np.einsum("oh,bhwc,pw->bopc", resize.area_matrix(6, pn), np.asarray(fh),
                                   resize.area_matrix(6, pn)).reshape(2, -1, 8)
                         for fh, pn in zip(fhats[:-1], (2, 3, 5, 6))], 1)
  np.testing.assert_allclose(inputs, want, rtol=1e-5, atol=1e-6)
  # Incremental inference reproduces both the teacher-forcing inputs and the final f_hat.
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), inputs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f_hat, fhats[-1], rtol=1e-5, atol=1e-6)


def test_training_forward_loss_straight_through_and_hits():
  q = _quantizer()
  f = jax.random.normal(jax.random.key(1), (2, 6, 6, 8)) * 0.05
  g = jax.random.normal(jax.random.key(2), f.shape)
  graphdef, params, rest = nnx.split(q, nnx.Param, ...)

  @jax.jit
  def run(params, f):
    m = lambda p: nnx.merge(graphdef, p, rest)
    return (m(params)(f), m(params).f_to_fhats(f), jax.grad(lambda x: jnp.sum(m(params)(x).f_hat * g))(f),
            jax.grad(lambda x: m(params)(x).loss)(f), jax.grad(lambda p: m(p)(f).loss)(params))

  out, fhats, grad_st, grad_loss, grads = run(params, f)
  np.testing.assert_allclose(out.f_hat, fhats[-1], rtol=1e-5, atol=1e-6)
  want = np.mean([1.25 * np.mean((np.asarray(fh) - np.asarray(f)) ** 2) for fh in fhats])
  np.testing.assert_allclose(out.loss, want, rtol=1e-5)
  np.testing.assert_array_equal(out.hits.sum(-1), [2 * pn * pn for pn in (1, 2, 3, 5, 6)])
  for k, idx in enumerate(out.indices):
    np.testing.assert_array_equal(out.hits[k], np.bincount(np.asarray(idx).ravel(), minlength=64))
  # Straight-through: d<f_hat, g>/df = g; commitment gradient: beta * 2 (f - f_hat_k) / N averaged over scales.
  np.testing.assert_allclose(grad_st, g, rtol=1e-5, atol=1e-6)
  want_grad = np.mean([0.25 * 2 * (np.asarray(f) - np.asarray(fh)) / f.size for fh in fhats], axis=0)
  np.testing.assert_allclose(grad_loss, want_grad, rtol=1e-4, atol=1e-9)
  # The codebook term trains the embedding and the phi convs.
  assert float(jnp.abs(grads["embedding"]["embedding"][...]).sum()) > 0
  assert float(jnp.abs(grads["phi"][0]["conv"]["kernel"][...]).sum()) > 0


def test_usage_ema_and_percent():
  q = _quantizer()
  hits = jnp.zeros((5, 64)).at[:, :8].set(10.0)
  q.update_usage(hits)
  np.testing.assert_allclose(q.ema_hits[...], hits)
  q.update_usage(jnp.zeros((5, 64)))
  np.testing.assert_allclose(q.ema_hits[...], 0.9 * hits)
  # margin = 0.08 * tokens / V: tokens = 64 * 100 -> margin 8: the 8 codes at 9.0 count, the rest do not.
  np.testing.assert_allclose(q.usage_percent(6400), 8 / 64 * 100)
  np.testing.assert_allclose(q.usage_percent(64 * 200), 0.0)
  np.testing.assert_allclose(vq.usage_from_hits(hits), 12.5)


def test_model_shapes_and_errors():
  model = tokenizers.build("vq_pyramid", vq.tiny_config(1), host_init=True)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1, maxval=1)
  def run(m, x):
    rec, out = m(x)  # the training forward's indices are img_to_indices(x)
    return rec, out, m.indices_to_img(out.indices)

  rec, out, img = nnx.jit(run)(model, x)
  idx = list(out.indices)
  assert [i.shape[1] for i in idx] == [1, 4, 9, 16, 36, 64]
  assert img.shape == x.shape and float(jnp.abs(img).max()) <= 1.0
  assert rec.shape == x.shape and out.loss.shape == ()
  with pytest.raises(ValueError, match="does not match the last patch_num"):
    model.quantize.f_to_indices(jnp.zeros((1, 4, 4, 8)))
  with pytest.raises(ValueError, match=r"indices\[1\] must be \(B, 4\)"):
    model.quantize.indices_to_fhat([idx[0], idx[2]] + idx[2:])
  with pytest.raises(ValueError, match="strictly increasing"):
    nnx.eval_shape(lambda: vq.VQPyramid(vq.tiny_config(patch_nums=(1, 3, 2)), rngs=nnx.Rngs(0)))
