"""Latent -> image decoding for sampling (sampling.load_image_decoder) and the `sample` verb (sample_cli)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from himar_jax import models, sample_cli, sampling, tokenizers
from himar_jax.convert import tokenizers as conv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# next_scale tiny: vocab 16, z 4, patch_nums (1, 2, 3, 4); a stride-2 gray VQ pyramid decodes it to 8x8 images.
VQ_TINY = tokenizers.vq_pyramid.tiny_config(1, vocab_size=16, z_channels=4, patch_nums=(1, 2, 3, 4))


def save_random_checkpoint(config, out_dir: str, seed: int = 0, buffers_from=None, jitter: float = 0.0) -> str:
  """A randomly initialised model of `config` as an orbax checkpoint <out_dir>/0/state (params = ema_params).
  jitter > 0 adds N(0, jitter^2) to every parameter, so zero-initialised output layers (the diffusion heads')
  make the outputs depend on the condition, as a trained model's do."""
  import orbax.checkpoint as ocp
  model = models.model_fn(config)(nnx.Rngs(seed))
  if buffers_from is not None:  # next_scale: the generator holds the tokenizer's codebook and phi convs
    from himar_jax.models.next_scale import load_tokenizer
    load_tokenizer(model, buffers_from)
  _, params, buffers = nnx.split(model, nnx.Param, ...)
  params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
  if jitter:
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    params = jax.tree.unflatten(treedef, [x + jitter * rng.standard_normal(x.shape).astype(np.float32)
                                          for x in leaves])
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "0", "state"), {"params": params, "ema_params": params, "buffers": buffers,
                                                      "step": jnp.asarray(0, jnp.int32)})
  return out_dir


@pytest.fixture(scope="module")
def himar_setup(tmp_path_factory):
  """himar_tiny on 8x8x4 latents + a random tiny gray KL VAE (stride 2: 16 px images)."""
  from configs.himar import get_config
  root = tmp_path_factory.mktemp("himar")
  kind, tcfg = tokenizers.preset("kl_tiny_gray")
  tok = tokenizers.build(kind, tcfg, host_init=True, seed=0)
  conv.save_tokenizer(tok, kind, str(root / "tok"))
  config = get_config("himar_tiny")
  m = config.model
  m.token_dim, m.grid_size, m.lowres_grid = 4, 8, 4
  m.num_sampling_steps = m.dit_sampling_steps = "2"
  m.num_iter = 2
  config.tokenizer.checkpoint = str(root / "tok")
  save_random_checkpoint(config, str(root / "ckpt"))
  return config, tok, str(root / "ckpt"), root


@pytest.fixture(scope="module")
def hmar_setup(tmp_path_factory):
  from configs.next_scale import get_config
  root = tmp_path_factory.mktemp("hmar")
  vq = tokenizers.build("vq_pyramid", VQ_TINY, host_init=True, seed=1)
  conv.save_tokenizer(vq, "vq_pyramid", str(root / "vq"))
  config = get_config("hmar_tiny")
  config.tokenizer.checkpoint = str(root / "vq")
  save_random_checkpoint(config, str(root / "ckpt"), buffers_from=vq)
  return config, vq, str(root / "ckpt"), root


def test_decoders_equal_the_tokenizers_own_decode(himar_setup, hmar_setup):
  config, tok, _, _ = himar_setup
  dec = sampling.load_image_decoder(config)
  assert dec.image_shape == (16, 16, 1) and dec.fingerprint == conv.read_metadata(config.tokenizer.checkpoint)[
      "fingerprint"]
  latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32) * 3
  ref = np.clip(np.asarray(tok.decode(latents / tok.config.scale_factor)), -1, 1)
  np.testing.assert_allclose(np.asarray(dec(latents)), ref, atol=1e-5)
  config, vq, _, _ = hmar_setup
  dec = sampling.load_image_decoder(config)
  idx = np.random.default_rng(1).integers(0, 16, (2, 30)).astype(np.int32)
  scales = [idx[:, :1], idx[:, 1:5], idx[:, 5:14], idx[:, 14:]]
  np.testing.assert_allclose(np.asarray(dec(idx)), np.asarray(vq.indices_to_img(scales)), atol=1e-5)
  with pytest.raises(ValueError, match=r"must be \(B, 30\)"):
    dec(idx[:, :29])
  from configs.quickstart import get_config
  pixel = get_config("tiny")
  ident = sampling.load_image_decoder(pixel)
  assert ident.kind == "identity" and ident.image_shape == (32, 32, 1) and ident(latents) is latents


