"""Restore EMA params onto any mesh and sample, batched over all devices (one jitted call per batch shape)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from himar_jax import models
from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
from himar_jax.train import checkpoint as ckpt_lib
from himar_jax.train.state import split_model


@dataclasses.dataclass
class RestoredModel:
  graphdef: Any
  params: Any
  buffers: Any
  mesh: Mesh

  def module(self) -> nnx.Module:
    return nnx.merge(self.graphdef, nnx.State(self.params), nnx.State(self.buffers))


def restore_model_for_sampling(config, checkpoint_dir: str, *, mesh: Mesh | None = None, step: int | None = None,
                               which: str = "ema_params") -> RestoredModel:
  """EMA (or raw) params of a checkpoint, placed with the config's logical-axis shardings on `mesh`
  (default: every device, data parallel)."""
  if which not in ("ema_params", "params"):
    raise ValueError(f"which={which!r} must be 'ema_params' or 'params'.")
  mesh = mesh or mesh_lib.make_mesh((-1, 1, 1))
  abstract_model = nnx.eval_shape(lambda: models.model_fn(config)(nnx.Rngs(0)))
  graphdef, abstract_params, abstract_buffers = split_model(abstract_model)
  pure_shardings, repl = _placement(abstract_params, mesh)
  abstract = {
      which: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_params), pure_shardings),
      "buffers": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                              nnx.to_pure_dict(abstract_buffers)),
  }
  restored = ckpt_lib.restore_subtrees(checkpoint_dir, abstract, step=step)
  return RestoredModel(graphdef, restored[which], restored["buffers"], mesh)


def place_for_sampling(model: nnx.Module, mesh: Mesh | None = None) -> RestoredModel:
  """An in-memory model placed on `mesh` (default: every device, data parallel) as restore_model_for_sampling
  places a checkpoint's (e.g. random weights for a benchmark)."""
  mesh = mesh or mesh_lib.make_mesh((-1, 1, 1))
  graphdef, params, buffers = split_model(model)
  pure_shardings, repl = _placement(params, mesh)
  return RestoredModel(graphdef, jax.device_put(nnx.to_pure_dict(params), pure_shardings),
                       jax.device_put(nnx.to_pure_dict(buffers), repl), mesh)


def _placement(params, mesh: Mesh):
  """(the params' shardings as a pure dict, the buffers' sharding) for sampling on `mesh`: params by their logical
  axes, buffers replicated."""
  return sharding_lib.param_shardings(params, mesh), sharding_lib.replicated(mesh)


def config_and_checkpoint(flags, verb: str):
  """(config, checkpoint folder) of a verb that restores a model: --config, and --checkpoint or
  <--workdir>/checkpoints; usage errors name what is missing."""
  from absl import app

  from himar_jax.train import loop
  if flags.config is None:
    raise app.UsageError(f"`{verb}` needs --config=configs/<family>.py:<variant>.")
  checkpoint = flags.checkpoint or (loop.checkpoint_dir(flags.workdir) if flags.workdir else None)
  if not checkpoint:
    raise app.UsageError(f"`{verb}` needs --checkpoint=DIR (a training workdir's checkpoints folder or a `convert` "
                         "output) or --workdir=DIR.")
  return flags.config, checkpoint


@functools.lru_cache(maxsize=16)
def _sampler(graphdef, sample_kwargs: tuple, decoder_key=None, mesh: Mesh | None = None):
  """One jitted sampler per (model structure, sampler settings, decoder, mesh): repeated calls (evaluation chunks,
  grids) reuse the compiled program instead of tracing a new closure each time. With a decoder the samples are
  decoded into images in the same program (sharded like the batch).

  The program is traced under `mesh` (jax.sharding.use_abstract_mesh), as the train step is: activations stay
  pinned to the batch sharding (sharding.constrain) and the Pallas kernels run on each device's rows
  (sharding.per_shard). Without it, XLA's partitioner all-gathers a kernel's operands and every device computes
  the whole global batch in it."""
  kwargs = dict(sample_kwargs)

  @jax.jit
  def sample(params, buffers, decoder_state, labels, keys):
    with sharding_lib.use_mesh_for_tracing(mesh):
      model = nnx.merge(graphdef, nnx.State(params), nnx.State(buffers))
      return decode_outputs(decoder_key, decoder_state, model.sample(labels, keys=keys, **kwargs))

  return sample


