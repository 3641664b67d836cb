"""Text-to-image Hi-MAR (family 'himar_t2i'): Hi-MAR conditioned on CLIP text embeddings, for MS-COCO.

The official Hi-MAR release has no text-to-image code; this follows the paper's description (MS-COCO, following
U-ViT-S/2 (Deep) in size) with these choices:
- the class buffer is replaced by context tokens: the 77 CLIP ViT-L/14 last hidden states of the caption through
  a Linear(768 -> D) (`context_proj`, as U-ViT's context embedding), one buffer position per token, plus the
  buffer's learned position embedding, in both phases (Hi-MAR's class embedding is shared by its phases too);
- classifier-free guidance: in training each phase replaces the whole caption by the EMPTY caption's states
  with probability label_drop_prob (independently per phase, as Hi-MAR drops the class); at sampling the
  unconditional branch reads the empty caption. The empty caption's states are a constant buffer of the model
  (`empty_context`, not trained), loaded at build from the caption cache (empty_context.npy) or
  config.model.empty_context, and restored from checkpoints at sampling;
- mask ratios of both phases drawn from Beta(4, 1) (the paper's MS-COCO setting; mean 0.8), one per batch and
  phase, ceil(n r) tokens masked, at least 1: the phase-1 encoder capacity is therefore P - 1 pivots;
- everything else is Hi-MAR's (scale-aware backbone, MLP head for the pivots, DiT head for the dense map, the
  null-pivot schedule, the two-phase sampler with `re_cfg` and `cfg`).
Batches: latent (B, g, g, C), latent_small (B, g/2, g/2, C), context (B, 77, 768) float32 (himar_jax/data/coco.py).
Sampling input ("labels" of the generic sampler): context (B, 77, 768).
"""
from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.models import himar
from himar_jax.nn.layers import dense


class EmptyContext(nnx.Variable):
  """The empty caption's text-encoder states (L, Dc): a constant of the model (saved, restored, never trained)."""


class HiMART2I(himar.HiMAR):
  """Hi-MAR with `context_length` text context tokens as its buffer (see the module docstring)."""

  def __init__(self, *, context_length: int, context_dim: int, mask_ratio_beta: tuple[float, float] = (4.0, 1.0),
               empty_context=None, rngs: nnx.Rngs, dtype=jnp.bfloat16, **kwargs):
    kwargs.pop("num_classes", None)
    kwargs.pop("buffer_size", None)
    super().__init__(buffer_size=context_length, num_classes=1, rngs=rngs, dtype=dtype, **kwargs)
    # No class embedding: the buffer holds context tokens, the unconditional branch the empty caption.
    del self.class_emb, self.fake_latent
    self.context_length, self.context_dim = context_length, context_dim
    a, b = (float(v) for v in mask_ratio_beta)
    if a <= 0 or b <= 0:
      raise ValueError(f"mask_ratio_beta={tuple(mask_ratio_beta)} must be two positive Beta parameters.")
    self.mask_ratio_beta = (a, b)
    self.lowres_capacity = self.prefix_tokens - 1  # a Beta ratio may leave all but one pivot visible
    self.context_proj = dense(context_dim, self.z_proj.out_features, (None, "embed"), rngs=rngs, dtype=dtype)
    if empty_context is None:
      empty_context = np.zeros((context_length, context_dim), np.float32)
    empty_context = jnp.asarray(empty_context, jnp.float32)
    if empty_context.shape != (context_length, context_dim):
      raise ValueError(f"empty_context has shape {empty_context.shape}, expected ({context_length}, {context_dim}) "
                       "(the text encoder's tokens x width).")
    self.empty_context = EmptyContext(empty_context)

  # -- conditions --------------------------------------------------------------------------------------------------
  def project_context(self, context):
    """(B, L, Dc) text states -> (B, L, D) buffer tokens."""
    if context.ndim != 3 or context.shape[1:] != (self.context_length, self.context_dim):
      raise ValueError(f"text-to-image Hi-MAR takes context (B, {self.context_length}, {self.context_dim}) (CLIP "
                       f"last hidden states of the caption); got {tuple(context.shape)}.")
    return self.context_proj(context.astype(jnp.float32)).astype(jnp.float32)

  def _empty_tokens(self):
    return self.project_context(self.empty_context[...][None])  # (1, L, D)

  def condition(self, batch, drop=None):
    cond = self.project_context(batch["context"])
    if drop is None:
      return cond
    return jnp.where(drop[:, None, None], self._empty_tokens(), cond)

  def sampling_conditions(self, context):
    cond = self.project_context(context)
    return cond, jnp.broadcast_to(self._empty_tokens(), cond.shape)

  # -- training ----------------------------------------------------------------------------------------------------
  def masked_count(self, key, n: int):
    """ceil(n r), r ~ Beta(a, b), clipped to [1, n]: one count per batch."""
    r = jax.random.beta(key, *self.mask_ratio_beta, (), jnp.float32)
    return jnp.clip(jnp.ceil(n * r), 1, n).astype(jnp.int32)

  def draw_training(self, key, batch_size: int, step=None) -> dict:
    """Hi-MAR's draws with both mask counts from Beta(a, b) (keys folded off the step key)."""
    draws = super().draw_training(key, batch_size, step)
    k_low, k_dense = jax.random.split(jax.random.fold_in(key, 0x7e47))
    draws["num_masked_low"] = self.masked_count(k_low, self.prefix_tokens)
    draws["num_masked_dense"] = self.masked_count(k_dense, self.num_tokens)
    return draws

  def train_loss(self, batch, *, key, step=None):
    """batch: latent, latent_small, context (B, 77, Dc)."""
    if "context" not in batch:
      raise ValueError(f"text-to-image Hi-MAR batches need 'context' (caption states); got keys {sorted(batch)} "
                       "(train on a COCO caption cache: config.data.source='coco_cache').")
    self.project_context(batch["context"])  # shape errors before any work
    return super().train_loss(batch, key=key, step=step)


