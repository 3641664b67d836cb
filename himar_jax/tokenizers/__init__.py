"""Tokenizers: the KL VAE (continuous, Hi-MAR / MAR) and the VQ residual pyramid (discrete, HMAR / VAR).

This module names them: kinds, presets, building a module from a kind + config, and reading the `tokenizer`
block of an ml_collections config (`kind`, `preset` or explicit `arch` fields, `checkpoint` directory).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from himar_jax.tokenizers import kl_vae, vq_pyramid

KINDS = ("kl_vae", "vq_pyramid")
PRESETS = {
    "kl16": ("kl_vae", kl_vae.kl16_config),
    "vq256": ("vq_pyramid", lambda: vq_pyramid.var_vqvae_config(256)),
    "vq512": ("vq_pyramid", lambda: vq_pyramid.var_vqvae_config(512)),
    "kl_tiny": ("kl_vae", lambda: kl_vae.tiny_config(3)),
    "kl_tiny_gray": ("kl_vae", lambda: kl_vae.tiny_config(1)),
    "vq_tiny": ("vq_pyramid", lambda: vq_pyramid.tiny_config(3)),
    "vq_tiny_gray": ("vq_pyramid", lambda: vq_pyramid.tiny_config(1)),
}


def _config_class(kind: str):
  if kind not in KINDS:
    raise ValueError(f"tokenizer kind={kind!r} is not one of {KINDS}.")
  return kl_vae.KLVAEConfig if kind == "kl_vae" else vq_pyramid.VQPyramidConfig


def config_from_dict(kind: str, d: Mapping):
  """Dataclass config of `kind` from a dict of its fields (lists become tuples); unknown fields are refused."""
  cls = _config_class(kind)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - fields
  if unknown:
    raise ValueError(f"{kind} config has unknown fields {sorted(unknown)}; known: {sorted(fields)}.")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def preset(name: str):
  """(kind, config) of a named preset."""
  if name not in PRESETS:
    raise ValueError(f"tokenizer preset={name!r} is not one of {sorted(PRESETS)}.")
  kind, make = PRESETS[name]
  return kind, make()


def from_config(tok) -> tuple[str, object]:
  """(kind, dataclass config) from a config block with `preset` and optional `arch` overrides (dict of fields;
  None leaves the preset's value)."""
  kind, config = preset(tok.preset)
  arch = {k: v for k, v in dict(tok.get("arch", None) or {}).items() if v is not None}  # None = preset's value
  if arch:
    config = config_from_dict(kind, {**dataclasses.asdict(config), **arch})
  return kind, config


def build(kind: str, config, *, abstract: bool = False, host_init: bool = False, dtype=jnp.float32,
          seed: int = 0) -> nnx.Module:
  """A tokenizer module. abstract: shapes only (to be filled by a checkpoint); host_init: weights drawn with
  NumPy on the host (see host_initialize; seconds faster on CPU than tracing every initializer)."""
  cls = kl_vae.KLVAE if _config_class(kind) is kl_vae.KLVAEConfig else vq_pyramid.VQPyramid
  make = lambda: cls(config, rngs=nnx.Rngs(seed), dtype=dtype)
  if abstract or host_init:
    model = nnx.eval_shape(make)
    return host_initialize(model, seed) if host_init else model
  return make()


def host_initialize(model: nnx.Module, seed: int = 0) -> nnx.Module:
  """Fills every variable of a (possibly abstract) conv model with NumPy draws, in place: conv kernels and biases
  U(+-1/sqrt(fan_in)) (PyTorch's Conv2d default), norm scale 1 / bias 0, codebook U(+-1/V), statistics 0."""
  import numpy as np

  rng = np.random.default_rng(seed)
  state = nnx.state(model)
  for path, var in sorted(nnx.to_flat_state(state), key=lambda kv: str(kv[0])):
    shape, name = var.get_value().shape, path[-1]
    siblings = state
    for p in path[:-1]:
      siblings = siblings[p]
    if not isinstance(var, nnx.Param):
      value = np.zeros(shape)
    elif name == "embedding":
      value = rng.uniform(-1.0 / shape[0], 1.0 / shape[0], shape)
    elif "kernel" not in siblings:  # normalisation layers
      value = np.ones(shape) if name == "scale" else np.zeros(shape)
    else:
      bound = 1.0 / np.sqrt(np.prod(siblings["kernel"].get_value().shape[:-1]))
      value = rng.uniform(-bound, bound, shape)
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  return model


def arch_overrides(kind: str):
  """The `arch` block of a config: every architecture field of `kind` as a typed None (= the preset's value),
  overridable field by field (`--config.tokenizer.arch.ch=64`, tuples as strings: `...ch_mult='(1,2)'`)."""
  import ml_collections

  defaults = _config_class(kind)()
  refs = {}
  for f in dataclasses.fields(defaults):
    value = getattr(defaults, f.name)
    refs[f.name] = ml_collections.FieldReference(None, field_type=tuple if value is None else type(value))
  return ml_collections.ConfigDict(refs)
