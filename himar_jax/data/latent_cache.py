"""Latent cache: images -> tokenizer outputs at both resolutions and both flips -> ArrayRecord shards + metadata.

For the KL VAE (Hi-MAR / MAR) each record holds the posterior moments (mean | unclamped logvar) of
  moments         the image (ADM center crop to image_size)        (S, S, 2z)
  moments_flip    its horizontal flip                              (S, S, 2z)
  small_moments   its bicubic downsample to pivot_size (no AA)     (s, s, 2z)
  small_moments_flip  the downsample of the flip                   (s, s, 2z)
plus `label` and `index` (position in the source). For the VQ pyramid a record holds the per-scale token
indices, concatenated, of the image and of its flip (`indices`, `indices_flip`, (L,)). Records are fixed-layout
raw bytes (fields, shapes and dtypes in metadata.json), so reading is a np.frombuffer per field.

Layout of a cache directory:
  metadata.json                      tokenizer kind / config / fingerprint, scale factor, sizes, count, fields,
                                     `complete` once every shard is finished
  shard-00000-of-00008.array_record  examples [k * shard_size, (k + 1) * shard_size)
  shard-00000-of-00008.done.json     written after the shard: record count, bytes, sha256
Resuming skips shards whose .done.json verifies (size, record count and sha256 agree) and rewrites the rest.
Shards are spread over processes (shard k goes to process k % process_count); within a process each batch is
split over the local devices.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from himar_jax import tokenizers
from himar_jax.data.images import ArrayImageSource, ImageFolderSource, center_crop_adm  # noqa: F401
from himar_jax.tokenizers.resize import pivot_downsample

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA = "metadata.json"


class CacheError(ValueError):
  """A cache that cannot be used as asked (other tokenizer, missing / empty / corrupted shard)."""


# ---- record layout ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  shape: tuple[int, ...]
  dtype: str

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def record_fields(kind: str, config, image_size: int, pivot_size: int) -> tuple[Field, ...]:
  """The fixed record layout for a tokenizer `kind` / dataclass `config` at the given sizes."""
  if image_size % config.stride or (kind == "kl_vae" and pivot_size % config.stride):
    raise ValueError(f"cache sizes image_size={image_size}, pivot_size={pivot_size} must be multiples of the "
                     f"tokenizer stride {config.stride}.")
  meta = (Field("label", (), "int32"), Field("index", (), "int64"))
  if kind == "kl_vae":
    big, small, c = image_size // config.stride, pivot_size // config.stride, 2 * config.embed_dim
    return (Field("moments", (big, big, c), "float32"), Field("moments_flip", (big, big, c), "float32"),
            Field("small_moments", (small, small, c), "float32"),
            Field("small_moments_flip", (small, small, c), "float32")) + meta
  if image_size != config.patch_nums[-1] * config.stride:
    raise ValueError(f"cache image_size={image_size} does not match the VQ layout: last patch_num "
                     f"{config.patch_nums[-1]} x stride {config.stride} = {config.patch_nums[-1] * config.stride}.")
  dtype = "int16" if config.vocab_size <= 2 ** 15 else "int32"
  return (Field("indices", (config.seq_len,), dtype), Field("indices_flip", (config.seq_len,), dtype)) + meta


def fields_from_metadata(meta: dict) -> tuple[Field, ...]:
  return tuple(Field(f["name"], tuple(f["shape"]), f["dtype"]) for f in meta["fields"])


def encode_record(example: dict, fields: Sequence[Field]) -> bytes:
  parts = []
  for f in fields:
    a = np.asarray(example[f.name])
    if a.shape != f.shape:
      raise ValueError(f"record field {f.name!r} has shape {a.shape}, expected {f.shape}.")
    parts.append(np.ascontiguousarray(a, dtype=f.dtype).tobytes())
  return b"".join(parts)


@functools.lru_cache(maxsize=64)
def record_dtype(fields: tuple[Field, ...]) -> np.dtype:
  """The record layout as one packed numpy structured dtype (fields back to back, in order)."""
  return np.dtype([(f.name, f.dtype, f.shape) for f in fields])


def decode_record(data: bytes, fields: Sequence[Field]) -> dict:
  """{field name: array view into data}: one frombuffer of the packed layout (the data loader's per-record path)."""
  layout = record_dtype(tuple(fields))
  if len(data) != layout.itemsize:
    raise CacheError(f"cache record has {len(data)} bytes, the metadata's fields need {layout.itemsize}; the shard "
                     "is corrupted or belongs to another cache.")
  record = np.frombuffer(data, layout).reshape(())
  return {name: record[name] for name in layout.names}


# ---- image sources: himar_jax/data/images.py ------------------------------------------------------------------
def source_from_config(cache_config):
  """The image source a cache config names: 'fashion_mnist' (IDX files) or 'image_folder' (class folders)."""
  name = cache_config.source
  if name == "fashion_mnist":
    from himar_jax.data import fashion_mnist
    images, labels = fashion_mnist.load(cache_config.path or fashion_mnist.DEFAULT_PATH, cache_config.split)
    if cache_config.max_examples:
      images, labels = images[:cache_config.max_examples], labels[:cache_config.max_examples]
    return ArrayImageSource(images, labels, cache_config.image_size)
  if name == "image_folder":
    source = ImageFolderSource(cache_config.path, cache_config.image_size)
    if cache_config.max_examples:
      source.files, source.labels = source.files[:cache_config.max_examples], source.labels[:cache_config.max_examples]
    return source
  if name == "coco":  # MS-COCO 2014 images + captions (himar_jax/data/coco.py)
    from himar_jax.data.coco import CocoCaptionsSource
    return CocoCaptionsSource(cache_config.path, cache_config.split, cache_config.image_size,
                              max_examples=cache_config.max_examples)
  raise ValueError(f"config.cache.source={name!r} is not one of 'fashion_mnist', 'image_folder', 'coco'.")


# ---- encoding ---------------------------------------------------------------------------------------------------
def make_encode_fn(model, kind: str, pivot_size: int, mesh: Mesh) -> Callable[[np.ndarray], dict]:
  """A jitted function uint8 images (B, S, S, c) -> dict of per-field arrays, batch split over `mesh`.

  Pixels map to [-1, 1]; gray images are repeated to the tokenizer's channel count.
  """
  from flax import nnx

  graphdef, state = nnx.split(model)
  data = NamedSharding(mesh, P("data"))
  channels = model.config.in_channels

  def encode(state, images_uint8):
    m = nnx.merge(graphdef, state)
    images = images_uint8.astype(jnp.float32) / 127.5 - 1.0
    if images.shape[-1] != channels:
      if images.shape[-1] != 1:
        raise ValueError(f"images have {images.shape[-1]} channels but the tokenizer expects {channels}.")
      images = jnp.repeat(images, channels, axis=-1)
    flipped = images[:, :, ::-1]
    if kind == "kl_vae":
      factor = images.shape[1] // pivot_size
      return {"moments": m.encode_moments(images), "moments_flip": m.encode_moments(flipped),
              "small_moments": m.encode_moments(pivot_downsample(images, factor)),
              "small_moments_flip": m.encode_moments(pivot_downsample(flipped, factor))}
    return {"indices": jnp.concatenate(m.img_to_indices(images), axis=1),
            "indices_flip": jnp.concatenate(m.img_to_indices(flipped), axis=1)}

  jitted = jax.jit(encode, in_shardings=(NamedSharding(mesh, P()), data), out_shardings=data)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  return lambda images: jitted(state, images)


# ---- writing ----------------------------------------------------------------------------------------------------
def shard_name(k: int, num_shards: int) -> str:
  return f"shard-{k:05d}-of-{num_shards:05d}.array_record"


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _num_records(path: str) -> int:
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def verify_shard(directory: str, k: int, num_shards: int, expected_count: int, *, checksum: bool = True) -> str | None:
  """None if shard k is finished and intact, else a sentence saying what is wrong with which file."""
  path = os.path.join(directory, shard_name(k, num_shards))
  marker = path.replace(".array_record", ".done.json")
  if not os.path.isfile(marker):
    return f"{marker} is missing (shard not finished)"
  if not os.path.isfile(path):
    return f"{path} is missing although {marker} says it was finished"
  with open(marker) as f:
    done = json.load(f)
  size = os.path.getsize(path)
  if size == 0 or size != done["bytes"]:
    return f"{path} has {size} bytes, its marker says {done['bytes']} (empty or truncated)"
  if done["count"] != expected_count:
    return f"{marker} records {done['count']} examples, the cache layout needs {expected_count}"
  try:
    count = _num_records(path)
  except Exception as e:  # noqa: BLE001 (array_record raises plain RuntimeErrors on corrupt files)
    return f"{path} cannot be read as ArrayRecord ({e})"
  if count != expected_count:
    return f"{path} holds {count} records, expected {expected_count}"
  if checksum and _sha256(path) != done["sha256"]:
    return f"{path} does not match the sha256 in {marker} (corrupted)"
  return None


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
  return [(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]


def tokenizer_identity(tokenizer_dir: str) -> dict:
  from himar_jax.convert.tokenizers import read_metadata
  meta = read_metadata(tokenizer_dir)
  return {"kind": meta["kind"], "config": meta["config"], "fingerprint": meta["fingerprint"],
          "checkpoint": os.path.abspath(tokenizer_dir)}


def check_same_tokenizer(cache_meta: dict, tokenizer_identity: dict, where: str):
  have, want = cache_meta["tokenizer"], tokenizer_identity
  if have["fingerprint"] != want["fingerprint"] or have["kind"] != want["kind"]:
    raise CacheError(f"latent cache {where} was made by tokenizer {have['kind']} with fingerprint "
                     f"{have['fingerprint'][:12]}… ({have.get('checkpoint')}), but the config names "
                     f"{want['kind']} {want['fingerprint'][:12]}… ({want.get('checkpoint')}); point "
                     "--config.cache.dir at a cache of this tokenizer or rebuild it with `cache-latents`.")


def write_cache(source, model, kind: str, *, directory: str, tokenizer_identity: dict, image_size: int,
                pivot_size: int, shard_size: int = 1024, batch_size: int = 64, scale_factor: float | None = None,
                source_name: str = "", mesh: Mesh | None = None, progress: bool = True,
                checksum: bool = True, extra_fields: Sequence[Field] = (),
                extra_values: Callable[[list[int]], dict] | None = None, extra_metadata: dict | None = None) -> dict:
  """Encodes every example of `source` (len, [i] -> (uint8 image (S, S, c), label)) into `directory`.

  Resumable: finished shards that verify are skipped; unfinished or failing ones are (re)written. Returns the
  metadata dict (with `complete` True once every shard of every process is finished).
  extra_fields / extra_values / extra_metadata: more per-record fields (e.g. caption embeddings), computed per
  batch as extra_values(source indices) -> {name: (n, ...) array}, and metadata entries that are part of the layout.
  """
  config = model.config
  fields = record_fields(kind, config, image_size, pivot_size) + tuple(extra_fields)
  count = len(source)
  if count == 0:
    raise ValueError("the image source is empty; nothing to cache.")
  ranges = shard_ranges(count, shard_size)
  num_shards = len(ranges)
  meta = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_identity,
          "scale_factor": float(scale_factor if scale_factor is not None else getattr(config, "scale_factor", 1.0)),
          "image_size": image_size, "pivot_size": pivot_size if kind == "kl_vae" else None,
          "count": count, "shard_size": shard_size, "num_shards": num_shards, "source": source_name,
          "fields": [dataclasses.asdict(f) for f in fields], "complete": False, **(extra_metadata or {})}
  meta = json.loads(json.dumps(meta))  # tuples -> lists, as read back from disk
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, METADATA)
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      old = json.load(f)
    check_same_tokenizer(old, tokenizer_identity, directory)
    layout = ("image_size", "pivot_size", "count", "shard_size", "fields", "format_version", *(extra_metadata or {}))
    diff = {k: (old.get(k), meta[k]) for k in layout if old.get(k) != meta[k]}
    if diff:
      raise CacheError(f"{meta_path} describes another layout ({ {k: v[0] for k, v in diff.items()} }) than "
                       f"this run ({ {k: v[1] for k, v in diff.items()} }); use another --config.cache.dir.")
  if jax.process_index() == 0:
    _write_json(meta_path, meta)

  if mesh is None:
    mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
  n_dev = mesh.devices.size
  if batch_size % n_dev:
    raise ValueError(f"config.cache.batch_size={batch_size} must be a multiple of the {n_dev} local devices.")
  encode = make_encode_fn(model, kind, pivot_size, mesh)
  mine = [k for k in range(num_shards) if k % jax.process_count() == jax.process_index()]
  todo = []
  for k in mine:
    problem = verify_shard(directory, k, num_shards, ranges[k][1] - ranges[k][0], checksum=checksum)
    if problem is None:
      log.info("shard %d/%d verified; skipping", k, num_shards)
    else:
      if "missing (shard not finished)" not in problem:
        log.warning("rewriting shard %d: %s", k, problem)
      todo.append(k)
  from tqdm.auto import tqdm
  total = sum(ranges[k][1] - ranges[k][0] for k in todo)
  with tqdm(total=total, desc="cache-latents", unit="img", disable=not progress or jax.process_index() != 0) as bar:
    for k in todo:
      _write_shard(directory, k, num_shards, ranges[k], source, encode, fields, batch_size, bar, extra_values)
  _barrier()
  complete = all(verify_shard(directory, k, num_shards, e - s, checksum=False) is None
                 for k, (s, e) in enumerate(ranges))
  meta["complete"] = complete
  if jax.process_index() == 0:
    _write_json(meta_path, meta)
  return meta


