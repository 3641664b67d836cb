"""Diffusion heads of MAR / Hi-MAR, with their losses and samplers on top of `himar_jax.diffusion`.

- `MlpHead`: MAR's `SimpleMLPAdaLN` (phase-1 head of Hi-MAR, the only head of MAR). One token at a time: input
  projection, sinusoidal timestep embedding + condition projection, residual MLP blocks modulated by adaLN
  (shift, scale, gate), a final non-affine LayerNorm + adaLN and a linear layer to 2 x token channels (eps and
  learned-variance values).
- `DiTHead`: Hi-MAR's phase-2 Diffusion-Transformer head (the official `DiT` built by `GlobalDiffLoss`): the
  whole noisy latent map as tokens, a per-token linear embedding (the official 1x1 convolution) plus a fixed 2D
  sin-cos position embedding, a per-token condition c = t_emb + c_embedder(z) from the phase-2 decoder output,
  DiT blocks (non-affine LayerNorms, full self-attention, tanh-GELU MLP, per-token 6-way adaLN), a final layer.
  The class label is NOT an input (the official label embedder is commented out).

Tokens are channel-last: the MLP head sees (N, C); the DiT head (N, L, C) with L = grid_size^2 in row-major
order (what MAR's patchify with p = 1 and the official NCHW flatten both give).
Params are float32 with logical axis names; matmuls run in `dtype` (bfloat16 by default, float32 for parity);
LayerNorms, the residual stream and all diffusion arithmetic stay float32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.diffusion import GaussianDiffusion
from himar_jax.kernels.modulated_norm import modulated_layer_norm
from himar_jax.nn.layers import DEFAULT_COMPUTE_DTYPE, Mlp, dense, layer_norm, with_compute_dtype_kernels
from himar_jax.nn.transformer import SelfAttention, check_remat, run_blocks
from himar_jax.parallel.sharding import constrain

_normal002 = nnx.initializers.normal(0.02)
_zeros = nnx.initializers.zeros_init()


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
  """Sinusoidal embedding of (possibly fractional) timesteps (N,) -> (N, dim) float32, [cos, sin] halves."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def modulate(x, shift, scale):
  return x * (1.0 + scale) + shift


@functools.lru_cache(maxsize=16)
def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
  """Fixed (grid_size^2, dim) position embedding of the official DiT / MAE code, float32.

  Token l = row * grid_size + col. The first dim/2 channels encode the COLUMN index, the last dim/2 the ROW
  index (the official meshgrid puts w first); each half is [sin(pos * w_k), cos(pos * w_k)] with
  w_k = 10000^(-k / (dim/4)), computed in float64.
  """
  if dim % 4:
    raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4; got {dim}.")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def one_axis(pos):
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def _f32(x):
  return x.astype(jnp.float32)


class TimestepEmbedder(nnx.Module):
  """timestep_embedding(256) -> Linear -> SiLU -> Linear (both weights N(0, 0.02) at init, as the official)."""

  def __init__(self, width: int, *, rngs: nnx.Rngs, freq_dim: int = 256, dtype=DEFAULT_COMPUTE_DTYPE):
    self.freq_dim = freq_dim
    self.fc1 = dense(freq_dim, width, (None, "mlp"), rngs=rngs, dtype=dtype, kernel_init=_normal002)
    self.fc2 = dense(width, width, ("mlp", "embed"), rngs=rngs, dtype=dtype, kernel_init=_normal002)

  def __call__(self, t):
    return _f32(self.fc2(nnx.silu(_f32(self.fc1(timestep_embedding(t, self.freq_dim))))))


# ----------------------------------------------------------------------------------------------------------------
# MLP head (MAR SimpleMLPAdaLN)
# ----------------------------------------------------------------------------------------------------------------

