"""grain pipeline over a latent cache (himar_jax/data/latent_cache.py): per example a random flip, a fresh
posterior sample x scale factor (KL VAE) or the token indices (VQ pyramid), and the label.

Batches (this process's rows of the global batch, numpy):
  KL VAE      latent (B, S/16, S/16, z), latent_small (B, s/16, s/16, z) float32, label int32, index int32
  VQ pyramid  indices (B, L) int32, label, index
The image and its pivot always come from the same flip. Shuffling, per-host sharding, batching and the
checkpointable iterator state are those of `himar_jax.data.pipeline.make_iterator`.
"""
from __future__ import annotations

import os

import numpy as np

from himar_jax.data import latent_cache as lc
from himar_jax.data.pipeline import make_iterator

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussian's clamp (himar_jax/tokenizers/kl_vae.py)


class LatentCacheSource:
  """Random access over a finished latent cache; records decoded into dicts of arrays.

  tokenizer_dir: when given, the cache must have been made by that converted / trained tokenizer (same weight
  fingerprint). Every shard is checked to exist, be non-empty and hold the record count its marker promises.
  """

  def __init__(self, directory: str, *, tokenizer_dir: str | None = None):
    import grain

    self.directory = directory
    self.metadata = lc.read_metadata(directory)
    if tokenizer_dir:
      lc.check_same_tokenizer(self.metadata, lc.tokenizer_identity(tokenizer_dir), directory)
    self.fields = lc.fields_from_metadata(self.metadata)
    n = self.metadata["num_shards"]
    ranges = lc.shard_ranges(self.metadata["count"], self.metadata["shard_size"])
    paths = []
    for k, (start, end) in enumerate(ranges):
      problem = lc.verify_shard(directory, k, n, end - start, checksum=False)
      if problem is not None:
        raise lc.CacheError(f"latent cache shard {k}: {problem}; rerun `cache-latents` with the same config to "
                            "rewrite it.")
      paths.append(os.path.join(directory, lc.shard_name(k, n)))
    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) != self.metadata["count"]:
      raise lc.CacheError(f"latent cache {directory!r} holds {len(self._records)} records, metadata.json says "
                          f"{self.metadata['count']}.")

  @property
  def kind(self) -> str:
    return self.metadata["tokenizer"]["kind"]

  @property
  def scale_factor(self) -> float:
    return float(self.metadata["scale_factor"])

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return lc.decode_record(self._records[index], self.fields)


def sample_posterior(moments: np.ndarray, noise: np.ndarray) -> np.ndarray:
  """mean + exp(logvar / 2) * noise for moments (..., 2z) = [mean | logvar], logvar clamped like the VAE."""
  mean, logvar = np.split(moments.astype(np.float32), 2, axis=-1)
  return mean + np.exp(0.5 * np.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)) * noise


