"""MAR (Li et al. 2024): masked autoregressive generation of continuous tokens with an MLP diffusion head.

MAR is the one-phase special case of Hi-MAR; this module is the home of both (the two-phase Hi-MAR path with
low-resolution pivots and the DiT head extends it by configuration). What the code follows (LTH14/mar
`models/mar.py`, where it and the paper differ, the code):
- encoder: z_proj -> `buffer_size` copies of the class embedding prepended (the learned `fake_latent` replaces it
  with probability `label_drop_prob` per sample in training) -> learned position embedding -> LayerNorm ->
  masked tokens DROPPED (MAE-style) -> pre-LN blocks -> LayerNorm;
- decoder: decoder_embed -> masked positions filled with one learned mask token -> learned position embedding ->
  blocks -> LayerNorm -> buffer removed -> + diffusion position embedding = the head's condition z;
- training: one random order per sample, one mask ratio per batch from truncnorm(loc 1, scale 0.25) on
  [mask_ratio_min, 1], ceil(N * ratio) tokens masked; diffusion loss on masked tokens, with z and targets repeated
  `diffusion_batch_mul` times;
- sampling: `num_iter` steps of a cosine schedule over the random order, linear CFG ramp on eps.

Static shapes: the encoder sees a fixed-capacity sequence (buffer + the most tokens that can be visible in
training, N - ceil(N * mask_ratio_min)) gathered in ascending position order, with padding excluded as attention
keys; its visible-token outputs equal MAR's dropped-token encoder exactly, and no mask ratio recompiles.
Randomness: every draw comes from the `key` argument (training) or the per-row `keys` (sampling).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.diffusion.gaussian import create_diffusion
from himar_jax.models import heads
from himar_jax.nn.layers import dense, layer_norm, with_axes
from himar_jax.nn.transformer import Block

_normal02 = nnx.initializers.normal(0.02)


# ----------------------------------------------------------------------------------------------------------------
# Tokens: images <-> (B, N, C) sequences
# ----------------------------------------------------------------------------------------------------------------

def patchify(images, patch_size: int):
  """(B, H, W, C) -> (B, (H/p)*(W/p), C*p*p), row-major tokens with features ordered (c, p, q) as MAR's
  `nchpwq->nhwcpq`."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens, patch_size: int, channels: int):
  b, n, _ = tokens.shape
  side = math.isqrt(n)
  p = patch_size
  x = tokens.reshape(b, side, side, channels, p, p)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, side * p, side * p, channels)


def mask_ratio_sample(key, mask_ratio_min: float, std: float = 0.25):
  """MAR's truncnorm((min - 1) / std, 0, loc=1, scale=std): one ratio per batch."""
  return 1.0 + std * jax.random.truncated_normal(key, (mask_ratio_min - 1.0) / std, 0.0, (), jnp.float32)


def masks_from_orders(orders, num_masked):
  """mask[b, orders[b, i]] = i < num_masked (True = masked)."""
  ranks = jnp.argsort(orders, axis=-1)
  return ranks < num_masked


def gather_visible(mask, capacity: int):
  """Indices (B, capacity) of unmasked positions in ascending order, padded with masked ones; and validity."""
  n = mask.shape[-1]
  positions = jnp.arange(n)
  sort_key = jnp.where(mask, n + positions, positions)
  idx = jnp.argsort(sort_key, axis=-1)[:, :capacity]
  valid = ~jnp.take_along_axis(mask, idx, axis=-1)
  return idx, valid


def cosine_mask_lengths(num_tokens: int, num_iter: int) -> np.ndarray:
  """Tokens still masked after each sampling step (MAR: floor(N cos(pi/2 (k+1)/K)) clamped to [1, left - 1];
  the last step predicts all remaining). Host-side: the schedule is the same for every row."""
  left, out = num_tokens, []
  for k in range(num_iter):
    if k == num_iter - 1:
      nxt = 0
    else:
      nxt = int(np.floor(num_tokens * np.cos(np.pi / 2.0 * (k + 1) / num_iter)))
      nxt = max(1, min(left - 1, nxt))
    out.append(nxt)
    left = nxt
  return np.asarray(out, np.int32)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------

