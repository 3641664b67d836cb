"""Multi-scale residual VQ-VAE ("VQ residual pyramid", VAR's vae_ch160v4096z32 and configurable sizes).

An LDM encoder maps images to f (B, H, W, z); the quantizer explains f coarse-to-fine over `patch_nums`: at scale
k the residual is area-resized to pn_k x pn_k, each position takes its nearest codebook entry (plain L2), the
token map is bicubic-upsampled back to H x W, refined by phi_k(h) = (1 - r) h + r conv3x3(h) (r = quant_resi) and
added to f_hat (and subtracted from the residual). phi convs are shared among scales through a fixed index map.
The generators (VAR / HMAR) are trained on `next_scale_inputs` (teacher forcing) and sample with
`next_autoregressive_input`. All quantizer arithmetic is float32 at HIGHEST precision, and every resize is the
PyTorch-exact one from resize.py, so token indices match the official model's.
Channels-last: images (B, H, W, C) in [-1, 1]; f / f_hat (B, h, w, z); indices per scale (B, pn*pn) int32.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from himar_jax.nn.layers import DEFAULT_COMPUTE_DTYPE, with_axes
from himar_jax.tokenizers import resize
from himar_jax.tokenizers.ldm import Decoder, Encoder, check_images, conv, count_params  # noqa: F401

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
LAYOUTS = {256: PATCH_NUMS_256, 512: PATCH_NUMS_512}
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class VQPyramidConfig:
  """Sizes of a VQ residual pyramid (defaults: vae_ch160v4096z32, 256px layout)."""
  vocab_size: int = 4096
  z_channels: int = 32
  ch: int = 160
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  in_channels: int = 3
  norm_groups: int = 32
  beta: float = 0.25              # commitment weight
  quant_resi: float = 0.5         # phi(h) = (1 - r) h + r conv(h); |r| <= 1e-6 means phi = identity
  share_quant_resi: int = 4       # 0: one phi per scale, 1: one shared phi, n > 1: n partially shared phis
  quant_conv_ks: int = 3
  using_znorm: bool = False       # cosine instead of L2 nearest neighbour
  patch_nums: tuple[int, ...] = PATCH_NUMS_256

  @property
  def stride(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def num_scales(self) -> int:
    return len(self.patch_nums)

  @property
  def num_phis(self) -> int:
    return self.num_scales if self.share_quant_resi == 0 else self.share_quant_resi

  @property
  def seq_len(self) -> int:
    return sum(pn * pn for pn in self.patch_nums)

  def replace(self, **kw) -> VQPyramidConfig:
    return dataclasses.replace(self, **kw)


def var_vqvae_config(resolution: int = 256) -> VQPyramidConfig:
  """VAR's released tokenizer (108,948,355 parameters) with the 256px or 512px patch_nums layout."""
  if resolution not in LAYOUTS:
    raise ValueError(f"resolution={resolution} has no published patch_nums layout; use one of {sorted(LAYOUTS)} "
                     "or pass patch_nums explicitly.")
  return VQPyramidConfig(patch_nums=LAYOUTS[resolution])


def tiny_config(in_channels: int = 3, *, vocab_size: int = 64, z_channels: int = 8, ch: int = 32,
                ch_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1, norm_groups: int = 8,
                patch_nums: Sequence[int] = (1, 2, 3, 4, 6, 8)) -> VQPyramidConfig:
  """A CPU-sized variant (tests, Fashion-MNIST)."""
  return VQPyramidConfig(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=tuple(ch_mult),
                         num_res_blocks=num_res_blocks, in_channels=in_channels, norm_groups=norm_groups,
                         patch_nums=tuple(patch_nums))


def phi_index_map(num_scales: int, num_phis: int) -> tuple[int, ...]:
  """Which phi conv scale k uses: argmin_j |tick_j - k/(K-1)| with VAR's ticks (first index on ties).

  ticks = linspace(1/(3n), 1 - 1/(3n), n) for n == 4, else linspace(1/(2n), 1 - 1/(2n), n); one shared phi
  (n == 1) serves every scale. The float64 arithmetic is the official one, so the tie at K=10, k=2 resolves alike.
  """
  if num_phis == 1:
    return (0,) * num_scales
  n = num_phis
  ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
  denom = max(num_scales - 1, 1)
  return tuple(int(np.argmin(np.abs(ticks - k / denom))) for k in range(num_scales))


class CodebookUsage(nnx.Variable):
  """Per-scale EMA of codebook hit counts (S, V), like VAR's ema_vocab_hit_SV buffer; not trained."""