# ------------------------------------------------------------------------------------------------------------------
# Config plumbing (family 'himar_t2i', configs/himar_t2i.py)
# ------------------------------------------------------------------------------------------------------------------

def _as_himar(config):
  """A copy of the config that himar.validate / himar_kwargs read (family 'himar', one dummy class)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.family = "himar"
    c.model.num_classes = 1
    c.model.buffer_size = config.model.context_length
  return c


def validate(config) -> None:
  m = config.model
  if m.family != "himar_t2i":
    raise ValueError(f"config.model.family={m.family!r} is not 'himar_t2i' (himar_jax.models.himar_t2i).")
  himar._check_positive(m, "context_length", "context_dim")
  beta = tuple(m.mask_ratio_beta)
  if len(beta) != 2 or min(beta) <= 0:
    raise ValueError(f"config.model.mask_ratio_beta={beta!r} must be two positive Beta parameters, e.g. (4.0, 1.0).")
  himar.validate(_as_himar(config))


def empty_context_path(config) -> str:
  """config.model.empty_context, else the caption cache's empty_context.npy ('' when neither is set)."""
  from himar_jax.data.coco import EMPTY_CONTEXT
  path = config.model.get("empty_context", "")
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config.model.empty_context={path!r} does not exist; point it at an empty-caption "
                              "embedding .npy (a COCO caption cache's empty_context.npy).")
    return path
  cache_dir = config.data.get("cache_dir", "")
  if cache_dir:
    path = os.path.join(cache_dir, EMPTY_CONTEXT)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found: config.data.cache_dir={cache_dir!r} is not a COCO caption cache "
                              "(build one with `cache-latents --config=configs/himar_t2i.py:<variant>`).")
    return path
  return ""


def build(config, rngs: nnx.Rngs) -> HiMART2I:
  """The model; its empty-caption buffer is read from empty_context_path(config) (training needs it; without
  one it is zeros, to be replaced by a checkpoint's buffers)."""
  m = config.model
  path = empty_context_path(config)
  empty = np.load(path, allow_pickle=False).astype(np.float32) if path else None
  return HiMART2I(context_length=m.context_length, context_dim=m.context_dim,
                  mask_ratio_beta=tuple(m.mask_ratio_beta), empty_context=empty, rngs=rngs,
                  **himar.himar_kwargs(_as_himar(config).model))


def sample_kwargs(config) -> dict:
  m = config.model
  return {"num_iter": m.num_iter, "cfg": m.cfg, "re_cfg": m.re_cfg, "cfg_schedule": m.cfg_schedule,
          "temperature": m.temperature}


def evaluation_conditions(config, num: int):
  """`evaluate`'s per-sample conditions: random validation captions (himar_jax/text/sampling.py)."""
  from himar_jax.text.sampling import caption_conditions
  return caption_conditions(config, num)