class MAR(nnx.Module):

  def __init__(self, *, num_tokens: int, token_dim: int, num_classes: int, buffer_size: int,
               encoder_dim: int, encoder_depth: int, encoder_heads: int,
               decoder_dim: int, decoder_depth: int, decoder_heads: int,
               head_width: int, head_depth: int, mlp_ratio: float = 4.0, dropout: float = 0.1,
               label_drop_prob: float = 0.1, mask_ratio_min: float = 0.7, diffusion_batch_mul: int = 4,
               num_sampling_steps: str = "100", noise_schedule: str = "cosine", dtype=jnp.bfloat16,
               rngs: nnx.Rngs):
    self.num_tokens, self.token_dim, self.num_classes = num_tokens, token_dim, num_classes
    self.buffer_size, self.label_drop_prob = buffer_size, label_drop_prob
    self.mask_ratio_min, self.diffusion_batch_mul = mask_ratio_min, diffusion_batch_mul
    self.num_sampling_steps, self.noise_schedule = num_sampling_steps, noise_schedule
    # The most tokens visible in training; sampling uses the full length.
    self.train_capacity = num_tokens - int(math.ceil(num_tokens * mask_ratio_min))
    length = buffer_size + num_tokens

    def param(shape, axes):
      return nnx.Param(with_axes(_normal02, axes)(rngs.params(), shape, jnp.float32))

    self.class_emb = nnx.Embed(num_classes, encoder_dim, embedding_init=with_axes(_normal02, ("vocab", "embed")),
                               rngs=rngs)
    self.fake_latent = param((1, encoder_dim), (None, "embed"))
    self.z_proj = dense(token_dim, encoder_dim, (None, "embed"), rngs=rngs, dtype=dtype)
    self.z_proj_ln = layer_norm(encoder_dim, rngs=rngs)
    self.encoder_pos_embed = param((1, length, encoder_dim), (None, "length", "embed"))
    self.encoder_blocks = nnx.List([Block(encoder_dim, encoder_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                                          dtype=dtype, rngs=rngs) for _ in range(encoder_depth)])
    self.encoder_norm = layer_norm(encoder_dim, rngs=rngs)
    self.decoder_embed = dense(encoder_dim, decoder_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.mask_token = param((1, 1, decoder_dim), (None, None, "embed"))
    self.decoder_pos_embed = param((1, length, decoder_dim), (None, "length", "embed"))
    self.decoder_blocks = nnx.List([Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                                          dtype=dtype, rngs=rngs) for _ in range(decoder_depth)])
    self.decoder_norm = layer_norm(decoder_dim, rngs=rngs)
    self.diffusion_pos_embed = param((1, num_tokens, decoder_dim), (None, "length", "embed"))
    self.diffusion_head = heads.MlpHead(token_dim, decoder_dim, head_width, head_depth, learn_sigma=True,
                                        dtype=dtype, rngs=rngs)

  # -- backbone --------------------------------------------------------------------------------------------------
  def class_embedding(self, labels, drop=None):
    emb = self.class_emb(labels).astype(jnp.float32)
    if drop is None:
      return emb
    return jnp.where(drop[:, None], self.fake_latent[...], emb)

  def encode(self, tokens, mask, class_emb, capacity: int, rngs=None):
    """tokens (B, N, C), mask (B, N) True = masked -> encoder output (B, buffer + capacity, D), gather idx, valid."""
    b = tokens.shape[0]
    x = self.z_proj(tokens).astype(jnp.float32)
    buffer = jnp.broadcast_to(class_emb[:, None, :], (b, self.buffer_size, class_emb.shape[-1]))
    x = jnp.concatenate([buffer, x], axis=1) + self.encoder_pos_embed[...]
    x = self.z_proj_ln(x)
    idx, valid = gather_visible(mask, capacity)
    visible = jnp.take_along_axis(x[:, self.buffer_size:], idx[..., None], axis=1)
    x = jnp.concatenate([x[:, :self.buffer_size], visible], axis=1)
    key_mask = jnp.concatenate([jnp.ones((b, self.buffer_size), bool), valid], axis=1)
    for block in self.encoder_blocks:
      x = block(x, key_mask=key_mask, rngs=rngs)
    return self.encoder_norm(x), idx, valid

  def decode(self, x, idx, valid, rngs=None):
    """Scatters visible outputs back to their positions, fills the rest with the mask token -> z (B, N, Dd)."""
    b = x.shape[0]
    x = self.decoder_embed(x).astype(jnp.float32)
    n, nb = self.num_tokens, self.buffer_size
    # Padding rows go to a scratch slot n that is dropped afterwards.
    target = jnp.where(valid, idx, n)
    full = jnp.broadcast_to(self.mask_token[...], (b, n + 1, x.shape[-1]))
    full = full.at[jnp.arange(b)[:, None], target].set(x[:, nb:])[:, :n]
    x = jnp.concatenate([x[:, :nb], full], axis=1) + self.decoder_pos_embed[...]
    for block in self.decoder_blocks:
      x = block(x, rngs=rngs)
    x = self.decoder_norm(x)[:, nb:]
    return x + self.diffusion_pos_embed[...]

  def forward_z(self, tokens, mask, class_emb, capacity: int, rngs=None):
    x, idx, valid = self.encode(tokens, mask, class_emb, capacity, rngs)
    return self.decode(x, idx, valid, rngs)

  # -- training --------------------------------------------------------------------------------------------------
  def train_loss(self, batch, *, key, step=None):
    """Diffusion loss on masked tokens. `batch['tokens']` (B, N, C) float, `batch['label']` (B,) int."""
    del step  # MAR has no step-dependent schedule (Hi-MAR's null-pivot schedule uses it)
    tokens, labels = batch["tokens"].astype(jnp.float32), batch["label"]
    b, n, c = tokens.shape
    k_order, k_ratio, k_drop, k_t, k_noise, k_dropout = jax.random.split(key, 6)
    orders = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(k_order, b))
    num_masked = jnp.ceil(n * mask_ratio_sample(k_ratio, self.mask_ratio_min)).astype(jnp.int32)
    mask = masks_from_orders(orders, num_masked)
    drop = jax.random.uniform(k_drop, (b,)) < self.label_drop_prob
    rngs = nnx.Rngs(dropout=k_dropout)
    z = self.forward_z(tokens, mask, self.class_embedding(labels, drop), self.train_capacity, rngs)
    mul = self.diffusion_batch_mul
    z_rep = jnp.tile(z.reshape(b * n, -1), (mul, 1))
    target = jnp.tile(tokens.reshape(b * n, c), (mul, 1))
    loss_mask = jnp.tile(mask.reshape(b * n), (mul,)).astype(jnp.float32)
    diffusion = create_diffusion("", noise_schedule=self.noise_schedule, learn_sigma=True)
    t = jax.random.randint(k_t, (target.shape[0],), 0, diffusion.num_timesteps)
    noise = jax.random.normal(k_noise, target.shape, jnp.float32)
    loss = heads.mlp_head_loss(self.diffusion_head, diffusion, target, z_rep, loss_mask, t=t, noise=noise)
    return loss, {"mask_ratio": num_masked.astype(jnp.float32) / n}

  # -- sampling --------------------------------------------------------------------------------------------------
  def sample_tokens(self, labels, *, keys, num_iter: int, cfg: float = 1.0, cfg_schedule: str = "linear",
                    temperature: float = 1.0, num_sampling_steps: str | None = None):
    """MAR's iterative sampler. keys (B,) per-row keys: row b's order and noise depend only on keys[b]."""
    b, n, c = labels.shape[0], self.num_tokens, self.token_dim
    if cfg_schedule not in ("linear", "constant"):
      raise ValueError(f"cfg_schedule={cfg_schedule!r} must be 'linear' or 'constant'.")
    lengths = cosine_mask_lengths(n, num_iter)
    left = np.concatenate([[n], lengths[:-1]])
    capacity = int(np.max(left - lengths))  # most tokens predicted in one step
    diffusion = create_diffusion(num_sampling_steps or self.num_sampling_steps, noise_schedule=self.noise_schedule,
                                 learn_sigma=True)
    orders = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, 0), n))(keys)
    ranks = jnp.argsort(orders, axis=-1)
    use_cfg = cfg != 1.0
    cond = self.class_embedding(labels)
    class_emb = jnp.concatenate([cond, jnp.broadcast_to(self.fake_latent[...], cond.shape)]) if use_cfg else cond
    lengths_j, left_j = jnp.asarray(lengths), jnp.asarray(left)

    def body(k, tokens):
      # As MAR's mask_by_order: the first `left` tokens of each row's order are masked before step k, the first
      # `lengths[k]` after it; the ones in between are predicted now.
      mask = ranks < left_j[k]
      to_pred = mask & (ranks >= lengths_j[k])
      in_tokens = jnp.concatenate([tokens, tokens]) if use_cfg else tokens
      in_mask = jnp.concatenate([mask, mask]) if use_cfg else mask
      z = self.forward_z(in_tokens, in_mask, class_emb, n)
      # Fixed-capacity gather of the positions predicted this step (in order), so every step has one shape.
      positions = jnp.arange(n)
      pidx = jnp.argsort(jnp.where(to_pred, positions, n + positions), axis=-1)[:, :capacity]
      pvalid = jnp.take_along_axis(to_pred, pidx, axis=-1)
      gather = jnp.concatenate([pidx, pidx]) if use_cfg else pidx
      zp = jnp.take_along_axis(z, gather[..., None], axis=1)
      scale = (1.0 + (cfg - 1.0) * (n - lengths_j[k]) / n) if cfg_schedule == "linear" else jnp.float32(cfg)
      # Per-row noise (x_T and every step's), from the row's key alone.
      row_keys = jax.vmap(lambda key: jax.random.fold_in(key, k + 1))(keys)
      x_init = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, 0), (capacity, c)))(row_keys)
      steps = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, 1),
                                                     (diffusion.num_timesteps, capacity, c)))(row_keys)
      new = heads.mlp_head_sample(self.diffusion_head, diffusion, zp.reshape(-1, zp.shape[-1]),
                                  cfg_scale=scale if use_cfg else None, temperature=temperature,
                                  noise=x_init.reshape(b * capacity, c),
                                  step_noise=steps.transpose(1, 0, 2, 3).reshape(-1, b * capacity, c))
      new = new.reshape(b, capacity, c)
      target = jnp.where(pvalid, pidx, n)
      padded = jnp.concatenate([tokens, jnp.zeros((b, 1, c), tokens.dtype)], axis=1)
      return padded.at[jnp.arange(b)[:, None], target].set(new)[:, :n]

    return jax.lax.fori_loop(0, num_iter, body, jnp.zeros((b, n, c), jnp.float32))