class Phi(nnx.Module):
  """phi(h) = (1 - r) h + r conv3x3(h)."""

  def __init__(self, channels: int, ratio: float, *, rngs: nnx.Rngs):
    self.ratio = abs(ratio)
    # HIGHEST: token parity depends on f_hat, which feeds the next scale's nearest-neighbour search.
    self.conv = conv(channels, channels, 3, rngs=rngs, dtype=jnp.float32, precision=_HI)

  def __call__(self, h):
    return h * (1 - self.ratio) + self.conv(h) * self.ratio


def _hw(pn) -> tuple[int, int]:
  return (pn, pn) if isinstance(pn, int) else (int(pn[0]), int(pn[1]))


@struct.dataclass
class QuantizeOutput:
  """Training-time quantizer result: straight-through f_hat, VQ loss, per-scale hit counts and indices."""
  f_hat: jax.Array            # (B, H, W, z): value of the quantized f_hat, gradient of f (straight-through)
  loss: jax.Array             # scalar: mean over scales of beta * mse(sg(f_hat), f) + mse(f_hat, sg(f))
  hits: jax.Array             # (S, V) float32 codebook hit counts per scale for this batch
  indices: tuple              # per scale (B, pn*pn) int32


class ResidualQuantizer(nnx.Module):
  """Codebook (V, z), the phi convs and their scale -> phi map, and every f <-> tokens conversion."""

  def __init__(self, config: VQPyramidConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.patch_nums = tuple(c.patch_nums)
    init = nnx.initializers.uniform(2.0 / c.vocab_size)  # VAR's eini < 0 init: U(-1/V, 1/V) (shifted below)
    self.embedding = nnx.Embed(c.vocab_size, c.z_channels, dtype=jnp.float32, param_dtype=jnp.float32,
                               embedding_init=with_axes(lambda k, s, d: init(k, s, d) - 1.0 / c.vocab_size,
                                                        ("vocab", None)), rngs=rngs)
    self.identity_phi = abs(c.quant_resi) <= 1e-6
    self.phi = nnx.List([] if self.identity_phi else
                        [Phi(c.z_channels, c.quant_resi, rngs=rngs) for _ in range(c.num_phis)])
    self.phi_map = phi_index_map(c.num_scales, c.num_phis)
    self.ema_hits = CodebookUsage(jnp.zeros((c.num_scales, c.vocab_size), jnp.float32))
    self.ema_steps = CodebookUsage(jnp.zeros((), jnp.int32))

  # ---- helpers ---------------------------------------------------------------------------------------------
  def apply_phi(self, scale: int, h: jax.Array) -> jax.Array:
    return h if self.identity_phi else self.phi[self.phi_map[scale]](h)

  def nearest(self, z: jax.Array) -> jax.Array:
    """Indices of the nearest codebook entries for z (..., C), float32, first index on ties."""
    e = self.embedding.embedding[...].astype(jnp.float32)
    flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    if self.config.using_znorm:
      unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
      idx = jnp.argmax(jnp.dot(unit(flat), unit(e).T, precision=_HI), axis=-1)
    else:
      dist = (jnp.sum(jnp.square(flat), axis=1, keepdims=True) + jnp.sum(jnp.square(e), axis=1)
              - 2.0 * jnp.dot(flat, e.T, precision=_HI))
      idx = jnp.argmin(dist, axis=-1)
    return idx.astype(jnp.int32).reshape(z.shape[:-1])

  def embed(self, idx: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """(B, h*w) indices -> (B, h, w, z) codebook vectors."""
    return jnp.take(self.embedding.embedding[...], idx, axis=0).reshape(idx.shape[0], *hw, -1)

  def _layout(self, patch_nums) -> tuple[tuple[int, int], ...]:
    return tuple(_hw(pn) for pn in (patch_nums or self.patch_nums))

  def _check_f(self, f: jax.Array, layout) -> None:
    if f.ndim != 4 or f.shape[-1] != self.config.z_channels:
      raise ValueError(f"f must be (B, h, w, {self.config.z_channels}); got shape {tuple(f.shape)}.")
    if tuple(f.shape[1:3]) != layout[-1]:
      raise ValueError(f"f spatial size {tuple(f.shape[1:3])} does not match the last patch_num {layout[-1]}; "
                       "use images of size last_patch_num * stride or a patch_nums layout ending at the latent size.")

  # ---- f -> tokens ----------------------------------------------------------------------------------------
  def _residual_steps(self, f: jax.Array, patch_nums=None):
    """Yields (scale, indices (B, h_k, w_k), contribution h (B, H, W, z), f_hat after this scale)."""
    layout = self._layout(patch_nums)
    self._check_f(f, layout)
    full = layout[-1]
    f_rest = jax.lax.stop_gradient(f.astype(jnp.float32))
    f_hat = jnp.zeros_like(f_rest)
    last = len(layout) - 1
    for si, hw in enumerate(layout):
      z = resize.area(f_rest, hw) if si != last else f_rest
      idx = self.nearest(z)
      h = jnp.take(self.embedding.embedding[...], idx, axis=0)
      if si != last:
        h = resize.bicubic(h, full)
      h = self.apply_phi(si, h)
      f_hat = f_hat + h
      f_rest = f_rest - h
      yield si, idx, h, f_hat

  def f_to_indices(self, f: jax.Array, patch_nums=None) -> list[jax.Array]:
    """f (B, H, W, z) -> per-scale token indices [(B, pn_k^2) int32]."""
    return [idx.reshape(idx.shape[0], -1) for _, idx, _, _ in self._residual_steps(f, patch_nums)]

  def f_to_fhats(self, f: jax.Array, patch_nums=None) -> list[jax.Array]:
    """f -> the cumulative reconstruction f_hat after each scale [(B, H, W, z)]."""
    return [f_hat for _, _, _, f_hat in self._residual_steps(f, patch_nums)]

  def __call__(self, f: jax.Array) -> QuantizeOutput:
    """Training forward: straight-through f_hat, commitment + codebook loss, hit counts (VAR quant.py:forward)."""
    f = f.astype(jnp.float32)
    f_ng = jax.lax.stop_gradient(f)
    loss = jnp.zeros((), jnp.float32)
    hits, indices = [], []
    f_hat = None
    for _, idx, _, f_hat in self._residual_steps(f):
      hits.append(jnp.bincount(idx.reshape(-1), length=self.config.vocab_size).astype(jnp.float32))
      indices.append(idx.reshape(idx.shape[0], -1))
      loss = loss + self.config.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f))
      loss = loss + jnp.mean(jnp.square(f_hat - f_ng))
    loss = loss / self.config.num_scales
    f_hat_st = jax.lax.stop_gradient(f_hat) - f_ng + f
    return QuantizeOutput(f_hat=f_hat_st, loss=loss, hits=jnp.stack(hits), indices=tuple(indices))

  # ---- tokens -> f_hat ------------------------------------------------------------------------------------
  def _check_indices(self, indices: Sequence[jax.Array], count: int) -> None:
    if len(indices) < count:
      raise ValueError(f"got {len(indices)} scales of indices, need {count} for patch_nums {self.patch_nums}.")
    for k, (idx, hw) in enumerate(zip(indices, self._layout(None))):
      if idx.ndim != 2 or idx.shape[1] != hw[0] * hw[1]:
        raise ValueError(f"indices[{k}] must be (B, {hw[0] * hw[1]}) for patch_num {hw}; got {tuple(idx.shape)}.")

  def indices_to_fhats(self, indices: Sequence[jax.Array]) -> list[jax.Array]:
    """Per-scale indices -> cumulative f_hat after each scale, every scale upsampled to full size."""
    layout = self._layout(None)
    self._check_indices(indices, len(layout))
    full, last = layout[-1], len(layout) - 1
    f_hat = None
    out = []
    for si, (idx, hw) in enumerate(zip(indices, layout)):
      h = self.embed(idx, hw)
      if si != last:
        h = resize.bicubic(h, full)
      h = self.apply_phi(si, h)
      f_hat = h if f_hat is None else f_hat + h
      out.append(f_hat)
    return out

  def indices_to_fhat(self, indices: Sequence[jax.Array]) -> jax.Array:
    return self.indices_to_fhats(indices)[-1]

  def next_scale_inputs(self, indices: Sequence[jax.Array]) -> jax.Array:
    """Teacher-forcing inputs of VAR / HMAR (idxBl_to_var_input): for k = 1..K-1, area(f_hat_{<k} -> pn_k),
    flattened row-major and concatenated: (B, L - pn_0^2, z) float32."""
    layout = self._layout(None)
    self._check_indices(indices, len(layout) - 1)
    full = layout[-1]
    f_hat = jnp.zeros((indices[0].shape[0], *full, self.config.z_channels), jnp.float32)
    pieces = []
    for si in range(len(layout) - 1):
      f_hat = f_hat + self.apply_phi(si, resize.bicubic(self.embed(indices[si], layout[si]), full))
      nxt = resize.area(f_hat, layout[si + 1])
      pieces.append(nxt.reshape(nxt.shape[0], -1, nxt.shape[-1]))
    return jnp.concatenate(pieces, axis=1)

  def next_autoregressive_input(self, scale: int, f_hat: jax.Array, h: jax.Array):
    """Inference step (get_next_autoregressive_input): adds scale `scale`'s token map h (B, pn, pn, z) to f_hat
    (B, H, W, z) and returns (f_hat, input for scale + 1 as (B, pn_{k+1}, pn_{k+1}, z); f_hat at the last)."""
    layout = self._layout(None)
    full, last = layout[-1], len(layout) - 1
    if scale != last:
      f_hat = f_hat + self.apply_phi(scale, resize.bicubic(h.astype(jnp.float32), full))
      return f_hat, resize.area(f_hat, layout[scale + 1])
    f_hat = f_hat + self.apply_phi(scale, h.astype(jnp.float32))
    return f_hat, f_hat

  # ---- codebook usage -------------------------------------------------------------------------------------
  def update_usage(self, hits: jax.Array) -> None:
    """EMA of hit counts as VAR keeps it: copy on the first step, 0.9 decay for 100 steps, then 0.99."""
    step = self.ema_steps[...]
    decay = jnp.where(step == 0, 0.0, jnp.where(step < 100, 0.9, 0.99))
    self.ema_hits[...] = self.ema_hits[...] * decay + hits.astype(jnp.float32) * (1.0 - decay)
    self.ema_steps[...] = step + 1

  def usage_percent(self, tokens_per_step: int) -> jax.Array:
    """(S,) percent of codes whose EMA hit count reaches VAR's margin 0.08 * tokens_per_step / V, where
    tokens_per_step = global batch * H * W (the full-resolution token count of one step over all devices)."""
    margin = tokens_per_step / self.config.vocab_size * 0.08
    return jnp.mean((self.ema_hits[...] >= margin).astype(jnp.float32), axis=-1) * 100.0


