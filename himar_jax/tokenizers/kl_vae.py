"""KL-regularised autoencoder (LDM AutoencoderKL as MAR's kl16): images <-> diagonal-Gaussian latents.

kl16: ch 128, ch_mult (1, 1, 2, 2, 4) (stride 16), 2 res blocks per level, 16 latent channels, encoder attention
at the lowest level plus the middle, decoder middle attention only, 1x1 quant_conv (32 -> 32: mean | logvar) and
post_quant_conv (16 -> 16). Latents fed to generators are `posterior.sample() * scale_factor` (0.2325 for kl16)
and are divided by it before decoding. Channels-last: images (B, H, W, C) in [-1, 1], latents (B, h, w, z).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from himar_jax.nn.layers import DEFAULT_COMPUTE_DTYPE
from himar_jax.tokenizers.ldm import Decoder, Encoder, check_images, conv, count_params  # noqa: F401

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class KLVAEConfig:
  """Sizes of a KL VAE. `encoder_attn_levels` / `decoder_attn_levels`: levels with attention after every res block
  (None = the lowest level only)."""
  embed_dim: int = 16
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  in_channels: int = 3
  norm_groups: int = 32
  encoder_attn_levels: tuple[int, ...] | None = None
  decoder_attn_levels: tuple[int, ...] | None = ()
  mid_attention: bool = True
  scale_factor: float = 0.2325

  @property
  def stride(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def replace(self, **kw) -> KLVAEConfig:
    return dataclasses.replace(self, **kw)


def kl16_config() -> KLVAEConfig:
  """MAR's released kl16 tokenizer (66,456,019 parameters)."""
  return KLVAEConfig()


def tiny_config(in_channels: int = 3, *, ch: int = 32, ch_mult: Sequence[int] = (1, 2), embed_dim: int = 4,
                num_res_blocks: int = 1, norm_groups: int = 8, scale_factor: float = 1.0) -> KLVAEConfig:
  """A CPU-sized variant (tests, Fashion-MNIST)."""
  return KLVAEConfig(embed_dim=embed_dim, ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                     in_channels=in_channels, norm_groups=norm_groups, scale_factor=scale_factor)


@struct.dataclass
class DiagonalGaussian:
  """Posterior N(mean, exp(logvar)) over latents (B, h, w, z); logvar already clamped to [-30, 20]."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """Moments (..., 2z) = [mean | logvar] along the last axis (the layout quant_conv produces)."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def moments(self) -> jax.Array:
    return jnp.concatenate([self.mean, self.logvar], axis=-1)

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: jax.Array, noise: jax.Array | None = None) -> jax.Array:
    """mean + std * eps with eps ~ N(0, I) drawn from `key` (or given as `noise`, for parity tests)."""
    if noise is None:
      noise = jax.random.normal(key, self.mean.shape, jnp.float32)
    return self.mean + self.std * noise

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over latent dimensions, per example (B,)."""
    terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))

  def nll(self, sample: jax.Array) -> jax.Array:
    terms = np.log(2.0 * np.pi) + self.logvar + jnp.square(sample - self.mean) / jnp.exp(self.logvar)
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


class KLVAE(nnx.Module):
  """encode: images -> DiagonalGaussian; decode: latents (unscaled) -> images (unclamped, like LDM)."""

  def __init__(self, config: KLVAEConfig, *, rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE):
    self.config = config
    c = config
    self.encoder = Encoder(in_channels=c.in_channels, ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                           out_channels=2 * c.embed_dim, attn_levels=c.encoder_attn_levels,
                           mid_attention=c.mid_attention, norm_groups=c.norm_groups, rngs=rngs, dtype=dtype)
    self.decoder = Decoder(out_channels=c.in_channels, ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                           z_channels=c.embed_dim, attn_levels=c.decoder_attn_levels,
                           mid_attention=c.mid_attention, norm_groups=c.norm_groups, rngs=rngs, dtype=dtype)
    self.quant_conv = conv(2 * c.embed_dim, 2 * c.embed_dim, 1, rngs=rngs, dtype=jnp.float32)
    self.post_quant_conv = conv(c.embed_dim, c.embed_dim, 1, rngs=rngs, dtype=jnp.float32)

  def encode_moments(self, images: jax.Array) -> jax.Array:
    """Images (B, H, W, in_channels) in [-1, 1] -> moments (B, H/s, W/s, 2z) = [mean | unclamped logvar]."""
    check_images(images, channels=self.config.in_channels, multiple=self.config.stride)
    return self.quant_conv(self.encoder(images))

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    return DiagonalGaussian.from_moments(self.encode_moments(images))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents (B, h, w, z) -> images (B, h*s, w*s, in_channels)."""
    if latents.ndim != 4 or latents.shape[-1] != self.config.embed_dim:
      raise ValueError(f"latents must be (B, h, w, {self.config.embed_dim}); got shape {tuple(latents.shape)}.")
    return self.decoder(self.post_quant_conv(latents.astype(jnp.float32)))

  def decode_scaled(self, scaled_latents: jax.Array) -> jax.Array:
    """Generator-space latents (x scale_factor) -> images."""
    return self.decode(scaled_latents / self.config.scale_factor)

  def __call__(self, images: jax.Array, key: jax.Array, *, sample_posterior: bool = True):
    """Reconstruction for training: returns (reconstruction, posterior)."""
    posterior = self.encode(images)
    z = posterior.sample(key) if sample_posterior else posterior.mode()
    return self.decode(z), posterior