def _write_shard(directory, k, num_shards, rng, source, encode, fields, batch_size, bar, extra_values=None):
  from array_record.python.array_record_module import ArrayRecordWriter

  path = os.path.join(directory, shard_name(k, num_shards))
  marker = path.replace(".array_record", ".done.json")
  for p in (marker, path):
    if os.path.exists(p):
      os.remove(p)
  tmp = path + ".tmp"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  start, end = rng
  written = 0
  for b0 in range(start, end, batch_size):
    idx = list(range(b0, min(b0 + batch_size, end)))
    items = [source[i] for i in idx]
    images = np.stack([im for im, _ in items])
    labels = np.asarray([lab for _, lab in items], np.int32)
    n = len(idx)
    if n < batch_size:  # static shapes: pad the last batch, drop the padding after encoding
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
    out = jax.device_get(encode(images))
    if extra_values is not None:
      out.update(extra_values(idx))
    for j in range(n):
      example = {name: value[j] for name, value in out.items()}
      example["label"], example["index"] = labels[j], idx[j]
      writer.write(encode_record(example, fields))
    written += n
    bar.update(n)
  writer.close()
  os.replace(tmp, path)
  _write_json(marker, {"shard": k, "count": written, "bytes": os.path.getsize(path), "sha256": _sha256(path),
                       "range": [start, end]})