def usage_from_hits(hits: jax.Array) -> jax.Array:
  """(S,) percent of codebook entries used at least once per scale in one batch of hit counts (S, V)."""
  return jnp.mean((hits > 0).astype(jnp.float32), axis=-1) * 100.0


class VQPyramid(nnx.Module):
  """Encoder -> quant_conv -> ResidualQuantizer -> post_quant_conv -> Decoder."""

  def __init__(self, config: VQPyramidConfig, *, rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE):
    c = config
    if c.patch_nums != tuple(sorted(c.patch_nums)) or len(set(c.patch_nums)) != len(c.patch_nums):
      raise ValueError(f"patch_nums={c.patch_nums} must be strictly increasing.")
    self.config = c
    self.encoder = Encoder(in_channels=c.in_channels, ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                           out_channels=c.z_channels, attn_levels=None, mid_attention=True,
                           norm_groups=c.norm_groups, rngs=rngs, dtype=dtype)
    self.decoder = Decoder(out_channels=c.in_channels, ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                           z_channels=c.z_channels, attn_levels=None, mid_attention=True,
                           norm_groups=c.norm_groups, rngs=rngs, dtype=dtype)
    self.quant_conv = conv(c.z_channels, c.z_channels, c.quant_conv_ks, rngs=rngs, dtype=jnp.float32)
    self.post_quant_conv = conv(c.z_channels, c.z_channels, c.quant_conv_ks, rngs=rngs, dtype=jnp.float32)
    self.quantize = ResidualQuantizer(c, rngs=rngs)

  @property
  def image_size(self) -> int:
    return self.config.patch_nums[-1] * self.config.stride

  def encode_f(self, images: jax.Array) -> jax.Array:
    """Images (B, H, W, C) in [-1, 1] -> continuous f (B, H/s, W/s, z) float32."""
    check_images(images, channels=self.config.in_channels, multiple=self.config.stride)
    return self.quant_conv(self.encoder(images).astype(jnp.float32))

  def img_to_indices(self, images: jax.Array) -> list[jax.Array]:
    return self.quantize.f_to_indices(self.encode_f(images))

  def decode_unclamped(self, f_hat: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(f_hat.astype(jnp.float32)))

  def fhat_to_img(self, f_hat: jax.Array) -> jax.Array:
    """f_hat (B, H, W, z) -> images clamped to [-1, 1]."""
    return jnp.clip(self.decode_unclamped(f_hat), -1.0, 1.0)

  def indices_to_img(self, indices: Sequence[jax.Array]) -> jax.Array:
    return self.fhat_to_img(self.quantize.indices_to_fhat(indices))

  def __call__(self, images: jax.Array) -> tuple[jax.Array, QuantizeOutput]:
    """Training forward: (unclamped reconstruction, QuantizeOutput)."""
    out = self.quantize(self.encode_f(images))
    return self.decode_unclamped(out.f_hat), out