class MlpResBlock(nnx.Module):
  """x + gate * MLP(LN(x) * (1 + scale) + shift); (shift, scale, gate) = Linear(SiLU(y)), zero-initialised."""

  def __init__(self, width: int, *, rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE):
    self.norm = layer_norm(width, rngs=rngs, epsilon=1e-6)
    self.fc1 = dense(width, width, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = dense(width, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.adaln = dense(width, 3 * width, ("embed", "mlp"), rngs=rngs, dtype=dtype, kernel_init=_zeros)

  def __call__(self, x, y):
    shift, scale, gate = jnp.split(_f32(self.adaln(nnx.silu(y))), 3, axis=-1)
    h = modulate(self.norm(x), shift, scale)
    h = _f32(self.fc2(nnx.silu(_f32(self.fc1(h)))))
    return x + gate * h


class FinalLayer(nnx.Module):
  """Non-affine LN, adaLN (shift, scale) and a linear output layer; all zero-initialised (DiT / MAR).
  norm_implementation: modulated_layer_norm's backend ('xla', or the opt-in 'pallas_gpu' kernel)."""

  def __init__(self, width: int, out_channels: int, *, rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE,
               norm_implementation: str = "xla"):
    self.adaln = dense(width, 2 * width, ("embed", "mlp"), rngs=rngs, dtype=dtype, kernel_init=_zeros)
    self.linear = dense(width, out_channels, ("embed", None), rngs=rngs, dtype=dtype, kernel_init=_zeros)
    self.compute_dtype, self.norm_implementation = dtype, norm_implementation

  def __call__(self, x, c):
    _, y = modulated_layer_norm(x, self.adaln(nnx.silu(c)), shift=0, scale=1, out_dtype=self.compute_dtype,
                                implementation=self.norm_implementation)
    return _f32(self.linear(y))


class MlpHead(nnx.Module):
  """MAR's SimpleMLPAdaLN: (x (N, C), original timesteps t (N,), condition z (N, Dz)) -> (N, C or 2C).

  Sizes of the published models (width x depth, Dz = decoder width): MAR/Hi-MAR B 1024 x 6, L 1280 x 8,
  H 1536 x 12; token channels 16; learn_sigma doubles the output for the learned-range variance.
  """

  def __init__(self, in_channels: int, cond_channels: int, width: int, depth: int, *, rngs: nnx.Rngs,
               learn_sigma: bool = True, dtype=DEFAULT_COMPUTE_DTYPE):
    self.in_channels = in_channels
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.time_embed = TimestepEmbedder(width, rngs=rngs, dtype=dtype)
    self.cond_embed = dense(cond_channels, width, (None, "embed"), rngs=rngs, dtype=dtype)
    self.input_proj = dense(in_channels, width, (None, "embed"), rngs=rngs, dtype=dtype)
    self.res_blocks = nnx.List([MlpResBlock(width, rngs=rngs, dtype=dtype) for _ in range(depth)])
    self.final_layer = FinalLayer(width, self.out_channels, rngs=rngs, dtype=dtype)

  def __call__(self, x, t, z):
    if x.ndim != 2 or x.shape[-1] != self.in_channels:
      raise ValueError(f"MlpHead takes tokens (N, {self.in_channels}); got {x.shape}.")
    if z.shape[0] != x.shape[0] or t.shape != x.shape[:1]:
      raise ValueError(f"x {x.shape}, t {t.shape} and z {z.shape} must share the leading (token) dimension.")
    return self.denoise(x, t, self.embed_condition(z))

  def embed_condition(self, z):
    """cond_embed(z) (N, width) float32: the timestep-free part of the condition, computed once per sampling
    loop (z is fixed within it)."""
    return _f32(self.cond_embed(z))

  def denoise(self, x, t, z_emb):
    """The head's output from z_emb = embed_condition(z)."""
    h = _f32(self.input_proj(x))
    y = constrain(self.time_embed(t) + z_emb)  # token rows: batch-sharded (see constrain)
    for block in self.res_blocks:
      h = block(constrain(h), y)
    return constrain(self.final_layer(constrain(h), y))


# ----------------------------------------------------------------------------------------------------------------
# DiT head (Hi-MAR phase 2)
# ----------------------------------------------------------------------------------------------------------------

def _torch_conv_default_init(fan_in: int):
  """PyTorch's default Conv2d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the official c_embedder keeps it)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class DiTBlock(nnx.Module):
  """DiT block with per-token adaLN: (shift, scale, gate) for attention and for the tanh-GELU MLP.

  The non-affine LayerNorms, their modulation and the attention's gated residual go through modulated_layer_norm,
  which reads the adaLN chunks in place (norm_implementation: its backend, 'xla' or the opt-in 'pallas_gpu')."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, mlp_ratio: float = 4.0,
               dtype=DEFAULT_COMPUTE_DTYPE, attention: str | None = None, norm_implementation: str = "xla",
               fused_mlp: bool = False):
    self.attn = SelfAttention(width, num_heads, rngs=rngs, dtype=dtype, implementation=attention)
    self.mlp = Mlp(width, int(width * mlp_ratio), rngs=rngs, approximate_gelu=True, dtype=dtype,
                   fused_gelu=fused_mlp)
    self.adaln = dense(width, 6 * width, ("embed", "mlp"), rngs=rngs, dtype=dtype, kernel_init=_zeros)
    self.compute_dtype, self.norm_implementation = dtype, norm_implementation

  def __call__(self, x, c):
    mod = self.adaln(nnx.silu(c))  # (..., 6 W): shift, scale, gate for the attention, then for the MLP
    norm = functools.partial(modulated_layer_norm, out_dtype=self.compute_dtype,
                             implementation=self.norm_implementation)
    _, y = norm(x, mod, shift=0, scale=1)
    x, y = norm(x, mod, shift=3, scale=4, h=self.attn(y), gate=2)
    gate_mlp = mod[..., 5 * x.shape[-1]:]
    return x + _f32(gate_mlp) * _f32(self.mlp(y))


class DiTHead(nnx.Module):
  """Hi-MAR's DiT head: (x (N, L, C), original timesteps t (N,), decoder map z (N, L, Dz)) -> (N, L, C[*2]).

  Published sizes (width x depth, heads; mlp_ratio 4): B 512 x 6 (8), L 512 x 8 (8), H 768 x 12 (12), on the
  16 x 16 map of 16-channel tokens. Parameter count: the official class also registers `pos_embed` (fixed,
  recomputed here) and `c_pos_embed` (never used by its forward) as parameters, 2 x L x width numbers that are
  not nnx.Params here. norm_implementation: the blocks' and the final layer's modulated_layer_norm backend ('xla';
  'pallas_gpu' is the opt-in kernel, slower inside this head on the H100: kernels/modulated_norm.py). fused_mlp:
  the blocks' fc1 bias + GELU in the matmul's epilogue where that kernel runs (kernels/fused_dense.py; opt-in).
  """

  def __init__(self, in_channels: int, cond_channels: int, width: int, depth: int, num_heads: int, *,
               rngs: nnx.Rngs, grid_size: int = 16, mlp_ratio: float = 4.0, learn_sigma: bool = False,
               dtype=DEFAULT_COMPUTE_DTYPE, attention: str | None = None, remat: str = "none",
               scan_blocks: bool = False, norm_implementation: str = "xla", fused_mlp: bool = False):
    self.in_channels = in_channels
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    self.grid_size = grid_size
    self.remat = check_remat(remat)
    self.scan_blocks = scan_blocks
    self.width = width
    sincos_pos_embed_2d(width, grid_size)  # validates the width early
    self.x_embedder = dense(in_channels, width, (None, "embed"), rngs=rngs, dtype=dtype)
    self.c_embedder = dense(cond_channels, width, (None, "embed"), rngs=rngs, dtype=dtype,
                            kernel_init=_torch_conv_default_init(cond_channels),
                            bias_init=_torch_conv_default_init(cond_channels))
    self.t_embedder = TimestepEmbedder(width, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([DiTBlock(width, num_heads, rngs=rngs, mlp_ratio=mlp_ratio, dtype=dtype,
                                     attention=attention, norm_implementation=norm_implementation,
                                     fused_mlp=fused_mlp)
                            for _ in range(depth)])
    self.final_layer = FinalLayer(width, self.out_channels, rngs=rngs, dtype=dtype,
                                  norm_implementation=norm_implementation)

  def pos_embed(self):
    return jnp.asarray(sincos_pos_embed_2d(self.width, self.grid_size))

  def __call__(self, x, t, z):
    seq = self.grid_size ** 2
    if x.ndim != 3 or x.shape[1:] != (seq, self.in_channels):
      raise ValueError(f"DiTHead takes token maps (N, {seq}, {self.in_channels}) (a {self.grid_size}x"
                       f"{self.grid_size} grid, row-major); got {x.shape}.")
    if z.ndim != 3 or z.shape[:2] != x.shape[:2] or t.shape != x.shape[:1]:
      raise ValueError(f"z must be (N, {seq}, Dz) and t (N,) for x {x.shape}; got z {z.shape}, t {t.shape}.")
    return self.denoise(x, t, self.embed_condition(z))

  def embed_condition(self, z):
    """c_embedder(z) (N, L, width) float32: the timestep-free part of the per-token condition. A sampler
    computes it once per decoder map and reuses it at every diffusion step (z does not change within a loop)."""
    return _f32(self.c_embedder(z))

  def denoise(self, x, t, z_emb):
    """The head's output from z_emb = embed_condition(z) (what __call__ computes after embedding z)."""
    h = _f32(self.x_embedder(x)) + self.pos_embed()[None]
    c = constrain(self.t_embedder(t)[:, None, :] + z_emb)
    h = run_blocks(self.blocks, h, self.remat, c, scan=self.scan_blocks)
    return constrain(self.final_layer(h, c))


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------

def _draw_t_noise(diffusion: GaussianDiffusion, shape, t, noise, key):
  if t is None or noise is None:
    if key is None:
      raise ValueError("pass key= (to draw timesteps and noise) or both t= and noise=.")
    key_t, key_n = jax.random.split(key)
    if t is None:
      t = jax.random.randint(key_t, shape[:1], 0, diffusion.num_timesteps)
    if noise is None:
      noise = jax.random.normal(key_n, shape, jnp.float32)
  return t, noise


def mlp_head_loss(head: MlpHead, diffusion: GaussianDiffusion, target, z, mask=None, *, t=None, noise=None,
                  key=None):
  """MAR's DiffLoss: per-token mse + vb (learned sigma), averaged over tokens with mask == 1 (all without mask).

  target (N, C) token latents, z (N, Dz) conditions, mask (N,) float (1 = masked token that counts); t (N,)
  spaced indices of `diffusion` (the 1000-step training process) and noise (N, C) are drawn from key unless
  given.
  """
  t, noise = _draw_t_noise(diffusion, target.shape, t, noise, key)
  terms = diffusion.training_losses(lambda x_t, tt: head(x_t, tt, z), target, t, noise)
  loss = terms["loss"]
  if mask is None:
    return jnp.mean(loss)
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.sum(loss * mask) / jnp.sum(mask)


def dit_head_loss(head: DiTHead, diffusion: GaussianDiffusion, target, z, mask, *, t=None, noise=None, key=None):
  """Hi-MAR's GlobalDiffLoss: mean over (L, C) of ((eps - eps_hat) * mask)^2, then over the batch.

  The official code divides by every element (C x H x W), not by the masked count. target (N, L, C), z
  (N, L, Dz), mask (N, L) (1 = masked), one timestep per image.
  """
  t, noise = _draw_t_noise(diffusion, target.shape, t, noise, key)
  mse_mask = jnp.asarray(mask, jnp.float32)[..., None]
  terms = diffusion.training_losses(lambda x_t, tt: head(x_t, tt, z), target, t, noise, mse_mask=mse_mask)
  return jnp.mean(terms["loss"])


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------

def _guided(apply, z, cfg_scale, channels):
  """model_fn over the conditional half with CFG on eps: z holds [cond rows; uncond rows] (2B rows); apply(x, t, z)
  runs the head (a head's denoise with z = its embed_condition)."""

  def model_fn(x, t):
    out = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]), z)
    b = x.shape[0]
    cond, uncond = out[:b], out[b:]
    eps = uncond[..., :channels] + cfg_scale * (cond[..., :channels] - uncond[..., :channels])
    # The variance channels (if any) come from the conditional half, as in the official forward_with_cfg.
    return jnp.concatenate([eps, cond[..., channels:]], axis=-1)

  return model_fn