def _to_host(x) -> np.ndarray:
  """The whole global array on every process (a multi-host array has shards this process cannot read)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sample_batches(restored: RestoredModel, labels: np.ndarray, *, seed: int, batch_size: int | None = None,
                   start_index: int = 0, decoder: ImageDecoder | None = None, progress: bool = False,
                   **sample_kwargs) -> np.ndarray:
  """Samples one output per label (class id, or any per-sample condition array such as a text context) with
  model.sample(labels, keys=...), in global batches sharded over the mesh:
  the model's outputs (latents, token indices or pixel_mar images), or with `decoder` (load_image_decoder)
  images in [-1, 1].

  Sample i (counted from `start_index`) uses key fold_in(key(seed), start_index + i), so a sample depends only on
  (seed, its index), not on the batch or chunk it was drawn in, as long as the model draws per-row randomness
  from its row key. Every process passes the same labels and gets all samples back. progress: a tqdm bar over
  the batches (process 0).
  """
  labels = np.asarray(labels)
  if labels.dtype.kind in "iub":  # class labels; other conditions (text contexts (N, L, D)) pass as they are
    labels = labels.astype(np.int32)
  n_dev = sharding_lib.data_parallel_size(restored.mesh)
  batch_size = batch_size or max(n_dev, min(len(labels), 64))
  batch_size = -(-batch_size // n_dev) * n_dev
  batch_sh = sharding_lib.batch_sharding(restored.mesh, 1)
  decoder_key = None if decoder is None else decoder.key
  decoder_state = None if decoder is None else decoder.state
  sample = _sampler(restored.graphdef, tuple(sorted(sample_kwargs.items())), decoder_key, restored.mesh)
  base = jax.random.key(seed)
  out = []
  starts = range(0, len(labels), batch_size)
  if progress and jax.process_index() == 0:  # one tick per global batch
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc="sampling", unit="batch")
  for start in starts:
    chunk = labels[start:start + batch_size]
    n = len(chunk)
    padded = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    first = start_index + start
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(first, first + batch_size))
    images = sample(restored.params, restored.buffers, decoder_state, jax.device_put(padded, batch_sh),
                    jax.device_put(keys, batch_sh))
    out.append(_to_host(images)[:n])
  return np.concatenate(out)


def sample_class_grid(restored: RestoredModel, config, *, num_classes: int, per_class: int, seed: int,
                      decoder: ImageDecoder | None = None) -> np.ndarray:
  """(num_classes, per_class, H, W, C) images in [-1, 1], row r of class r; latent families are decoded with
  `decoder` (default: load_image_decoder(config, restored))."""
  decoder = decoder or load_image_decoder(config, restored)
  labels = np.repeat(np.arange(num_classes), per_class)
  images = sample_batches(restored, labels, seed=seed, decoder=decoder,
                          **models.family_module(config).sample_kwargs(config))
  return images.reshape((num_classes, per_class) + images.shape[1:])


# ---- generator outputs -> images (the tokenizer's decoder) ----------------------------------------------------
# Which tokenizer kind decodes each family's samples; pixel_mar samples are images already.
TOKENIZER_KINDS = {"mar": "kl_vae", "himar": "kl_vae", "himar_t2i": "kl_vae", "next_scale": "vq_pyramid"}
_MAKE_TOKENIZER = ("make one with `python -m himar_jax convert --config=configs/{cfg}:<variant> "
                   "--config.convert.src=<official checkpoint | train:<tokenizer training workdir>> --workdir=DIR` "
                   "(train a tokenizer first with `python -m himar_jax train --config=configs/{cfg}:<variant>`)")


def load_config_spec(spec: str):
  """`path/to/config.py[:variant]` -> that file's get_config(variant); the path is read relative to the working
  directory, else to the repository root (so "configs/kl_vae.py:kl16" works from anywhere)."""
  import importlib.util
  import os

  path, _, variant = spec.partition(":")
  candidates = [path, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise FileNotFoundError(f"config file {path!r} (from {spec!r}) not found in the working directory or the "
                            "repository; use e.g. 'configs/kl_vae.py:kl16'.")
  module_spec = importlib.util.spec_from_file_location(f"_himar_jax_config_{abs(hash(found))}", found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def tokenizer_checkpoint(config) -> str:
  """config.tokenizer.checkpoint (for next_scale also config.model.tokenizer, the codebook source), or a
  clear error saying which field to set and how to make a tokenizer directory."""
  family = config.model.family
  kind = TOKENIZER_KINDS.get(family)
  if kind is None:
    raise ValueError(f"config.model.family={family!r} has no tokenizer (families with one: "
                     f"{sorted(TOKENIZER_KINDS)}).")
  tok = config.get("tokenizer", None)
  ckpt = tok.get("checkpoint", "") if tok is not None else ""
  if not ckpt and family == "next_scale":
    ckpt = config.model.get("tokenizer", "")
  cfg_file = "kl_vae.py" if kind == "kl_vae" else "vq_pyramid.py"
  if not ckpt:
    raise ValueError(f"config.tokenizer.checkpoint is empty: decoding {family} samples into images needs the {kind} "
                     f"they were trained on. Pass --config.tokenizer.checkpoint=DIR, a tokenizer directory; "
                     + _MAKE_TOKENIZER.format(cfg=cfg_file) + ".")
  import os
  if not os.path.exists(ckpt):
    raise FileNotFoundError(f"config.tokenizer.checkpoint={ckpt!r} does not exist; "
                            + _MAKE_TOKENIZER.format(cfg=cfg_file) + ".")
  if os.path.isdir(ckpt) and not os.listdir(ckpt):
    raise FileNotFoundError(f"config.tokenizer.checkpoint={ckpt!r} is an empty directory; "
                            + _MAKE_TOKENIZER.format(cfg=cfg_file) + ".")
  return ckpt


def _expected_tokenizer(config):
  """(kind, dataclass config) that config.tokenizer names: `config` ("configs/kl_vae.py:kl16"), or `preset` +
  `arch` as in tokenizer configs; None when neither is set (whatever the checkpoint holds)."""
  from himar_jax import tokenizers
  tok = config.get("tokenizer", None)
  spec = tok.get("config", "") if tok is not None else ""
  if not spec:
    return tokenizers.from_config(tok) if tok is not None and tok.get("preset", "") else None
  tconfig = load_config_spec(spec)
  if "tokenizer" not in tconfig:
    raise ValueError(f"config.tokenizer.config={spec!r} has no `tokenizer` block; name a tokenizer config such as "
                     "'configs/kl_vae.py:kl16' or 'configs/vq_pyramid.py:vq256'.")
  return tokenizers.from_config(tconfig.tokenizer)


def _check_tokenizer_fits(config, kind: str, tcfg, where: str) -> None:
  m = config.model
  want_kind = TOKENIZER_KINDS[m.family]
  if kind != want_kind:
    raise ValueError(f"{where} holds a {kind} tokenizer; config.model.family={m.family!r} needs a {want_kind}.")
  if kind == "kl_vae":
    if tcfg.embed_dim != m.token_dim:
      raise ValueError(f"{where} has {tcfg.embed_dim} latent channels but config.model.token_dim={m.token_dim}; "
                       "use the tokenizer the model was trained on.")
    return
  for name, have, want in (("vocab_size", tcfg.vocab_size, m.vocab_size), ("z_channels", tcfg.z_channels,
                                                                          m.z_channels),
                           ("patch_nums", tuple(tcfg.patch_nums), tuple(m.patch_nums))):
    if have != want:
      raise ValueError(f"{where} has {name}={have} but config.model.{name}={want}; use the VQ pyramid the model "
                       "was trained on (and its patch_nums layout: configs/vq_pyramid.py:vq256 / vq512).")


def load_tokenizer(config) -> tuple[str, nnx.Module, str]:
  """(kind, module, fingerprint) of the tokenizer of a latent family's config (float32, default device).

  Source: config.tokenizer.checkpoint (next_scale: else config.model.tokenizer), a tokenizer directory written by
  `convert` (official weights or `train:<workdir>` of tokenizer training); next_scale also takes VAR's
  vae_ch160v4096z32.pth (then config.tokenizer.config names the architecture). When config.tokenizer.config
  names a tokenizer config ("configs/kl_vae.py:kl16"), the checkpoint must hold exactly that architecture.
  """
  import os

  from himar_jax.convert import tokenizers as conv
  ckpt = tokenizer_checkpoint(config)
  expected = _expected_tokenizer(config)
  where = f"tokenizer checkpoint {ckpt!r}"
  if os.path.isdir(ckpt):
    if not os.path.isfile(os.path.join(ckpt, conv.METADATA_FILE)):
      raise FileNotFoundError(f"{where} has no {conv.METADATA_FILE}: it is not a tokenizer directory (a training "
                              "workdir is not one); " + _MAKE_TOKENIZER.format(
                                  cfg="kl_vae.py" if TOKENIZER_KINDS[config.model.family] == "kl_vae"
                                  else "vq_pyramid.py") + ".")
    module, meta = conv.load_tokenizer(ckpt)
    kind, fingerprint = meta["kind"], meta["fingerprint"]
    if expected is not None and (expected[0] != kind or expected[1] != module.config):
      named = (f"config.tokenizer.config={config.tokenizer.config!r}" if config.tokenizer.get("config", "")
               else f"config.tokenizer.preset={config.tokenizer.preset!r}")
      raise ValueError(f"{where} holds {kind} {module.config}, but {named} names {expected[0]} {expected[1]}; "
                       "fix one of them.")
  else:
    if expected is None:
      raise ValueError(f"{where} is a file: set config.tokenizer.config (e.g. 'configs/vq_pyramid.py:vq256') to "
                       "name its architecture, or convert it into a tokenizer directory with `convert`.")
    kind, tcfg = expected
    module = conv.build(kind, tcfg, abstract=True)
    conv.load_state_dict(module, conv.load_torch_state_dict(ckpt), strict=False)
    fingerprint = conv.fingerprint(module)
  _check_tokenizer_fits(config, kind, module.config, where)
  return kind, module, fingerprint


@dataclasses.dataclass
class ImageDecoder:
  """Generator outputs -> images (B, H, W, C) in [-1, 1]: KL VAE latents (scaled, (B, h, w, z)) or VQ-pyramid
  indices (B, L) through the tokenizer's decoder; pixel_mar outputs unchanged. Callable (jitted); sample_batches
  also runs it inside the sampling program (`decoder=`), sharded like the samples."""
  kind: str                 # "identity" | "kl_vae" | "vq_pyramid"
  image_shape: tuple        # (H, W, C) of the decoded images
  graphdef: Any = None
  state: Any = None         # the tokenizer's variables (pure dict), replicated on the sampling mesh
  patch_nums: tuple = ()
  fingerprint: str = ""     # of the tokenizer's weights (convert/tokenizers.fingerprint); "" for the identity

  @property
  def key(self):
    """Hashable static part (the jit cache key); None for the identity."""
    return None if self.kind == "identity" else (self.kind, self.graphdef, self.patch_nums)

  def __call__(self, outputs):
    if self.kind == "identity":
      return outputs
    return _jitted_decode(self.key)(self.state, outputs)


def decode_outputs(key, state, outputs):
  """The decoder of ImageDecoder.key applied to generator outputs (traceable inside jit)."""
  if key is None:
    return outputs
  kind, graphdef, patch_nums = key
  tokenizer = nnx.merge(graphdef, nnx.State(state))
  if kind == "kl_vae":
    return jnp.clip(tokenizer.decode_scaled(outputs), -1.0, 1.0)
  sizes = [p * p for p in patch_nums]
  if outputs.ndim != 2 or outputs.shape[1] != sum(sizes):
    raise ValueError(f"VQ-pyramid indices must be (B, {sum(sizes)}) for patch_nums {patch_nums}; got "
                     f"{tuple(outputs.shape)}.")
  return tokenizer.indices_to_img(jnp.split(outputs, np.cumsum(sizes)[:-1], axis=1))


@functools.lru_cache(maxsize=8)
def _jitted_decode(key):
  return jax.jit(functools.partial(decode_outputs, key))


def _replicate(tree, mesh: Mesh):
  """Host arrays -> arrays replicated over `mesh` (every process passes the same values)."""
  sharding = sharding_lib.replicated(mesh)

  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def load_image_decoder(config, restored: RestoredModel | None = None, *, mesh: Mesh | None = None) -> ImageDecoder:
  """The ImageDecoder of a config: identity for pixel_mar; else the tokenizer of load_tokenizer(config), its
  weights replicated on `mesh` (default restored.mesh, else all devices). With `restored` (a next_scale model),
  the tokenizer's codebook must equal the one the generator holds."""
  family = config.model.family
  if family == "pixel_mar":
    size = config.data.image_size
    return ImageDecoder("identity", (size, size, config.model.channels))
  kind, tokenizer, fingerprint = load_tokenizer(config)
  tcfg = tokenizer.config
  if kind == "kl_vae":
    side = config.model.grid_size * tcfg.stride
    patch_nums = ()
  else:
    side = tcfg.patch_nums[-1] * tcfg.stride
    patch_nums = tuple(tcfg.patch_nums)
    if restored is not None:
      mine = np.asarray(tokenizer.quantize.embedding.embedding.get_value())
      theirs = restored.buffers.get("vq", {}).get("embedding", {}).get("embedding")
      if theirs is not None and not np.allclose(np.asarray(jax.device_get(theirs)), mine, atol=1e-6):
        raise ValueError(f"the codebook of config.tokenizer.checkpoint={tokenizer_checkpoint(config)!r} differs "
                         "from the one stored in the generator's checkpoint: use the tokenizer the model was "
                         "converted or trained with.")
  graphdef, state = nnx.split(tokenizer)
  mesh = mesh or (restored.mesh if restored is not None else mesh_lib.make_mesh((-1, 1, 1)))
  return ImageDecoder(kind, (side, side, tcfg.in_channels), graphdef, _replicate(nnx.to_pure_dict(state), mesh),
                      patch_nums, fingerprint)