def _write_json(path: str, obj: dict):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _barrier():
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("himar_jax.latent_cache")


def read_metadata(directory: str, *, require_complete: bool = True) -> dict:
  path = os.path.join(directory, METADATA)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {directory!r} is not a latent cache; make one with "
                            "`python -m himar_jax cache-latents`.")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise CacheError(f"{path} has format_version {meta.get('format_version')}, this code reads {FORMAT_VERSION}; "
                     "rebuild the cache.")
  if require_complete and not meta.get("complete"):
    raise CacheError(f"latent cache {directory!r} is incomplete (metadata.json says complete=false); finish it "
                     "by running `cache-latents` again with the same config (finished shards are skipped).")
  return meta


def default_cache_config(**kw):
  """The `cache` block of tokenizer configs (configs/kl_vae.py, configs/vq_pyramid.py)."""
  import ml_collections

  c = ml_collections.ConfigDict()
  c.dir = ""                  # output directory of the shards
  c.source = "image_folder"   # image_folder (root/<class>/<image>) | fashion_mnist | coco (root: MS-COCO 2014)
  c.path = ""                 # image folder root / Fashion-MNIST directory ("" = its default)
  c.split = "train"
  c.max_examples = 0          # > 0: only the first N images
  c.image_size = 256          # ADM center crop
  c.pivot_size = 128          # bicubic downsample for Hi-MAR's pivots
  c.shard_size = 1024
  c.batch_size = 64           # per process; a multiple of the local device count
  c.progress = True
  c.update(kw)
  return c