def _start(shape, key, noise, step_noise, *, noiseless: bool = False):
  """(x_T, key for per-step noise or None). noiseless: the sampler draws no per-step noise (DDIM, eta 0)."""
  loop_key = None
  if noise is None:
    if key is None:
      raise ValueError("pass key= or noise= (the initial x_T) to the sampler.")
    key, sub = jax.random.split(key)
    noise = jax.random.normal(sub, shape, jnp.float32)
  elif noise.shape != shape:
    raise ValueError(f"initial noise must have shape {shape}; got {noise.shape}.")
  if step_noise is None and not noiseless:
    if key is None:
      raise ValueError("pass key= or step_noise= (the per-step noise) to the sampler.")
    loop_key = key
  return noise, loop_key


def mlp_head_sample(head: MlpHead, diffusion: GaussianDiffusion, z, *, cfg_scale=None, temperature=1.0,
                    key=None, noise=None, step_noise=None):
  """Samples one token per condition row with `diffusion` (e.g. create_diffusion('100')): (B, C).

  Without guidance z is (B, Dz). With cfg_scale (may be a traced scalar), z is (2B, Dz) = [conditional rows;
  unconditional rows], both halves start from the same noise and eps = eps_u + cfg (eps_c - eps_u); the
  official sampler also carries a second, discarded half, so only the conditional half is returned here.
  temperature multiplies the per-step noise.
  """
  b = z.shape[0] if cfg_scale is None else z.shape[0] // 2
  if cfg_scale is not None and z.shape[0] % 2:
    raise ValueError(f"with cfg_scale, z must stack conditional and unconditional rows (even count); got {z.shape}.")
  c = head.in_channels
  head = with_compute_dtype_kernels(head)  # weight casts once, not at every diffusion step
  z_emb = head.embed_condition(z)  # hoisted out of the diffusion loop
  model_fn = ((lambda x, t: head.denoise(x, t, z_emb)) if cfg_scale is None
              else _guided(head.denoise, z_emb, cfg_scale, c))
  x_init, loop_key = _start((b, c), key, noise, step_noise)
  return diffusion.p_sample_loop(model_fn, x_init, key=loop_key, step_noise=step_noise, temperature=temperature)