def test_tokenizer_errors_name_the_field_and_the_fix(himar_setup, hmar_setup, tmp_path):
  config, _, _, _ = himar_setup
  c = config.copy_and_resolve_references()
  c.tokenizer.checkpoint = ""
  with pytest.raises(ValueError, match=r"config.tokenizer.checkpoint is empty.*convert --config=configs/kl_vae.py"):
    sampling.load_image_decoder(c)
  c.tokenizer.checkpoint = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="does not exist.*convert"):
    sampling.load_image_decoder(c)
  os.makedirs(tmp_path / "empty")
  c.tokenizer.checkpoint = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="empty directory"):
    sampling.load_image_decoder(c)
  (tmp_path / "notatok").mkdir()
  (tmp_path / "notatok" / "x").write_text("")
  c.tokenizer.checkpoint = str(tmp_path / "notatok")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    sampling.load_image_decoder(c)
  c = config.copy_and_resolve_references()
  c.model.token_dim = 16
  with pytest.raises(ValueError, match="4 latent channels but config.model.token_dim=16"):
    sampling.load_image_decoder(c)
  c = config.copy_and_resolve_references()
  c.tokenizer.config = "configs/kl_vae.py:kl16"
  with pytest.raises(ValueError, match="but config.tokenizer.config='configs/kl_vae.py:kl16' names kl_vae"):
    sampling.load_image_decoder(c)
  c = config.copy_and_resolve_references()
  c.tokenizer.checkpoint = hmar_setup[0].tokenizer.checkpoint
  with pytest.raises(ValueError, match="holds a vq_pyramid tokenizer; config.model.family='himar' needs a kl_vae"):
    sampling.load_image_decoder(c)
  # next_scale: the tokenizer must carry the generator's codebook
  config, _, ckpt, _ = hmar_setup
  restored = sampling.restore_model_for_sampling(config, ckpt)
  other = tokenizers.build("vq_pyramid", VQ_TINY, host_init=True, seed=7)
  conv.save_tokenizer(other, "vq_pyramid", str(tmp_path / "vq_other"))
  c = config.copy_and_resolve_references()
  c.tokenizer.checkpoint = str(tmp_path / "vq_other")
  with pytest.raises(ValueError, match="codebook of config.tokenizer.checkpoint"):
    sampling.load_image_decoder(c, restored)


def test_labels_and_grid_helpers():
  assert sample_cli.parse_labels("3,7", 10).tolist() == [3, 7]
  assert sample_cli.parse_labels(None, 10) is None
  with pytest.raises(ValueError, match=r"\[10\] outside \[0, 10\)"):
    sample_cli.parse_labels("3,10", 10)
  with pytest.raises(ValueError, match="comma-separated"):
    sample_cli.parse_labels("3;7", 10)
  assert sample_cli.sample_labels(None, None, num_classes=3, per_class=2).tolist() == [0, 1, 2, 0, 1, 2]
  assert sample_cli.sample_labels(5, np.asarray([3, 7]), num_classes=10, per_class=2).tolist() == [3, 7, 3, 7, 3]
  images = np.arange(5)[:, None, None, None].astype(np.uint8) * np.ones((5, 2, 2, 1), np.uint8)
  grid, rows = sample_cli.class_grid(images, np.asarray([3, 7, 3, 7, 3]))
  assert rows.tolist() == [3, 7] and grid.shape == (2, 3, 2, 2, 1)
  assert grid[0, :, 0, 0, 0].tolist() == [0, 2, 4] and grid[1, :, 0, 0, 0].tolist() == [1, 3, 255]


class StubGenerator(nnx.Module):
  """A cheap stand-in for a generator: sample() returns KL latents (B, 8, 8, 4) or VQ indices (B, 30) drawn from
  the row keys (compiles in a moment; the real samplers are tested in test_himar / test_next_scale)."""

  def __init__(self, indices: bool):
    self.indices = indices
    self.offset = nnx.Param(jnp.linspace(-1.0, 1.0, 8 * 8 * 4).reshape(8, 8, 4))

  def sample(self, labels, *, keys, scale=1.0):
    if self.indices:
      return jax.vmap(lambda k: jax.random.randint(k, (30,), 0, 16))(keys)
    noise = jax.vmap(lambda k: jax.random.normal(k, (8, 8, 4)))(keys)
    return scale * (noise + self.offset[...] + labels[:, None, None, None].astype(jnp.float32))