# ---- entry point -------------------------------------------------------------------------------------------------
def cache_latents(config) -> dict:
  """Builds (or resumes) the latent cache that `config.cache` describes with the tokenizer `config.tokenizer`."""
  from himar_jax.convert.tokenizers import load_tokenizer

  c = config.cache
  ckpt = config.tokenizer.checkpoint
  if not ckpt:
    raise ValueError("config.tokenizer.checkpoint is empty; set it to a tokenizer directory made by "
                     "`python -m himar_jax convert` (or by tokenizer training).")
  if not c.dir:
    raise ValueError("config.cache.dir is empty; set --config.cache.dir=DIR for the cache's shards.")
  kind, want = tokenizers.from_config(config.tokenizer)
  model, tmeta = load_tokenizer(ckpt)
  have = tokenizers.config_from_dict(tmeta["kind"], tmeta["config"])
  if tmeta["kind"] != kind or have != want:
    raise CacheError(f"tokenizer checkpoint {ckpt!r} holds {tmeta['kind']} {have}, but config.tokenizer names "
                     f"{kind} {want}; fix --config.tokenizer.preset / arch or point checkpoint elsewhere.")
  source = source_from_config(c)
  extras = {}
  if c.source == "coco":  # caption embeddings next to the latents (himar_jax/data/coco.py)
    from himar_jax.data.coco import caption_cache_extras
    extras = caption_cache_extras(config, source, c.dir)
  return write_cache(source, model, kind, directory=c.dir, tokenizer_identity=tokenizer_identity(ckpt),
                     image_size=c.image_size, pivot_size=c.pivot_size, shard_size=c.shard_size,
                     batch_size=c.batch_size, scale_factor=getattr(want, "scale_factor", 1.0),
                     source_name=f"{c.source}:{c.split}:{c.path}", progress=c.get("progress", True), **extras)


def cache_latents_verb(flags) -> int:
  """`python -m himar_jax cache-latents --config=configs/kl_vae.py:<variant> --config.cache.dir=DIR`."""
  if flags.config is None:
    raise ValueError("`cache-latents` needs --config=configs/kl_vae.py:<variant> (or configs/vq_pyramid.py).")
  meta = cache_latents(flags.config)
  state = "complete" if meta["complete"] else "incomplete (other processes' shards pending)"
  print(f"latent cache {flags.config.cache.dir}: {meta['count']} examples in {meta['num_shards']} shards, {state}")
  return 0