class PixelMAR(MAR):
  """MAR on pixel patches: the tokenizer is patchify (no VAE), for Fashion-MNIST-sized images on a CPU."""

  def __init__(self, *, image_size: int, channels: int, patch_size: int, **kwargs):
    self.image_size, self.channels, self.patch_size = image_size, channels, patch_size
    super().__init__(num_tokens=(image_size // patch_size) ** 2, token_dim=channels * patch_size ** 2, **kwargs)

  def train_loss(self, batch, *, key, step=None):
    tokens = patchify(batch["image"].astype(jnp.float32), self.patch_size)
    return super().train_loss({"tokens": tokens, "label": batch["label"]}, key=key, step=step)

  def sample(self, labels, *, keys, **kwargs):
    tokens = self.sample_tokens(labels, keys=keys, **kwargs)
    return jnp.clip(unpatchify(tokens, self.patch_size, self.channels), -1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Config plumbing (family 'pixel_mar')
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def validate(config) -> None:
  m = config.model
  if config.data.image_size % m.patch_size:
    raise ValueError(f"config.data.image_size={config.data.image_size} is not divisible by "
                     f"config.model.patch_size={m.patch_size}; pick a patch size that divides it.")
  for name in ("encoder_dim", "decoder_dim"):
    heads_name = name.replace("_dim", "_heads")
    if m[name] % m[heads_name]:
      raise ValueError(f"config.model.{name}={m[name]} is not divisible by config.model.{heads_name}="
                       f"{m[heads_name]}.")
  if not 0.0 < m.mask_ratio_min <= 1.0:
    raise ValueError(f"config.model.mask_ratio_min={m.mask_ratio_min} must lie in (0, 1].")
  if not 0.0 <= m.label_drop_prob < 1.0:
    raise ValueError(f"config.model.label_drop_prob={m.label_drop_prob} must lie in [0, 1).")
  if m.dtype not in _DTYPES:
    raise ValueError(f"config.model.dtype={m.dtype!r} must be one of {sorted(_DTYPES)}.")
  if m.num_iter < 1:
    raise ValueError(f"config.model.num_iter={m.num_iter} must be >= 1.")


def build(config, rngs: nnx.Rngs) -> PixelMAR:
  m = config.model
  return PixelMAR(image_size=config.data.image_size, channels=m.channels, patch_size=m.patch_size,
                  num_classes=m.num_classes, buffer_size=m.buffer_size,
                  encoder_dim=m.encoder_dim, encoder_depth=m.encoder_depth, encoder_heads=m.encoder_heads,
                  decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
                  head_width=m.head_width, head_depth=m.head_depth, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
                  label_drop_prob=m.label_drop_prob, mask_ratio_min=m.mask_ratio_min,
                  diffusion_batch_mul=m.diffusion_batch_mul, num_sampling_steps=m.num_sampling_steps,
                  dtype=_DTYPES[m.dtype], rngs=rngs)


def sample_kwargs(config) -> dict:
  m = config.model
  return {"num_iter": m.num_iter, "cfg": m.cfg, "cfg_schedule": m.cfg_schedule, "temperature": m.temperature}