def test_sample_batches_decode_inside_the_sampler(himar_setup, hmar_setup):
  """Images from sample_batches(decoder=) equal the decoder applied to the undecoded samples, on 8 devices."""
  from himar_jax.parallel import mesh as mesh_lib
  from himar_jax.train.state import split_model
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  labels = np.asarray([3, 7, 3, 1, 0])
  for (config, _, _, _), indices in ((himar_setup, False), (hmar_setup, True)):
    graphdef, params, buffers = split_model(StubGenerator(indices))
    restored = sampling.RestoredModel(graphdef, sampling._replicate(nnx.to_pure_dict(params), mesh), {}, mesh)
    decoder = sampling.load_image_decoder(config, mesh=mesh)
    raw = sampling.sample_batches(restored, labels, seed=3, batch_size=8, scale=0.5)
    images = sampling.sample_batches(restored, labels, seed=3, batch_size=8, decoder=decoder, scale=0.5)
    assert images.shape == (5,) + decoder.image_shape
    np.testing.assert_allclose(images, np.asarray(decoder(raw)), atol=1e-5)


def test_sample_writes_pngs_grid_and_adm_batch(himar_setup):
  config, tok, ckpt, root = himar_setup
  out = str(root / "samples")
  summary = sample_cli.sample(config, ckpt, out, num=3, labels="3,7", seed=4, progress=False)
  with np.load(summary["sample_batch"]) as f:
    images, labels = f["arr_0"], f["arr_1"]
  assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 1) and labels.tolist() == [3, 7, 3]
  assert sorted(os.listdir(os.path.join(out, "images"))) == ["000000_class3.png", "000001_class7.png",
                                                             "000002_class3.png"]
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, "images", "000001_class7.png"))),
                                images[1, ..., 0])
  grid = np.asarray(Image.open(summary["grid"]))
  assert grid.shape[0] == 2 * (16 * 2 + 2) + 2  # one row per class (3, 7)
  meta = json.load(open(os.path.join(out, "samples.json")))
  assert meta["step"] == 0 and meta["seed"] == 4 and meta["labels"] == [3, 7, 3] and meta["family"] == "himar"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sample_cli.sample(config, str(root / "nope"), out, num=1)


def test_prompts_without_the_text_family_is_a_clear_error(tmp_path, monkeypatch):
  prompts = tmp_path / "p.txt"
  prompts.write_text("a cat\n")
  with pytest.raises(FileNotFoundError, match="one prompt a line"):
    sample_cli.sample_prompts(None, "ck", str(tmp_path / "none.txt"), str(tmp_path), per_prompt=1, seed=0)
  monkeypatch.setitem(sys.modules, "himar_jax.text.sampling", None)  # import fails as if absent
  with pytest.raises((RuntimeError, ImportError), match="text"):
    sample_cli.sample_prompts(None, "ck", str(prompts), str(tmp_path), per_prompt=1, seed=0)


def test_sample_verb_with_overrides(tmp_path):
  """The CLI end to end on the pixel quickstart (no tokenizer): --labels, --num, a sampler override."""
  from configs.quickstart import get_config
  save_random_checkpoint(get_config("tiny"), str(tmp_path / "ckpt"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "himar_jax", "sample", "--config=configs/quickstart.py:tiny",
                        "--config.model.cfg=2.5", "--config.model.num_sampling_steps=2",
                        f"--checkpoint={tmp_path / 'ckpt'}", "--num=2", "--labels=9", f"--out={tmp_path / 's'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  meta = json.load(open(tmp_path / "s" / "samples.json"))
  assert meta["sample_kwargs"]["cfg"] == 2.5 and meta["labels"] == [9, 9] and meta["family"] == "pixel_mar"
  with np.load(tmp_path / "s" / "samples_2x32x32x1.npz") as f:
    assert f["arr_0"].shape == (2, 32, 32, 1)
