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


def save_random_checkpoint(config, out_dir: str, seed: int = 0, buffers_from=None, std: float = 0.05) -> str:
  """A random model of `config` as an orbax checkpoint <out_dir>/0/state (params = ema_params), drawn on the host
  (no eager init to compile): every parameter N(0, std^2), norm scales 1 + N(0, std^2), so that even the
  zero-initialised head outputs depend on the condition, as a trained model's do. buffers_from: the VQ pyramid
  whose codebook / phi convs a next_scale generator holds; other buffers are zero."""
  import orbax.checkpoint as ocp
  abstract = nnx.eval_shape(lambda: models.model_fn(config)(nnx.Rngs(0)))
  _, params, buffers = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)

  def draw(path, a):
    base = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
    return (base + std * rng.standard_normal(a.shape)).astype(a.dtype)

  params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params))
  known = {}
  if buffers_from is not None:
    known = {("vq",) + tuple(p): np.asarray(v.get_value())
             for p, v in nnx.to_flat_state(nnx.state(buffers_from.quantize, nnx.Param))}
  tree = {}
  for path, var in nnx.to_flat_state(buffers):
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = known.get(tuple(path), np.zeros(var.get_value().shape, var.get_value().dtype))
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "0", "state"), {"params": params, "ema_params": params, "buffers": tree,
                                                      "step": jnp.asarray(0, jnp.int32)})
  return out_dir


@pytest.fixture(scope="session")
def himar_setup(tmp_path_factory):
  """himar_tiny (one block per stack, to compile fast) on 8x8x4 latents + a random tiny gray KL VAE (stride 2:
  16 px images). Also used by test_editing.py."""
  from configs.himar import get_config
  root = tmp_path_factory.mktemp("himar")
  kind, tcfg = tokenizers.preset("kl_tiny_gray")
  tok = tokenizers.build(kind, tcfg, host_init=True, seed=0)
  conv.save_tokenizer(tok, kind, str(root / "tok"))
  config = get_config("himar_tiny")
  m = config.model
  m.token_dim, m.grid_size, m.lowres_grid = 4, 8, 4
  m.encoder_depth = m.decoder_depth = m.head_depth = m.dit_depth = 1
  m.encoder_buckets = 1
  m.num_sampling_steps = m.dit_sampling_steps = "2"
  m.num_iter, m.cfg, m.re_cfg = 2, 2.0, 2.0
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


def test_decoders_describe_their_images(himar_setup, hmar_setup):
  config, _, _, _ = himar_setup
  dec = sampling.load_image_decoder(config)
  assert dec.kind == "kl_vae" and dec.image_shape == (16, 16, 1)
  assert dec.fingerprint == conv.read_metadata(config.tokenizer.checkpoint)["fingerprint"]
  config, _, _, _ = hmar_setup
  dec = sampling.load_image_decoder(config)
  assert dec.kind == "vq_pyramid" and dec.image_shape == (8, 8, 1) and dec.patch_nums == (1, 2, 3, 4)
  with pytest.raises(ValueError, match=r"must be \(B, 30\)"):
    dec(np.zeros((2, 29), np.int32))
  from configs.quickstart import get_config
  pixel = get_config("tiny")
  ident = sampling.load_image_decoder(pixel)
  x = np.zeros((1, 32, 32, 1), np.float32)
  assert ident.kind == "identity" and ident.image_shape == (32, 32, 1) and ident(x) is x and ident.key is None


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
  grid, rows = sample_cli.class_grid(images, np.asarray([3, 7, 3, 7, 3]), columns=2, rows=1)
  assert rows.tolist() == [3] and grid.shape == (1, 2, 2, 2, 1)


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
  """Images from sample_batches(decoder=) (decoded inside the sharded sampler, 8 devices) equal the tokenizers' own
  decode of the undecoded samples: KL latents / scale_factor, VQ indices split per scale."""
  from himar_jax.parallel import mesh as mesh_lib
  from himar_jax.train.state import split_model
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  labels = np.asarray([3, 7, 3, 1, 0])
  kl = lambda tok, x: jnp.clip(tok.decode(x / tok.config.scale_factor), -1, 1)
  vq = lambda tok, x: tok.indices_to_img([x[:, :1], x[:, 1:5], x[:, 5:14], x[:, 14:]])
  for (config, tok, _, _), indices, reference in ((himar_setup, False, kl), (hmar_setup, True, vq)):
    graphdef, params, _ = split_model(StubGenerator(indices))
    restored = sampling.RestoredModel(graphdef, sampling._replicate(nnx.to_pure_dict(params), mesh), {}, mesh)
    decoder = sampling.load_image_decoder(config, mesh=mesh)
    raw = sampling.sample_batches(restored, labels, seed=3, batch_size=8, scale=0.5)
    images = sampling.sample_batches(restored, labels, seed=3, batch_size=8, decoder=decoder, scale=0.5)
    assert images.shape == (5,) + decoder.image_shape
    np.testing.assert_allclose(images, np.asarray(jax.jit(lambda x: reference(tok, x))(raw)), atol=1e-5)


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
  import types
  calls = []
  fake = types.SimpleNamespace(sample_from_prompts=lambda *a, **k: calls.append((a, k)) or "grid.png")
  monkeypatch.setitem(sys.modules, "himar_jax.text.sampling", fake)
  import himar_jax.text
  monkeypatch.setattr(himar_jax.text, "sampling", fake, raising=False)
  assert sample_cli.sample_prompts("cfg", "ck", str(prompts), "out", per_prompt=3, seed=5) == "grid.png"
  assert calls == [(("cfg", "ck", str(prompts), "out"), {"per_prompt": 3, "seed": 5})]
  monkeypatch.delattr(himar_jax.text, "sampling")
  monkeypatch.setitem(sys.modules, "himar_jax.text.sampling", None)  # import fails as if absent
  with pytest.raises(RuntimeError, match="text-to-image family"):
    sample_cli.sample_prompts(None, "ck", str(prompts), str(tmp_path), per_prompt=1, seed=0)