def kl_draws(random_flip: bool = True):
  """record, rng -> {moments, small_moments, noise, noise_small, label, index}: the per-record random part of
  `kl_transform` (the flip, the same for both resolutions, then the posterior noise of each), with no arithmetic,
  so that `kl_finish` can sample whole batches at once."""

  def draws(record: dict, rng: np.random.Generator) -> dict:
    flip = random_flip and rng.random() < 0.5
    suffix = "_flip" if flip else ""
    big, small = record["moments" + suffix], record["small_moments" + suffix]
    return {"moments": big, "small_moments": small,
            "noise": rng.standard_normal(big.shape[:-1] + (big.shape[-1] // 2,), dtype=np.float32),
            "noise_small": rng.standard_normal(small.shape[:-1] + (small.shape[-1] // 2,), dtype=np.float32),
            "label": np.int32(record["label"]), "index": np.int32(record["index"])}

  return draws


def kl_finish(scale_factor: float):
  """`kl_draws` output (one record or a batch of them) -> {latent, latent_small, label, index}: the posterior
  samples times the scale factor. Elementwise, so a batch gives exactly the per-record results stacked."""

  def finish(drawn: dict) -> dict:
    return {"latent": sample_posterior(drawn["moments"], drawn["noise"]) * np.float32(scale_factor),
            "latent_small": sample_posterior(drawn["small_moments"], drawn["noise_small"]) * np.float32(scale_factor),
            "label": drawn["label"], "index": drawn["index"]}

  return finish


def kl_transform(scale_factor: float, random_flip: bool = True):
  """record, rng -> {latent, latent_small, label, index}: flip with probability 1/2 (both resolutions alike),
  then a posterior sample of each, times the scale factor (`kl_draws` then `kl_finish` on one record)."""
  draws, finish = kl_draws(random_flip), kl_finish(scale_factor)

  def transform(record: dict, rng: np.random.Generator) -> dict:
    return finish(draws(record, rng))

  return transform


def vq_transform(random_flip: bool = True, vocab_size: int | None = None):
  """record, rng -> {indices (L,) int32, label, index}, the flipped image's tokens with probability 1/2.
  vocab_size: records whose indices leave [0, vocab_size) raise (a cache of another codebook, or corruption)."""

  def transform(record: dict, rng: np.random.Generator) -> dict:
    flip = random_flip and rng.random() < 0.5
    indices = record["indices_flip" if flip else "indices"].astype(np.int32)
    if vocab_size is not None:
      lo, hi = int(indices.min()), int(indices.max())
      if lo < 0 or hi >= vocab_size:
        raise lc.CacheError(f"token cache record {int(record['index'])} has indices in [{lo}, {hi}], outside the "
                            f"codebook range [0, {vocab_size}) of config.model.vocab_size={vocab_size}; the cache "
                            "was made with another tokenizer or is corrupted (rebuild it with `cache-latents`).")
    return {"indices": indices, "label": np.int32(record["label"]), "index": np.int32(record["index"])}

  return transform


def make_latent_iterator(cache_dir: str, *, global_batch_size: int, seed: int, random_flip: bool = True,
                         tokenizer_dir: str | None = None, num_workers: int = 0, process_index: int | None = None,
                         process_count: int | None = None):
  """An endless, checkpointable iterator of this process's share of each global batch from a latent cache."""
  source = LatentCacheSource(cache_dir, tokenizer_dir=tokenizer_dir)
  if source.kind == "kl_vae":  # per record only the draws; the posterior arithmetic runs once per batch
    transform, batch_transform = kl_draws(random_flip), kl_finish(source.scale_factor)
  else:
    transform, batch_transform = vq_transform(random_flip), None
  return make_iterator(source, global_batch_size=global_batch_size, seed=seed, transform=transform,
                       batch_transform=batch_transform, process_index=process_index, process_count=process_count,
                       num_workers=num_workers)


def check_token_cache(metadata: dict, *, patch_nums, vocab_size: int, where: str) -> None:
  """A VQ-pyramid token cache whose scales and codebook size are those of the model config, else CacheError."""
  tok = metadata["tokenizer"]
  if tok["kind"] != "vq_pyramid":
    raise lc.CacheError(f"cache {where!r} holds {tok['kind']} latents; config.data.source='token_cache' needs VQ "
                        "pyramid token indices: build one with `python -m himar_jax cache-latents "
                        "--config=configs/vq_pyramid.py:vq256 --config.cache.dir=DIR`.")
  have_pn, want_pn = tuple(tok["config"]["patch_nums"]), tuple(int(p) for p in patch_nums)
  if have_pn != want_pn:
    raise lc.CacheError(f"token cache {where!r} has scales patch_nums={have_pn} (L={sum(p * p for p in have_pn)}) "
                        f"but config.model.patch_nums={want_pn} (L={sum(p * p for p in want_pn)}); use a cache of "
                        "that layout (configs/vq_pyramid.py:vq256 / vq512) or the matching model variant (_512).")
  if int(tok["config"]["vocab_size"]) != int(vocab_size):
    raise lc.CacheError(f"token cache {where!r} was made with a codebook of {tok['config']['vocab_size']} entries "
                        f"but config.model.vocab_size={vocab_size}; set the model's vocab_size to the tokenizer's.")
  fields = {f["name"]: tuple(f["shape"]) for f in metadata["fields"]}
  length = sum(p * p for p in want_pn)
  if fields.get("indices") != (length,):
    raise lc.CacheError(f"token cache {where!r} stores indices of shape {fields.get('indices')}, expected "
                        f"({length},) for patch_nums {want_pn}; rebuild it with `cache-latents`.")


def make_token_iterator(config):
  """The token iterator a next-scale config names (config.data.source == "token_cache"): a `cache-latents` output
  of a VQ pyramid at config.data.cache_dir, checked against config.model (patch_nums, vocab_size) and, when
  config.model.tokenizer is a converted tokenizer directory, made by that tokenizer. Yields {"indices" (B, L)
  int32, "label", "index"}; a record with indices outside the codebook raises."""
  cache_dir = config.data.get("cache_dir", "")
  if not cache_dir:
    raise ValueError("config.data.cache_dir is empty; set --config.data.cache_dir to a token cache made by "
                     "`python -m himar_jax cache-latents --config=configs/vq_pyramid.py:vq256 --config.cache.dir=DIR`.")
  tok = config.model.get("tokenizer", "")
  source = LatentCacheSource(cache_dir, tokenizer_dir=tok if tok and os.path.isdir(tok) else None)
  m = config.model
  check_token_cache(source.metadata, patch_nums=m.patch_nums, vocab_size=m.vocab_size, where=cache_dir)
  if not tok and not config.train.get("init_from", ""):
    # Without it the model's frozen codebook / phi (its teacher-forcing inputs) would be random.
    raise ValueError(f"config.model.tokenizer is empty: training on token cache {cache_dir!r} needs the codebook "
                     "and phi convs of the tokenizer that made it; set --config.model.tokenizer="
                     f"{source.metadata['tokenizer'].get('checkpoint')} (or start from a checkpoint that holds them "
                     "with --config.train.init_from).")
  return make_iterator(source, global_batch_size=config.data.global_batch_size, seed=config.data.shuffle_seed,
                       transform=vq_transform(config.data.random_flip, int(m.vocab_size)),
                       num_workers=config.data.num_workers)


def make_train_iterator(config):
  """The latent iterator a training config names (config.data.source == "latent_cache"): config.data.cache_dir,
  plus config.tokenizer.checkpoint when present, to check that the cache belongs to that tokenizer."""
  if not config.data.get("cache_dir", ""):
    raise ValueError("config.data.cache_dir is empty; set --config.data.cache_dir to a `cache-latents` output.")
  tok = config.get("tokenizer", None)
  return make_latent_iterator(config.data.cache_dir, global_batch_size=config.data.global_batch_size,
                              seed=config.data.shuffle_seed, random_flip=config.data.random_flip,
                              tokenizer_dir=(tok.get("checkpoint", "") or None) if tok is not None else None,
                              num_workers=config.data.num_workers)