def dit_head_sample(head: DiTHead, diffusion: GaussianDiffusion, z, *, known, predict_mask, cfg_scale=None,
                    temperature=1.0, key=None, noise=None, step_noise=None, method: str = "ddpm"):
  """Samples the whole token map with RePaint re-imposition of known tokens (Hi-MAR phase 2): (B, L, C).

  z: (B, L, Dz), or (2B, L, Dz) = [conditional; unconditional] decoder maps with cfg_scale; known (B, L, C)
  tokens (values at generated positions are ignored); predict_mask (B, L) True where tokens are generated.
  Each step first overwrites known positions with q_sample(known, t, x_T), then denoises the full map
  (`diffusion` is the 250-step fixed-large process in the published models). method="ddim" takes deterministic
  DDIM steps (eta 0) instead of ancestral ones: the fast sampling preset, not the official sampler.
  """
  b = z.shape[0] if cfg_scale is None else z.shape[0] // 2
  shape = (b, head.grid_size ** 2, head.in_channels)
  if known.shape != shape or predict_mask.shape != shape[:2]:
    raise ValueError(f"known must be {shape} and predict_mask {shape[:2]} for z {z.shape}; got "
                     f"{known.shape} and {predict_mask.shape}.")
  # The weight casts and the condition embedding are hoisted out of the diffusion loop (once per map, not per step).
  head = with_compute_dtype_kernels(head)
  z_emb = head.embed_condition(z)
  model_fn = ((lambda x, t: head.denoise(x, t, z_emb)) if cfg_scale is None
              else _guided(head.denoise, z_emb, cfg_scale, head.in_channels))
  if method not in ("ddpm", "ddim"):
    raise ValueError(f"DiT head sampling method={method!r} is not one of 'ddpm', 'ddim'.")
  x_init, loop_key = _start(shape, key, noise, step_noise, noiseless=method == "ddim")
  if method == "ddim":  # noiseless: no per-step noise is drawn or read
    return diffusion.ddim_sample_loop(model_fn, x_init, known=known, predict_mask=predict_mask)
  return diffusion.p_sample_loop(model_fn, x_init, key=loop_key, step_noise=step_noise, temperature=temperature,
                                 known=known, predict_mask=predict_mask)