def test_sample_verb_with_overrides(tmp_path):
  """The CLI end to end on the pixel quickstart (no tokenizer): --labels, --num, a sampler override."""
  from configs.quickstart import get_config
  save_random_checkpoint(get_config("tiny"), str(tmp_path / "ckpt"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "himar_jax", "sample", "--config=configs/quickstart.py:tiny",
                        "--config.model.cfg=2.5", "--config.model.num_sampling_steps=2",
                        "--config.model.num_iter=2",
                        f"--checkpoint={tmp_path / 'ckpt'}", "--num=2", "--labels=9", f"--out={tmp_path / 's'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  meta = json.load(open(tmp_path / "s" / "samples.json"))
  assert meta["sample_kwargs"]["cfg"] == 2.5 and meta["labels"] == [9, 9] and meta["family"] == "pixel_mar"
  with np.load(tmp_path / "s" / "samples_2x32x32x1.npz") as f:
    assert f["arr_0"].shape == (2, 32, 32, 1)


def test_evaluate_generates_decoded_latent_samples(himar_setup):
  """evaluate's chunked generation decodes latent families too, and its samples are the `sample` verb's (same seed
  and indices)."""
  from himar_jax.evaluation import evaluate as ev
  config, _, ckpt, root = himar_setup
  images, labels = ev.generate_samples(config, ckpt, str(root / "eval"), num=3, step=0, progress=False)
  assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8 and labels.tolist() == [0, 1, 2]
  summary = sample_cli.sample(config, ckpt, str(root / "same"), num=3, seed=int(config.sample.seed), progress=False)
  with np.load(summary["sample_batch"]) as f:
    np.testing.assert_array_equal(f["arr_0"], images)
  manifest = json.load(open(root / "eval" / "chunks" / "manifest.json"))
  assert manifest["tokenizer_fingerprint"] == conv.read_metadata(config.tokenizer.checkpoint)["fingerprint"][:16]


def test_next_scale_decoder_from_an_official_layout_file(tmp_path):
  """config.tokenizer.checkpoint may be VAR's VQ-VAE file itself (here an .npz of the official keys, from the
  tokenizer fixtures) when config.tokenizer names the architecture (preset + arch)."""
  import ml_collections
  from configs.next_scale import get_config
  with np.load(os.path.join(REPO, "tests", "fixtures", "tokenizers", "vq_pyramid.npz")) as f:
    sd = {k[3:]: f[k].astype(np.float32) for k in f.files if k.startswith("sd/")}
  np.savez(tmp_path / "vae.npz", **sd)
  config = get_config("hmar_tiny")
  config.model.vocab_size, config.model.z_channels, config.model.patch_nums = 64, 8, (1, 2, 3, 4, 6, 8)
  arch = tokenizers.arch_overrides("vq_pyramid")
  arch.norm_groups = 32
  config.tokenizer = ml_collections.ConfigDict({"config": "", "preset": "vq_tiny", "arch": arch,
                                                "checkpoint": str(tmp_path / "vae.npz")})
  dec = sampling.load_image_decoder(config)
  assert dec.kind == "vq_pyramid" and dec.image_shape == (16, 16, 3)
  np.testing.assert_array_equal(np.asarray(dec.state["quantize"]["embedding"]["embedding"]),
                                sd["quantize.embedding.weight"])
  config.tokenizer.preset = ""
  with pytest.raises(ValueError, match="is a file: set config.tokenizer.config"):
    sampling.load_image_decoder(config)


def test_place_for_sampling_puts_params_by_their_logical_axes():
  """An in-memory model placed as restore_model_for_sampling places a checkpoint: params sharded by the rules
  table, the module round trip unchanged."""
  from configs.quickstart import get_config
  from himar_jax.parallel import mesh as mesh_lib, sharding
  from himar_jax.train.state import split_model
  model = models.model_fn(get_config("tiny"))(nnx.Rngs(0))
  mesh = mesh_lib.make_mesh((2, 4, 1))  # fsdp 4: some params are split
  restored = sampling.place_for_sampling(model, mesh)
  _, params, _ = split_model(model)
  want = sharding.param_shardings(params, mesh)
  got = jax.tree.map(lambda a: a.sharding, restored.params)
  assert jax.tree.leaves(got) == jax.tree.leaves(want)
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(got))
  for a, b in zip(jax.tree.leaves(nnx.state(restored.module(), nnx.Param)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
