"""Convolutional encoder / decoder of the LDM autoencoders, shared by the KL VAE and the VQ residual pyramid.

Both official tokenizers (MAR's kl16 and VAR's vae_ch160v4096z32) use the latent-diffusion layout: conv_in, per
level `num_res_blocks` ResnetBlocks (GroupNorm eps 1e-6 -> swish -> 3x3 conv, twice; 1x1 shortcut when channels
change), optional single-head self-attention at chosen levels, asymmetric-pad stride-2 downsampling, a
Res-Attn-Res middle, and GroupNorm -> swish -> conv_out. The decoder mirrors it with num_res_blocks + 1 blocks per
level and nearest x2 + conv upsampling. They differ only in which levels carry attention, which the
constructors take as arguments.

Module attribute names follow the PyTorch state-dict names (encoder.down[i].block[j].conv1 ...), so the
converter in himar_jax/convert maps keys mechanically. Layout is channels-last (B, H, W, C).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.nn.attention import dot_product_attention
from himar_jax.nn.layers import DEFAULT_COMPUTE_DTYPE, with_axes

# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)) = variance_scaling(1/3).
TORCH_CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs, stride: int = 1,
         padding=None, dtype=DEFAULT_COMPUTE_DTYPE, precision=None) -> nnx.Conv:
  """2-D convolution with float32 params (kernel (kh, kw, in, out)) annotated (None, None, conv_in, conv_out).

  Default padding is PyTorch's `padding=kernel_size // 2` on every side.
  """
  if padding is None:
    padding = ((kernel_size // 2, kernel_size // 2),) * 2
  return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), strides=stride, padding=padding,
                  dtype=dtype, param_dtype=jnp.float32, precision=precision,
                  kernel_init=with_axes(TORCH_CONV_INIT, (None, None, "conv_in", "conv_out")),
                  bias_init=with_axes(nnx.initializers.zeros_init(), ("conv_out",)), rngs=rngs)


def group_norm(channels: int, *, rngs: nnx.Rngs, num_groups: int = 32) -> nnx.GroupNorm:
  """GroupNorm(num_groups, eps 1e-6) in float32 with the two-pass variance PyTorch uses."""
  if channels % num_groups:
    raise ValueError(f"GroupNorm: {channels} channels are not divisible by norm_groups={num_groups}; choose a "
                     "channel width (ch * ch_mult) that is a multiple of norm_groups or lower norm_groups.")
  return nnx.GroupNorm(channels, num_groups=num_groups, epsilon=1e-6, dtype=jnp.float32,
                       param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


class ResnetBlock(nnx.Module):
  """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus x (through a 1x1 conv when channels change)."""

  def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs, norm_groups: int = 32,
               dtype=DEFAULT_COMPUTE_DTYPE):
    self.norm1 = group_norm(in_channels, num_groups=norm_groups, rngs=rngs)
    self.conv1 = conv(in_channels, out_channels, 3, rngs=rngs, dtype=dtype)
    self.norm2 = group_norm(out_channels, num_groups=norm_groups, rngs=rngs)
    self.conv2 = conv(out_channels, out_channels, 3, rngs=rngs, dtype=dtype)
    self.nin_shortcut = (conv(in_channels, out_channels, 1, rngs=rngs, dtype=dtype)
                         if in_channels != out_channels else None)

  def __call__(self, x):
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = self.conv2(nnx.swish(self.norm2(h)))
    shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
    return shortcut + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all positions: x + proj_out(softmax(q k^T / sqrt(C)) v), q/k/v by 1x1 conv.

  q, k, v come from one fused 1x1 conv with output channels ordered [q | k | v] (VAR's layout; the converter
  concatenates LDM's separate q, k, v convs in that order).
  """

  def __init__(self, channels: int, *, rngs: nnx.Rngs, norm_groups: int = 32, dtype=DEFAULT_COMPUTE_DTYPE):
    self.norm = group_norm(channels, num_groups=norm_groups, rngs=rngs)
    self.qkv = conv(channels, 3 * channels, 1, rngs=rngs, dtype=dtype)
    self.proj_out = conv(channels, channels, 1, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    b, h, w, c = x.shape
    qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3, 1, c)
    out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=c ** -0.5)
    return x + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nnx.Module):
  """Zero-pad right/bottom by one, then a valid 3x3 stride-2 conv (LDM's asymmetric downsampling)."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE):
    self.conv = conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs, dtype=dtype)

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE):
    self.conv = conv(channels, channels, 3, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class Level(nnx.Module):
  """One resolution level: res blocks (each optionally followed by attention) and an optional resampler."""

  def __init__(self, in_channels: int, out_channels: int, num_blocks: int, *, attention: bool,
               resample: str | None, rngs: nnx.Rngs, norm_groups: int, dtype):
    blocks, attns = [], []
    for _ in range(num_blocks):
      blocks.append(ResnetBlock(in_channels, out_channels, norm_groups=norm_groups, rngs=rngs, dtype=dtype))
      in_channels = out_channels
      if attention:
        attns.append(AttnBlock(out_channels, norm_groups=norm_groups, rngs=rngs, dtype=dtype))
    self.block = nnx.List(blocks)
    self.attn = nnx.List(attns)
    self.downsample = Downsample(out_channels, rngs=rngs, dtype=dtype) if resample == "down" else None
    self.upsample = Upsample(out_channels, rngs=rngs, dtype=dtype) if resample == "up" else None

  def __call__(self, h):
    for i, block in enumerate(self.block):
      h = block(h)
      if len(self.attn):
        h = self.attn[i](h)
    if self.downsample is not None:
      h = self.downsample(h)
    if self.upsample is not None:
      h = self.upsample(h)
    return h


class Middle(nnx.Module):
  """Res -> (Attn) -> Res at the lowest resolution."""

  def __init__(self, channels: int, *, attention: bool, rngs: nnx.Rngs, norm_groups: int, dtype):
    self.block_1 = ResnetBlock(channels, channels, norm_groups=norm_groups, rngs=rngs, dtype=dtype)
    self.attn_1 = AttnBlock(channels, norm_groups=norm_groups, rngs=rngs, dtype=dtype) if attention else None
    self.block_2 = ResnetBlock(channels, channels, norm_groups=norm_groups, rngs=rngs, dtype=dtype)

  def __call__(self, h):
    h = self.block_1(h)
    if self.attn_1 is not None:
      h = self.attn_1(h)
    return self.block_2(h)


def _levels_with_attention(attn_levels: Sequence[int] | None, num_levels: int) -> frozenset[int]:
  """None means the lowest-resolution level only; negative entries count from the end."""
  if attn_levels is None:
    return frozenset({num_levels - 1})
  levels = set()
  for lvl in attn_levels:
    if not -num_levels <= lvl < num_levels:
      raise ValueError(f"attention level {lvl} is outside the {num_levels} levels of ch_mult; use 0..{num_levels - 1}"
                       " (or -1 for the lowest resolution).")
    levels.add(lvl % num_levels)
  return frozenset(levels)


class Encoder(nnx.Module):
  """Image (B, H, W, in_channels) -> features (B, H/2^(L-1), W/2^(L-1), out_channels)."""

  def __init__(self, *, in_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
               out_channels: int, attn_levels: Sequence[int] | None = None, mid_attention: bool = True,
               norm_groups: int = 32, rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE):
    num_levels = len(ch_mult)
    with_attn = _levels_with_attention(attn_levels, num_levels)
    self.conv_in = conv(in_channels, ch, 3, rngs=rngs, dtype=dtype)
    levels = []
    block_in = ch
    for i, mult in enumerate(ch_mult):
      block_out = ch * mult
      levels.append(Level(block_in, block_out, num_res_blocks, attention=i in with_attn,
                          resample="down" if i != num_levels - 1 else None, rngs=rngs, norm_groups=norm_groups,
                          dtype=dtype))
      block_in = block_out
    self.down = nnx.List(levels)
    self.mid = Middle(block_in, attention=mid_attention, rngs=rngs, norm_groups=norm_groups, dtype=dtype)
    self.norm_out = group_norm(block_in, num_groups=norm_groups, rngs=rngs)
    self.conv_out = conv(block_in, out_channels, 3, rngs=rngs, dtype=dtype)

  def __call__(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(nnx.swish(self.norm_out(h))).astype(jnp.float32)


class Decoder(nnx.Module):
  """Latent (B, h, w, z_channels) -> image (B, h*2^(L-1), w*2^(L-1), out_channels), unclamped."""

  def __init__(self, *, out_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
               z_channels: int, attn_levels: Sequence[int] | None = None, mid_attention: bool = True,
               norm_groups: int = 32, rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE):
    num_levels = len(ch_mult)
    with_attn = _levels_with_attention(attn_levels, num_levels)
    block_in = ch * ch_mult[-1]
    self.conv_in = conv(z_channels, block_in, 3, rngs=rngs, dtype=dtype)
    self.mid = Middle(block_in, attention=mid_attention, rngs=rngs, norm_groups=norm_groups, dtype=dtype)
    levels = [None] * num_levels
    for i in reversed(range(num_levels)):  # built lowest resolution first, stored by level like LDM's `up`
      block_out = ch * ch_mult[i]
      levels[i] = Level(block_in, block_out, num_res_blocks + 1, attention=i in with_attn,
                        resample="up" if i != 0 else None, rngs=rngs, norm_groups=norm_groups, dtype=dtype)
      block_in = block_out
    self.up = nnx.List(levels)
    self.norm_out = group_norm(block_in, num_groups=norm_groups, rngs=rngs)
    self.conv_out = conv(block_in, out_channels, 3, rngs=rngs, dtype=dtype)

  def __call__(self, z):
    h = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      h = level(h)
    return self.conv_out(nnx.swish(self.norm_out(h))).astype(jnp.float32)


def count_params(module: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param leaves), like sum(p.numel() for p in model.parameters())."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def check_images(x: jax.Array, *, channels: int, multiple: int, name: str = "images"):
  """Raises a ValueError naming the problem when x is not float (B, H, W, channels) with H, W % multiple == 0."""
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f"{name} must be channels-last (B, H, W, {channels}); got shape {tuple(x.shape)}. "
                     "Transpose NCHW inputs with x.transpose(0, 2, 3, 1).")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point in [-1, 1]; got dtype {x.dtype}. "
                     "Convert uint8 images with x / 127.5 - 1.")
  if x.shape[1] % multiple or x.shape[2] % multiple:
    raise ValueError(f"{name} spatial size {tuple(x.shape[1:3])} is not a multiple of the tokenizer stride "
                     f"{multiple}; crop or resize to a multiple of {multiple}.")
