"""Parity with the official PyTorch tokenizers (fixtures from tests/fixtures/make_tokenizers.py) through the
state-dict converter, plus the converter's safety and error behaviour and the orbax round trip."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from himar_jax.convert import tokenizers as conv
from himar_jax.tokenizers import kl_vae
from himar_jax.tokenizers import vq_pyramid as vq

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers")
KL_CONFIG = kl_vae.KLVAEConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=2, in_channels=3)
VQ_CONFIG = vq.VQPyramidConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                               patch_nums=(1, 2, 3, 4, 6, 8))


def _load(name):
  with np.load(os.path.join(FIXTURES, f"{name}.npz")) as f:
    data = {k: f[k] for k in f.files}
  sd = {k[3:]: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in data.items() if k.startswith("sd/")}
  return sd, data


def nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def assert_rel(got, want, tol=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)
  assert err <= tol, f"relative error {err:.2e} > {tol}"


def _seq(data, prefix):
  return [data[f"{prefix}/{k}"] for k in range(len([n for n in data if n.startswith(prefix + "/")]))]


def test_kl_vae_parity_with_official():
  sd, data = _load("kl_vae")
  model = conv.build("kl_vae", KL_CONFIG, abstract=True)
  report = conv.load_state_dict(model, sd)
  assert report.missing == [] and report.unexpected == []
  x = jnp.asarray(nhwc(data["x"]))

  @nnx.jit
  def run(m, x, noise, z_ref):
    moments = m.encode_moments(x)
    post = m.encode(x)
    return moments, post, post.sample(None, noise=noise), post.kl(), m.decode(z_ref)

  moments, post, z, kl, rec = run(model, x, jnp.asarray(nhwc(data["noise"])), jnp.asarray(nhwc(data["z"])))
  assert_rel(moments, nhwc(data["moments"]))
  assert_rel(post.mean, nhwc(data["mean"]))
  assert_rel(post.logvar, nhwc(data["logvar"]))
  assert_rel(z, nhwc(data["z"]))
  assert_rel(kl, data["kl"])
  assert_rel(rec, nhwc(data["rec"]))


def test_vq_pyramid_parity_with_official():
  sd, data = _load("vq_pyramid")
  model = conv.build("vq_pyramid", VQ_CONFIG, abstract=True)
  report = conv.load_state_dict(model, sd)
  assert report.missing == [] and report.unexpected == []
  x = jnp.asarray(nhwc(data["x"]))
  f_ref = jnp.asarray(nhwc(data["f"]))  # quantize the official f so index parity is tested on equal inputs
  want_idx = [jnp.asarray(i) for i in _seq(data, "idx")]

  @nnx.jit
  def run(m, x, f_ref, want_idx):
    return (m.encode_f(x), m.quantize.f_to_indices(f_ref), m.quantize.f_to_fhats(f_ref),
            m.quantize.next_scale_inputs(want_idx), m.indices_to_img(want_idx), m.decode_unclamped(f_ref))

  f, idx, fhats, inputs, img, dec = run(model, x, f_ref, want_idx)
  assert_rel(f, nhwc(data["f"]))
  for got, want in zip(idx, _seq(data, "idx"), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)
  for got, want in zip(fhats, _seq(data, "fhat"), strict=True):
    assert_rel(got, nhwc(want))
  assert_rel(inputs, data["next_scale_inputs"])
  assert_rel(img, nhwc(data["img"]))
  assert_rel(dec, nhwc(data["dec_of_f"]))


def test_vq_training_forward_parity_loss_and_gradients():
  sd, data = _load("vq_pyramid")
  model = conv.build("vq_pyramid", VQ_CONFIG, abstract=True)
  conv.load_state_dict(model, sd)
  q = model.quantize
  f, g = jnp.asarray(nhwc(data["f"])), jnp.asarray(nhwc(data["train/g"]))
  graphdef, params, rest = nnx.split(q, nnx.Param, ...)

  def objective(p, f):
    o = nnx.merge(graphdef, p, rest)(f)
    return o.loss + jnp.sum(o.f_hat * g)

  out, (grad_p, grad_f) = jax.jit(lambda p, f: (nnx.merge(graphdef, p, rest)(f),
                                                jax.grad(objective, argnums=(0, 1))(p, f)))(params, f)
  assert_rel(out.f_hat, nhwc(data["train/f_hat"]))
  assert_rel(out.loss, data["train/loss"])
  assert_rel(grad_f, nhwc(data["train/grad_f"]))
  assert_rel(grad_p["embedding"]["embedding"][...], data["train/grad_embedding"])
  for k in (0, 3):
    assert_rel(grad_p["phi"][k]["conv"]["kernel"][...], np.transpose(data[f"train/grad_phi{k}"], (2, 3, 1, 0)))


@pytest.mark.parametrize("res", [256, 512])
def test_quantizer_parity_on_published_layouts(res):
  sd, data = _load(f"vq_quant{res}")
  q = nnx.eval_shape(lambda: vq.ResidualQuantizer(vq.var_vqvae_config(res).replace(vocab_size=64, z_channels=4),
                                                  rngs=nnx.Rngs(0)))
  report = conv.load_state_dict(q, sd, prefix="quantize.")
  assert report.missing == [] and report.unexpected == []
  f = jnp.asarray(nhwc(data["f"]))
  want_idx = [jnp.asarray(i) for i in _seq(data, "idx")]
  # One jit for the three paths: compiling once is faster than dispatching every resize eagerly.
  idx, fhats, inputs = nnx.jit(lambda q, f, i: (q.f_to_indices(f), q.f_to_fhats(f), q.next_scale_inputs(i)))(
      q, f, want_idx)
  for got, want in zip(idx, _seq(data, "idx"), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)
  for got, want in zip(fhats, _seq(data, "fhat"), strict=True):
    assert_rel(got, nhwc(want))
  assert inputs.shape[1] == {256: 679, 512: 2239}[res]
  assert_rel(inputs, data["next_scale_inputs"])


def test_converter_errors_name_keys_and_shapes():
  sd, _ = _load("kl_vae")
  model = conv.build("kl_vae", KL_CONFIG, abstract=True)
  bad = dict(sd)
  bad["decoder.conv_in.weight"] = np.zeros((64, 5, 3, 3), np.float32)
  with pytest.raises(conv.CheckpointMismatchError,
                     match=r"'decoder.conv_in.weight' has shape \(64, 5, 3, 3\).*expects \(3, 3, 4, 64\)"):
    conv.load_state_dict(model, bad)
  partial = {k: v for k, v in sd.items() if not k.startswith("encoder.norm_out")}
  partial["loss.logvar"] = np.zeros((), np.float32)
  with pytest.raises(conv.CheckpointMismatchError) as e:
    conv.load_state_dict(conv.build("kl_vae", KL_CONFIG, abstract=True), partial)
  assert "encoder.norm_out.scale" in str(e.value) and "encoder.norm_out.bias" in str(e.value)
  assert "loss.logvar" in str(e.value)
  # Non-strict: unexpected keys are listed, not fatal.
  extra = dict(sd, **{"loss.logvar": np.zeros((), np.float32)})
  report = conv.load_state_dict(conv.build("kl_vae", KL_CONFIG, abstract=True), extra, strict=False)
  assert report.unexpected == ["loss.logvar"] and report.missing == []
  with pytest.raises(FileNotFoundError, match="does not exist"):
    conv.load_torch_state_dict("/nonexistent/kl16.ckpt")


def test_torch_checkpoint_safe_load_and_orbax_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  sd, data = _load("vq_pyramid")
  ckpt = tmp_path / "vae.pth"
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, ckpt)
  out_dir = tmp_path / "converted"
  conv.convert_checkpoint(str(ckpt), str(out_dir), kind="vq_pyramid", config=VQ_CONFIG, strict=True)
  model, meta = conv.load_tokenizer(str(out_dir))
  assert meta["kind"] == "vq_pyramid" and meta["num_params"] == vq.count_params(model)
  assert len(meta["fingerprint"]) == 64
  f = jnp.asarray(nhwc(data["f"]))
  for got, want in zip(model.quantize.f_to_indices(f), _seq(data, "idx")):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert conv.fingerprint(model) == meta["fingerprint"]
  with pytest.raises(FileExistsError, match="already exists"):
    conv.convert_checkpoint(str(ckpt), str(out_dir), kind="vq_pyramid", config=VQ_CONFIG)
  # "model"-wrapped checkpoints (MAR's kl16.ckpt layout) are unwrapped.
  wrapped = tmp_path / "kl.ckpt"
  kl_sd, _ = _load("kl_vae")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in kl_sd.items()}}, wrapped)
  assert set(conv.load_torch_state_dict(str(wrapped))) == set(kl_sd)
  # Pickles with arbitrary objects are refused (weights_only=True).
  evil = tmp_path / "evil.pth"
  torch.save({"model": {"w": torch.zeros(1)}, "obj": _Arbitrary()}, evil)
  with pytest.raises(ValueError, match="weights_only=True"):
    conv.load_torch_state_dict(str(evil))


class _Arbitrary:
  pass


def test_convert_main_cli(tmp_path):
  sd, _ = _load("kl_vae")
  npz = tmp_path / "kl.npz"
  np.savez(npz, **sd)
  with pytest.raises(conv.CheckpointMismatchError, match="expects"):  # tiny weights do not fit kl16
    conv.convert_main(["--preset", "kl16", "--src", str(npz), "--out", str(tmp_path / "o")])
  with pytest.raises(SystemExit):
    conv.convert_main(["--preset", "kl32", "--src", str(npz), "--out", str(tmp_path / "o")])


def test_lpips_parity_with_official():
  """Official LPIPS v0.1 (VGG) at NumPy-seeded random weights (tests/fixtures/make_tokenizers.py)."""
  from himar_jax.tokenizers import lpips
  _, data = _load("lpips")
  vgg, lin = lpips.random_state_dicts(int(data["seed"]))
  model = lpips.load_state_dicts(nnx.eval_shape(lpips.LPIPS), vgg, lin)
  assert vq.count_params(model) == 0  # frozen: nothing for an optimizer
  d = nnx.jit(lambda m, a, b: m(a, b))(model, jnp.asarray(nhwc(data["x0"])), jnp.asarray(nhwc(data["x1"])))
  assert_rel(d, data["d"].reshape(-1))
  bad = dict(vgg, **{"features.0.weight": np.zeros((64, 1, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"'features.0.weight' has shape \(64, 1, 3, 3\), expected \(64, 3, 3, 3\)"):
    lpips.load_state_dicts(nnx.eval_shape(lpips.LPIPS), bad, lin)
