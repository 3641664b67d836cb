"""MAR (Li et al. 2024) and Hi-MAR (Zheng et al. 2025): masked autoregressive generation of continuous tokens.

One backbone class `MAR` serves both: MAR is its one-phase configuration (MLP diffusion head); `HiMAR` is the
two-phase configuration (scale-aware blocks, low-resolution pivots with the MLP head, the dense map with the DiT
head; see its docstring). Families: 'pixel_mar' (quickstart, pixel patches), 'mar' and 'himar' (KL-16 VAE
latents). What the MAR part follows (LTH14/mar
`models/mar.py`, where it and the paper differ, the code):
- encoder: z_proj -> `buffer_size` copies of the class embedding prepended (the learned `fake_latent` replaces it
  with probability `label_drop_prob` per sample in training) -> learned position embedding -> LayerNorm ->
  masked tokens DROPPED (MAE-style) -> pre-LN blocks -> LayerNorm;
- decoder: decoder_embed -> masked positions filled with one learned mask token -> learned position embedding ->
  blocks -> LayerNorm -> buffer removed -> + diffusion position embedding = the head's condition z;
- training: one random order per sample, one mask ratio per batch from truncnorm(loc 1, scale 0.25) on
  [mask_ratio_min, 1], ceil(N * ratio) tokens masked; diffusion loss on masked tokens, with z and targets repeated
  `diffusion_batch_mul` times;
- sampling: `num_iter` steps of a cosine schedule over the random order, linear CFG ramp on eps (the ramp reads
  the clamped mask length, 1 at the last step, as the official sampler).

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
from himar_jax.nn.indexing import lookup_rows, scatter_rows
from himar_jax.nn.layers import DROPOUT_RNGS, dense, dropout_bits_for, dropout_rngs, embed, layer_norm, with_axes
from himar_jax.nn.transformer import REMAT_POLICIES, Block, call_checkpointed, check_remat, run_blocks

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


def example_major(rows_in_tile_order, mul: int):
  """Per-row draws for jnp.tile(x, mul) rows (row m * N + i) reordered for jnp.repeat(x, mul) rows (row
  i * mul + m): the same (row, draw) pairs, so every loss (a mean over rows) is unchanged.

  The heads' inputs are repeated example-major rather than tiled (the official order) because a tiled batch is
  not a contiguous block of any device's batch shard: under data parallelism XLA all-gathered the whole batch of
  decoder maps for it; repeated rows of an example stay on that example's device.
  """
  v = rows_in_tile_order
  return v.reshape((mul, v.shape[0] // mul) + v.shape[1:]).swapaxes(0, 1).reshape(v.shape)


def gather_visible(mask, capacity: int):
  """Indices (B, capacity) of unmasked positions in ascending order, padded with masked ones; and validity."""
  n = mask.shape[-1]
  positions = jnp.arange(n)
  sort_key = jnp.where(mask, n + positions, positions)
  idx = jnp.argsort(sort_key, axis=-1)[:, :capacity]
  valid = ~jnp.take_along_axis(mask, idx, axis=-1)
  return idx, valid


def _place_known(tokens, known, known_mask):
  """Editing: `known` (B, n, C) where known_mask (B, n) is True, `tokens` elsewhere (shapes checked)."""
  if known is None or known.shape != tokens.shape or known_mask.shape != tokens.shape[:2]:
    raise ValueError(f"editing needs known tokens {tokens.shape} and known_mask {tokens.shape[:2]}; got "
                     f"{None if known is None else known.shape} and {known_mask.shape}.")
  return jnp.where(known_mask[..., None], known.astype(jnp.float32), tokens)


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
# The backbone: MAR (one phase) and Hi-MAR (two phases) share it
# ----------------------------------------------------------------------------------------------------------------

class MAR(nnx.Module):
  """MAR's encoder / decoder / MLP head; `num_phases=2` gives Hi-MAR's scale-aware backbone (see HiMAR).

  With one phase: one (1, buffer + N, D) position embedding per stack, one shared mask token, plain blocks.
  With two phases the sequence is `prefix_tokens` low-resolution tokens then N dense tokens (S = P + N); every
  per-phase tensor is one parameter holding both halves, as the official ones: position embeddings
  (1, 2 (buffer + S), D), mask tokens per position (1, 2 S, D); blocks are scale-aware and read a phase
  embedding (Embed(2, D) -> SiLU -> Linear(D, 4D)) computed once per stack and forward.
  """

  def __init__(self, *, num_tokens: int, token_dim: int, num_classes: int, buffer_size: int,
               encoder_dim: int, encoder_depth: int, encoder_heads: int,
               decoder_dim: int, decoder_depth: int, decoder_heads: int,
               head_width: int, head_depth: int, mlp_ratio: float = 4.0, dropout: float = 0.1,
               label_drop_prob: float = 0.1, mask_ratio_min: float = 0.7, diffusion_batch_mul: int = 4,
               num_sampling_steps: str = "100", noise_schedule: str = "cosine", dtype=jnp.bfloat16,
               num_phases: int = 1, prefix_tokens: int = 0, encoder_buckets: int = 1,
               train_encoder_buckets: int = 1, remat: str = "none", dropout_rng: str = "threefry",
               scan_blocks: bool = False, fused_mlp: bool = False, rngs: nnx.Rngs):
    if num_phases not in (1, 2):
      raise ValueError(f"num_phases={num_phases} must be 1 (MAR) or 2 (Hi-MAR).")
    self.num_tokens, self.token_dim, self.num_classes = num_tokens, token_dim, num_classes
    self.buffer_size, self.label_drop_prob = buffer_size, label_drop_prob
    self.mask_ratio_min, self.diffusion_batch_mul = mask_ratio_min, diffusion_batch_mul
    self.num_sampling_steps, self.noise_schedule = num_sampling_steps, noise_schedule
    self.num_phases, self.prefix_tokens = num_phases, prefix_tokens
    if encoder_buckets < 1:
      raise ValueError(f"encoder_buckets={encoder_buckets} must be >= 1.")
    if train_encoder_buckets < 1:
      raise ValueError(f"train_encoder_buckets={train_encoder_buckets} must be >= 1.")
    # Sampling picks among `encoder_buckets` capacities; training among `train_encoder_buckets` (default 1, the
    # whole sequence): under differentiation lax.switch keeps every branch's residuals (or, checkpointed,
    # recomputes the branch), and on the GPU a 4-branch switch of checkpointed 12-block encoders did not compile
    # within minutes.
    self.encoder_buckets, self.train_encoder_buckets = encoder_buckets, train_encoder_buckets
    self.remat = check_remat(remat)
    self.scan_blocks = scan_blocks  # one lax.scan per block stack (nn/transformer.run_blocks): faster compiles
    if dropout_rng not in DROPOUT_RNGS:
      raise ValueError(f"dropout_rng={dropout_rng!r} is not one of {DROPOUT_RNGS}.")
    self.dropout_rng = dropout_rng
    dropout_bits = dropout_bits_for(dropout_rng)
    self.seq_len = prefix_tokens + num_tokens
    # The most tokens visible in MAR training; sampling uses the full length.
    self.train_capacity = num_tokens - int(math.ceil(num_tokens * mask_ratio_min))
    length = buffer_size + self.seq_len
    block_phases = num_phases if num_phases > 1 else 0

    def param(shape, axes):
      return nnx.Param(with_axes(_normal02, axes)(rngs.params(), shape, jnp.float32))

    self.class_emb = nnx.Embed(num_classes, encoder_dim, embedding_init=with_axes(_normal02, ("vocab", "embed")),
                               rngs=rngs)
    self.fake_latent = param((1, encoder_dim), (None, "embed"))
    self.z_proj = dense(token_dim, encoder_dim, (None, "embed"), rngs=rngs, dtype=dtype)
    self.z_proj_ln = layer_norm(encoder_dim, rngs=rngs)
    self.encoder_pos_embed = param((1, num_phases * length, encoder_dim), (None, "length", "embed"))
    self.encoder_blocks = nnx.List([Block(encoder_dim, encoder_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                                          dropout_bits=dropout_bits, num_phases=block_phases, dtype=dtype,
                                          fused_mlp=fused_mlp, rngs=rngs)
                                    for _ in range(encoder_depth)])
    self.encoder_norm = layer_norm(encoder_dim, rngs=rngs)
    self.decoder_embed = dense(encoder_dim, decoder_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    mask_tokens = 1 if num_phases == 1 else num_phases * self.seq_len
    self.mask_token = param((1, mask_tokens, decoder_dim), (None, "length" if mask_tokens > 1 else None, "embed"))
    self.decoder_pos_embed = param((1, num_phases * length, decoder_dim), (None, "length", "embed"))
    self.decoder_blocks = nnx.List([Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                                          dropout_bits=dropout_bits, num_phases=block_phases, dtype=dtype,
                                          fused_mlp=fused_mlp, rngs=rngs)
                                    for _ in range(decoder_depth)])
    self.decoder_norm = layer_norm(decoder_dim, rngs=rngs)
    self.diffusion_pos_embed = param((1, self.seq_len, decoder_dim), (None, "length", "embed"))
    if block_phases:
      # nn.Embedding's default N(0, 1) init: the official init leaves the task embeddings alone.
      normal1 = nnx.initializers.normal(1.0)
      self.encoder_phase_embed = embed(num_phases, encoder_dim, rngs=rngs, axes=(None, "embed"), init=normal1)
      self.encoder_phase_ada = dense(encoder_dim, 4 * encoder_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
      self.decoder_phase_embed = embed(num_phases, decoder_dim, rngs=rngs, axes=(None, "embed"), init=normal1)
      self.decoder_phase_ada = dense(decoder_dim, 4 * decoder_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.diffusion_head = heads.MlpHead(token_dim, decoder_dim, head_width, head_depth, learn_sigma=True,
                                        dtype=dtype, rngs=rngs)

  # -- backbone --------------------------------------------------------------------------------------------------
  def class_embedding(self, labels, drop=None):
    emb = lookup_rows(self.class_emb.embedding[...], labels).astype(jnp.float32)  # batch-parallel gradient
    if drop is None:
      return emb
    return jnp.where(drop[:, None], self.fake_latent[...], emb)

  def condition(self, batch, drop=None):
    """The buffer's condition in training: class embedding of batch['label'] (B, D), fake_latent where drop.
    Subclasses may return (B, buffer_size, D) tokens (text-to-image context)."""
    return self.class_embedding(batch["label"], drop)

  def sampling_conditions(self, labels):
    """(conditional, unconditional) buffer conditions for sampling from `labels` (the sampler's input)."""
    cond = self.class_embedding(labels)
    return cond, jnp.broadcast_to(self.fake_latent[...], cond.shape)

  def _phase_half(self, table, phase: int, length: int):
    """Phase `phase`'s half of a per-phase parameter (the whole parameter with one phase)."""
    return table[...][:, phase * length:(phase + 1) * length]

  def _phase_embedding(self, which: str, phase: int):
    """(1, 4D) modulation input of the scale-aware blocks; None for plain blocks."""
    if self.num_phases == 1:
      return None
    emb = getattr(self, f"{which}_phase_embed")(jnp.asarray([phase]))
    return getattr(self, f"{which}_phase_ada")(nnx.silu(emb)).astype(jnp.float32)

  def encode(self, x, mask, class_emb, capacity: int, *, phase: int = 0, rngs=None):
    """Embedded tokens x (B, S, D), mask (B, S) True = masked -> (B, buffer + capacity, D), gather idx, valid.

    Only visible tokens enter the blocks (MAE-style dropping): the `capacity` first positions in the order
    visible-ascending then masked are gathered and the masked ones excluded as attention keys; their outputs are
    never read. Position embedding and LayerNorm act per token, so they are applied after the gather.
    """
    b = x.shape[0]
    nb = self.buffer_size
    pos = self._phase_half(self.encoder_pos_embed, phase, nb + self.seq_len)
    if class_emb.ndim == 2:  # one class embedding repeated over the buffer; (B, nb, D) context tokens as they are
      class_emb = jnp.broadcast_to(class_emb[:, None, :], (b, nb, class_emb.shape[-1]))
    buffer = class_emb + pos[:, :nb]
    idx, valid = gather_visible(mask, capacity)
    visible = jnp.take_along_axis(x.astype(jnp.float32), idx[..., None], axis=1) + pos[0, nb:][idx]
    x = self.z_proj_ln(jnp.concatenate([buffer, visible], axis=1))
    key_mask = jnp.concatenate([jnp.ones((b, nb), bool), valid], axis=1)
    ada = self._phase_embedding("encoder", phase)
    x = run_blocks(self.encoder_blocks, x, self.remat, phase_embedding=ada, phase=phase, key_mask=key_mask,
                   rngs=rngs, scan=self.scan_blocks)
    return self.encoder_norm(x), idx, valid

  def visible_capacities(self, fixed: int = 0, buckets: int | None = None) -> tuple[int, ...]:
    """Encoder capacities for sequences whose visible count ranges over [fixed, S]: k = `buckets` (default
    `encoder_buckets`) steps (fixed + j (S - fixed) / k, the last = S)."""
    k, s = buckets or self.encoder_buckets, self.seq_len
    return tuple(sorted({fixed + ((s - fixed) * j) // k for j in range(1, k + 1)}))

  def encode_bucketed(self, x, mask, class_emb, capacities, *, phase: int = 0, rngs=None):
    """encode() at the smallest of `capacities` (ascending, the last = S) that holds every row's visible tokens,
    picked at run time with lax.switch: each capacity is compiled once and only the chosen one runs, so a batch
    with few visible tokens does not pay for the full sequence. Outputs are padded to S positions (invalid)."""
    if len(capacities) == 1:
      return self.encode(x, mask, class_emb, capacities[0], phase=phase, rngs=rngs)
    s = self.seq_len
    key = None if rngs is None else rngs.dropout()

    def branch(cap):
      def encode(model, x, mask, class_emb, rngs=None):
        return model.encode(x, mask, class_emb, cap, phase=phase, rngs=rngs)

      def run(operands):
        x, mask, class_emb, key = operands
        # Under differentiation lax.switch keeps the residuals of EVERY branch (their shapes differ, so XLA
        # allocates all of them): checkpointing the branch keeps only its inputs, and the backward pass
        # recomputes the one branch that ran.
        h, idx, valid = call_checkpointed(self, "full" if self.remat != "none" else "none", x, mask, class_emb,
                                          method=encode, rngs=None if key is None else nnx.Rngs(dropout=key))
        pad = s - cap
        return (jnp.pad(h, ((0, 0), (0, pad), (0, 0))), jnp.pad(idx, ((0, 0), (0, pad))),
                jnp.pad(valid, ((0, 0), (0, pad))))
      return run

    visible = jnp.max(jnp.sum(~mask, axis=1))
    index = jnp.searchsorted(jnp.asarray(capacities), visible)  # first capacity >= visible
    return jax.lax.switch(index, [branch(c) for c in capacities], (x, mask, class_emb, key))

  def decode(self, x, idx, valid, *, phase: int = 0, rngs=None):
    """Scatters visible outputs back to their positions, fills the rest with mask tokens -> z (B, S, Dd)."""
    b = x.shape[0]
    x = self.decoder_embed(x).astype(jnp.float32)
    s, nb, d = self.seq_len, self.buffer_size, x.shape[-1]
    if self.mask_token.shape[1] == 1:
      fill = jnp.broadcast_to(self.mask_token[...], (b, s, d))
    else:
      fill = jnp.broadcast_to(self._phase_half(self.mask_token, phase, s), (b, s, d))
    # Padding rows go to a scratch slot s that is dropped afterwards.
    target = jnp.where(valid, idx, s)
    full = jnp.concatenate([fill, jnp.zeros((b, 1, d), jnp.float32)], axis=1)
    full = scatter_rows(full, target, x[:, nb:])[:, :s]
    x = jnp.concatenate([x[:, :nb], full], axis=1) + self._phase_half(self.decoder_pos_embed, phase, nb + s)
    ada = self._phase_embedding("decoder", phase)
    x = run_blocks(self.decoder_blocks, x, self.remat, phase_embedding=ada, phase=phase, rngs=rngs,
                   scan=self.scan_blocks)
    x = self.decoder_norm(x)[:, nb:]
    return x + self.diffusion_pos_embed[...]

  def forward_z(self, tokens, mask, class_emb, capacity: int, rngs=None):
    x, idx, valid = self.encode(self.z_proj(tokens), mask, class_emb, capacity, rngs=rngs)
    return self.decode(x, idx, valid, rngs=rngs)

  def mlp_loss(self, z, target, mask, t, noise):
    """MAR's forward_loss: z (B, N, Dd), target (B, N, C), mask (B, N); rows repeated diffusion_batch_mul times
    (t (mul B N,), noise (mul B N, C), in the official tiled row order; see example_major)."""
    b, n, c = target.shape
    mul = self.diffusion_batch_mul
    z_rep = jnp.repeat(z.reshape(b * n, -1), mul, axis=0)
    target = jnp.repeat(target.reshape(b * n, c), mul, axis=0)
    loss_mask = jnp.repeat(mask.reshape(b * n), mul).astype(jnp.float32)
    diffusion = create_diffusion("", noise_schedule=self.noise_schedule, learn_sigma=True)
    return heads.mlp_head_loss(self.diffusion_head, diffusion, target, z_rep, loss_mask,
                               t=example_major(t, mul), noise=example_major(noise, mul))

  # -- training --------------------------------------------------------------------------------------------------
  def _mar_tokens(self, batch):
    tokens = batch["tokens"] if "tokens" in batch else patchify(batch["latent"], 1)
    if tokens.shape[1:] != (self.num_tokens, self.token_dim):
      raise ValueError(f"MAR takes {self.num_tokens} tokens of {self.token_dim} channels (latent (B, "
                       f"{math.isqrt(self.num_tokens)}, {math.isqrt(self.num_tokens)}, {self.token_dim})); got "
                       f"{tokens.shape}.")
    return tokens.astype(jnp.float32)

  def draw_training(self, key, batch_size: int, step=None) -> dict:
    """Every random draw of one MAR training step (parity tests inject their own dict)."""
    del step  # MAR has no step-dependent schedule (Hi-MAR's null-pivot schedule uses it)
    b, n = batch_size, self.num_tokens
    k_order, k_ratio, k_drop, k_t, k_noise, k_dropout = jax.random.split(key, 6)
    rows = self.diffusion_batch_mul * b * n
    return {"orders": jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(k_order, b)),
            "num_masked": jnp.ceil(n * mask_ratio_sample(k_ratio, self.mask_ratio_min)).astype(jnp.int32),
            "drop": jax.random.uniform(k_drop, (b,)) < self.label_drop_prob,
            "t": jax.random.randint(k_t, (rows,), 0, 1000),
            "noise": jax.random.normal(k_noise, (rows, self.token_dim), jnp.float32),
            "dropout": k_dropout}

  def losses(self, batch, draws, rngs=None):
    """MAR's diffusion loss on the masked tokens for given draws."""
    tokens = self._mar_tokens(batch)
    mask = masks_from_orders(draws["orders"], draws["num_masked"])
    class_emb = self.class_embedding(batch["label"], draws["drop"])
    z = self.forward_z(tokens, mask, class_emb, self.train_capacity, rngs)
    return self.mlp_loss(z, tokens, mask, draws["t"], draws["noise"])

  def train_loss(self, batch, *, key, step=None):
    """Diffusion loss on masked tokens. batch: 'tokens' (B, N, C) or 'latent' (B, h, w, C); 'label' (B,) int."""
    self._mar_tokens(batch)  # shape errors before any work
    draws = self.draw_training(key, batch["label"].shape[0], step)
    loss = self.losses(batch, draws, dropout_rngs(draws["dropout"], self.dropout_rng))
    return loss, {"mask_ratio": draws["num_masked"].astype(jnp.float32) / self.num_tokens}

  # -- sampling --------------------------------------------------------------------------------------------------
  def _sample_positions(self, z, to_pred, *, capacity: int, cfg_scale, keys, step, diffusion, temperature,
                        noise=None):
    """One MLP-head sampling round at the positions to_pred (B, n) of z ((B or 2B), n, Dd): (B, capacity, C)
    new tokens for the `capacity` first to_pred positions of each row (ascending), with their indices / validity.

    cfg_scale None: no guidance; else z stacks [cond; uncond] rows. noise: optional injected (x_T (B, cap, C),
    step noise (T, B, cap, C)); otherwise drawn per row from keys[b] and `step`.
    """
    b, n = to_pred.shape
    c = self.token_dim
    positions = jnp.arange(n)
    pidx = jnp.argsort(jnp.where(to_pred, positions, n + positions), axis=-1)[:, :capacity]
    pvalid = jnp.take_along_axis(to_pred, pidx, axis=-1)
    gather = pidx if cfg_scale is None else jnp.concatenate([pidx, pidx])
    zp = jnp.take_along_axis(z, gather[..., None], axis=1)
    if noise is None:
      row_keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(keys)
      x_init = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, 0), (capacity, c)))(row_keys)
      steps = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, 1),
                                                     (diffusion.num_timesteps, capacity, c)))(row_keys)
      steps = steps.transpose(1, 0, 2, 3)
    else:
      x_init, steps = noise
    new = heads.mlp_head_sample(self.diffusion_head, diffusion, zp.reshape(-1, zp.shape[-1]), cfg_scale=cfg_scale,
                                temperature=temperature, noise=x_init.reshape(b * capacity, c),
                                step_noise=steps.reshape(-1, b * capacity, c))
    return new.reshape(b, capacity, c), pidx, pvalid

  @staticmethod
  def _scatter_rows(tokens, new, pidx, pvalid):
    b, n, c = tokens.shape
    target = jnp.where(pvalid, pidx, n)
    padded = jnp.concatenate([tokens, jnp.zeros((b, 1, c), tokens.dtype)], axis=1)
    return scatter_rows(padded, target, new)[:, :n]

  def sample_tokens(self, labels, *, keys, num_iter: int, cfg: float = 1.0, cfg_schedule: str = "linear",
                    temperature: float = 1.0, num_sampling_steps: str | None = None, orders=None, noise=None,
                    known=None, known_mask=None):
    """MAR's iterative sampler. keys (B,) per-row keys: row b's order and noise depend only on keys[b].

    Tests may inject `orders` (B, N) and `noise` = dict(init (K, B, cap, C), steps (K, T, B, cap, C)).
    Editing: known (B, N, C) tokens where known_mask (B, N) is True are visible from the first step and never
    overwritten; the other tokens are generated over the same num_iter steps (KnownMaskSchedule).
    """
    b, n, c = labels.shape[0], self.num_tokens, self.token_dim
    sched = MaskSchedule(n, num_iter, cfg, cfg_schedule)
    diffusion = create_diffusion(num_sampling_steps or self.num_sampling_steps, noise_schedule=self.noise_schedule,
                                 learn_sigma=True)
    if orders is None:
      orders = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, 0), n))(keys)
    ranks = jnp.argsort(orders, axis=-1)
    init = jnp.zeros((b, n, c), jnp.float32)
    if known_mask is not None:
      sched, ranks = sched.with_known(ranks, known_mask)
      init = _place_known(init, known, known_mask)
    use_cfg = cfg != 1.0
    cond, uncond = self.sampling_conditions(labels)
    class_emb = jnp.concatenate([cond, uncond]) if use_cfg else cond

    def body(k, tokens):
      mask, to_pred = sched.masks(ranks, k)
      in_tokens = jnp.concatenate([tokens, tokens]) if use_cfg else tokens
      in_mask = jnp.concatenate([mask, mask]) if use_cfg else mask
      h, idx, valid = self.encode_bucketed(self.z_proj(in_tokens), in_mask, class_emb, self.visible_capacities())
      z = self.decode(h, idx, valid)
      new, pidx, pvalid = self._sample_positions(
          z, to_pred, capacity=sched.capacity, cfg_scale=sched.scale(k) if use_cfg else None, keys=keys,
          step=k + 1, diffusion=diffusion, temperature=temperature,
          noise=None if noise is None else (noise["init"][k], noise["steps"][k]))
      return self._scatter_rows(tokens, new, pidx, pvalid)

    return jax.lax.fori_loop(0, num_iter, body, init)

  def sample(self, labels, *, keys, **kwargs):
    """Latent maps (B, h, w, C) (tokens in row-major order, patch size 1)."""
    tokens = self.sample_tokens(labels, keys=keys, **kwargs)
    return unpatchify(tokens, 1, self.token_dim)


class MaskSchedule:
  """The cosine masking schedule of one sampling phase (host-side: the same for every row).

  Step k predicts the tokens with rank in [lengths[k], left[k]) of each row's order (MAR's mask_by_order); the
  last step predicts all remaining. The linear CFG ramp reads the official clamped mask length, which is 1 (not
  0) at the last step: cfg_k = 1 + (cfg - 1) (n - max(1, min(left - 1, floor(n cos)))) / n.
  """

  def __init__(self, num_tokens: int, num_iter: int, cfg: float = 1.0, cfg_schedule: str = "linear"):
    if cfg_schedule not in ("linear", "constant"):
      raise ValueError(f"cfg_schedule={cfg_schedule!r} must be 'linear' or 'constant'.")
    if num_iter < 1:
      raise ValueError(f"num_iter={num_iter} must be >= 1.")
    self.n, self.cfg, self.cfg_schedule = num_tokens, cfg, cfg_schedule
    self.lengths = cosine_mask_lengths(num_tokens, num_iter)
    self.left = np.concatenate([[num_tokens], self.lengths[:-1]]).astype(np.int32)
    clamped = self.lengths.copy()
    clamped[-1] = 1
    self.cfg_lengths = clamped
    self.capacity = int(np.max(self.left - self.lengths))  # most tokens predicted in one step

  def masks(self, ranks, k):
    """(masked before step k, predicted at step k), both (B, n) bool, from ranks (B, n) of the orders."""
    left, lengths = jnp.asarray(self.left)[k], jnp.asarray(self.lengths)[k]
    mask = ranks < left
    return mask, mask & (ranks >= lengths)

  def scale(self, k):
    if self.cfg_schedule == "constant":
      return jnp.float32(self.cfg)
    return 1.0 + (self.cfg - 1.0) * (self.n - jnp.asarray(self.cfg_lengths, jnp.float32)[k]) / self.n

  def with_known(self, ranks, known_mask):
    """Editing (inpainting, outpainting): (schedule, ranks) for rows whose `known_mask` (B, n) tokens are given.
    See KnownMaskSchedule."""
    if known_mask.shape != ranks.shape:
      raise ValueError(f"known_mask {known_mask.shape} must have the shape of the token grid {ranks.shape}.")
    return KnownMaskSchedule(self, known_mask), KnownMaskSchedule.known_last(ranks, known_mask)


class KnownMaskSchedule(MaskSchedule):
  """The cosine schedule over each row's u unknown tokens: known tokens are visible from the first step and never
  predicted, unknown tokens keep their random order and take ranks 0..u-1 (known_last), and step k masks ranks <
  left_k(u) and predicts ranks in [lengths_k(u), left_k(u)) with lengths(u) = cosine_mask_lengths(u, K), so every
  unknown token is predicted exactly once in the same K steps. With nothing known this is MaskSchedule. The CFG
  ramp (scale) is the unedited one. Capacity: the most tokens any row can predict in one step, over all u."""

  def __init__(self, base: MaskSchedule, known_mask):
    n, num_iter = base.n, len(base.lengths)
    self.n, self.cfg, self.cfg_schedule = n, base.cfg, base.cfg_schedule
    self.lengths, self.left, self.cfg_lengths = base.lengths, base.left, base.cfg_lengths
    table = np.zeros((n + 1, num_iter), np.int32)
    for u in range(1, n + 1):
      table[u] = cosine_mask_lengths(u, num_iter)
    left = np.concatenate([np.arange(n + 1, dtype=np.int32)[:, None], table[:, :-1]], axis=1)
    self.capacity = max(1, int(np.max(left - table)))
    unknown = jnp.sum(~known_mask.astype(bool), axis=-1)
    self.row_lengths, self.row_left = jnp.asarray(table)[unknown], jnp.asarray(left)[unknown]  # (B, K)

  @staticmethod
  def known_last(ranks, known_mask):
    """Ranks with every unknown token before every known one, each group in its original order."""
    n = ranks.shape[-1]
    return jnp.argsort(jnp.argsort(jnp.where(known_mask, n + ranks, ranks), axis=-1), axis=-1)

  def masks(self, ranks, k):
    left, lengths = self.row_left[:, k][:, None], self.row_lengths[:, k][:, None]
    mask = ranks < left
    return mask, mask & (ranks >= lengths)


# ----------------------------------------------------------------------------------------------------------------
# Hi-MAR
# ----------------------------------------------------------------------------------------------------------------

class HiMAR(MAR):
  """Hi-MAR (Zheng et al., ICML 2025): phase 1 predicts the low-resolution pivots (MLP head), phase 2 the dense
  map conditioned on them (DiT head), with one scale-aware backbone (`MAR(num_phases=2)`).

  What the code follows (HiDream-ai/himar `models/himar.py`, the code where it and the paper differ):
  - sequence = P = lowres_grid^2 pivot positions then N = grid^2 dense positions, plus the class-embedding
    buffer; phase 1 sees cat[cond_proj(low-res latents), z_proj(dense)] with every dense token masked and
    ceil(P r1) pivots masked (r1 ~ truncnorm as MAR); phase 2 sees every pivot position (null pivots
    cond_proj(cond_tokens), or cond_z_proj(small_z) = the detached phase-1 decoder output) and ceil(N r2) dense
    tokens masked, r2 = cos(pi/2 U);
  - null pivots in training: per sample, all P pivots are null with probability 1 - step_stage2_rate *
    min(1, epoch / step_warmup) (epoch = step // steps_per_epoch); otherwise pivots visible in phase 1 are null
    and those masked in phase 1 are cond_z_proj(small_z);
  - class embedding dropped to fake_latent independently per phase (label_drop_prob);
  - losses: the MLP head on masked pivots (mse + vb) and the DiT head on the dense map (masked mse divided by
    every element), combined as phase_loss_weights (0.4, 0.6) = (64/320 * 2.0, 256/320 * 0.75) of the official
    forward and engine; both heads see targets repeated diffusion_batch_mul times;
  - sampling: 4 * lowres_grid cosine steps over the pivots with CFG `re_cfg` on the MLP head; then num_iter
    cosine steps over the dense map with CFG `cfg` where BOTH halves see the conditional pivots (only the class
    embedding differs); the DiT head resamples the whole map with RePaint re-imposition of known tokens, and
    every position still masked before a step takes the new sample (the official sampler does this too).
  Paper vs code (the code is followed; the published checkpoints depend on it): the scale embedding is
  Embed(2, D) -> SiLU -> Linear with 4 modulation terms and no shift, gates start at 1 (not adaLN-Zero); the
  null-pivot schedule, per-position mask tokens, split position embeddings, the 0.4 / 0.6 weights, the DiT head's
  fixed variance / 250 steps / RePaint / no class input, and the conditional pivots in the unconditional branch
  are not in the paper.
  Static shapes: phase-1 encoder capacity = P - ceil(P mask_ratio_min) visible pivots; phase 2 the whole sequence,
  or with encoder_buckets = k (sampling) / train_encoder_buckets = k (training) the smallest of k capacities
  P + j N / k that holds the batch's visible tokens, picked at run time (lax.switch over k compiled branches);
  padding is excluded as attention keys, so no mask ratio recompiles.
  """

  def __init__(self, *, grid_size: int, lowres_grid: int, token_dim: int, dit_width: int, dit_depth: int,
               dit_heads: int, dit_mlp_ratio: float = 4.0, step_stage2_rate: float = 0.25,
               step_warmup_epochs: int = 100, steps_per_epoch: int = 1,
               phase_loss_weights: tuple[float, float] = (0.4, 0.6), dit_sampling_steps: str = "250",
               fused_norm: bool = False, fused_mlp: bool = False, dit_remat: str = "same", rngs: nnx.Rngs,
               dtype=jnp.bfloat16, **kwargs):
    super().__init__(num_tokens=grid_size ** 2, token_dim=token_dim, num_phases=2, prefix_tokens=lowres_grid ** 2,
                     dtype=dtype, fused_mlp=fused_mlp, rngs=rngs, **kwargs)
    encoder_dim = self.z_proj.out_features
    decoder_dim = self.decoder_embed.out_features
    self.grid_size, self.lowres_grid = grid_size, lowres_grid
    self.step_stage2_rate, self.step_warmup_epochs = step_stage2_rate, step_warmup_epochs
    self.steps_per_epoch = steps_per_epoch
    self.phase_loss_weights = tuple(phase_loss_weights)
    self.dit_sampling_steps = dit_sampling_steps
    p = self.prefix_tokens
    self.lowres_capacity = p - int(math.ceil(p * self.mask_ratio_min))
    self.cond_proj = dense(token_dim, encoder_dim, (None, "embed"), rngs=rngs, dtype=dtype)
    self.cond_z_proj = dense(decoder_dim, encoder_dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.cond_tokens = nnx.Param(with_axes(_normal02, (None, "length", None))(rngs.params(), (1, p, token_dim),
                                                                               jnp.float32))
    self.dit_head = heads.DiTHead(token_dim, decoder_dim, dit_width, dit_depth, dit_heads, grid_size=grid_size,
                                  mlp_ratio=dit_mlp_ratio, learn_sigma=False, dtype=dtype,
                                  remat=self.remat if dit_remat == "same" else dit_remat,
                                  scan_blocks=self.scan_blocks, rngs=rngs,
                                  norm_implementation="pallas_gpu" if fused_norm else "xla", fused_mlp=fused_mlp)

  # -- inputs ------------------------------------------------------------------------------------------------------
  def _tokens(self, batch):
    latent, small = batch["latent"], batch["latent_small"]
    g, lg, c = self.grid_size, self.lowres_grid, self.token_dim
    if latent.shape[1:] != (g, g, c) or small.shape[1:] != (lg, lg, c) or small.shape[0] != latent.shape[0]:
      raise ValueError(f"Hi-MAR takes latent (B, {g}, {g}, {c}) and latent_small (B, {lg}, {lg}, {c}) (channel-"
                       f"last VAE latents of the image and its half-size copy); got {latent.shape} and "
                       f"{small.shape}.")
    return patchify(latent.astype(jnp.float32), 1), patchify(small.astype(jnp.float32), 1)

  def null_pivot_prob(self, step):
    """Probability that a training sample gets only null pivots at `step`."""
    if step is None:
      progress = 1.0
    else:
      epoch = jnp.floor_divide(jnp.asarray(step, jnp.int32), self.steps_per_epoch).astype(jnp.float32)
      progress = jnp.minimum(1.0, epoch / self.step_warmup_epochs) if self.step_warmup_epochs > 0 else 1.0
    return 1.0 - self.step_stage2_rate * progress

  def draw_training(self, key, batch_size: int, step=None) -> dict:
    """Every random draw of one training step (parity tests inject their own dict)."""
    b, p, n, mul = batch_size, self.prefix_tokens, self.num_tokens, self.diffusion_batch_mul
    ks = jax.random.split(key, 12)
    perm = lambda k, m: jax.vmap(lambda kk: jax.random.permutation(kk, m))(jax.random.split(k, b))
    r2 = jnp.cos(jax.random.uniform(ks[3], ()) * jnp.pi / 2)
    return {
        "order_low": perm(ks[0], p), "order_dense": perm(ks[1], n),
        "num_masked_low": jnp.ceil(p * mask_ratio_sample(ks[2], self.mask_ratio_min)).astype(jnp.int32),
        "num_masked_dense": jnp.clip(jnp.ceil(n * r2), 1, n).astype(jnp.int32),
        "drop_low": jax.random.uniform(ks[4], (b,)) < self.label_drop_prob,
        "drop_dense": jax.random.uniform(ks[5], (b,)) < self.label_drop_prob,
        "null_pivots": jax.random.uniform(ks[6], (b,)) <= self.null_pivot_prob(step),
        "t_low": jax.random.randint(ks[7], (mul * b * p,), 0, 1000),
        "noise_low": jax.random.normal(ks[8], (mul * b * p, self.token_dim), jnp.float32),
        "t_dense": jax.random.randint(ks[9], (mul * b,), 0, 1000),
        "noise_dense": jax.random.normal(ks[10], (mul * b, n, self.token_dim), jnp.float32),
        "dropout": ks[11],
    }

  def pivot_inputs(self, small_z, visible_low=None, null_all=None):
    """Phase-2 pivot embeddings (B, P, D): cond_z_proj(small_z) where the pivot was masked in phase 1 (all
    when visible_low is None), null pivots cond_proj(cond_tokens) elsewhere and for rows with null_all."""
    real = self.cond_z_proj(small_z).astype(jnp.float32)
    null = self.cond_proj(self.cond_tokens[...]).astype(jnp.float32)
    out = real if visible_low is None else jnp.where(visible_low[..., None], null, real)
    if null_all is not None:
      out = jnp.where(null_all[:, None, None], null, out)
    return out

  def losses(self, batch, draws, rngs=None, *, return_z: bool = False):
    """(phase-1 MLP-head loss, phase-2 DiT-head loss) for given draws (the official forward returns 2.0 x and
    0.75 x these); with return_z also the heads' conditions (z_low (B, P, Dd), z_dense (B, N, Dd))."""
    dense, low = self._tokens(batch)
    b, p, n, mul = dense.shape[0], self.prefix_tokens, self.num_tokens, self.diffusion_batch_mul
    drop_class = lambda drop: self.condition(batch, drop)
    # Phase 1: pivots masked by the truncnorm ratio, every dense token masked (and never embedded).
    mask_low = masks_from_orders(draws["order_low"], draws["num_masked_low"])
    mask1 = jnp.concatenate([mask_low, jnp.ones((b, n), bool)], axis=1)
    x1 = jnp.concatenate([self.cond_proj(low).astype(jnp.float32),
                          jnp.zeros((b, n, self.z_proj.out_features), jnp.float32)], axis=1)
    h, idx, valid = self.encode(x1, mask1, drop_class(draws["drop_low"]), self.lowres_capacity, phase=0, rngs=rngs)
    z_low = self.decode(h, idx, valid, phase=0, rngs=rngs)[:, :p]
    loss_low = self.mlp_loss(z_low, low, mask_low, draws["t_low"], draws["noise_low"])
    # Phase 2: every pivot visible, dense tokens masked by the cosine ratio.
    pivots = self.pivot_inputs(jax.lax.stop_gradient(z_low), ~mask_low, draws["null_pivots"])
    mask_dense = masks_from_orders(draws["order_dense"], draws["num_masked_dense"])
    mask2 = jnp.concatenate([jnp.zeros((b, p), bool), mask_dense], axis=1)
    x2 = jnp.concatenate([pivots, self.z_proj(dense).astype(jnp.float32)], axis=1)
    h, idx, valid = self.encode_bucketed(x2, mask2, drop_class(draws["drop_dense"]),
                                         self.visible_capacities(p, self.train_encoder_buckets),
                                         phase=1, rngs=rngs)
    z_dense = self.decode(h, idx, valid, phase=1, rngs=rngs)[:, p:]
    diffusion = create_diffusion("", noise_schedule=self.noise_schedule, learn_sigma=False)
    loss_dense = heads.dit_head_loss(self.dit_head, diffusion, jnp.repeat(dense, mul, axis=0),
                                     jnp.repeat(z_dense, mul, axis=0), jnp.repeat(mask_dense, mul, axis=0),
                                     t=example_major(draws["t_dense"], mul),
                                     noise=example_major(draws["noise_dense"], mul))
    if return_z:
      return loss_low, loss_dense, (z_low, z_dense)
    return loss_low, loss_dense

  def train_loss(self, batch, *, key, step=None):
    """Weighted two-phase loss. batch: latent (B, 16, 16, C), latent_small (B, 8, 8, C), label (B,)."""
    self._tokens(batch)  # shape errors before any work
    draws = self.draw_training(key, batch["latent"].shape[0], step)
    loss_low, loss_dense = self.losses(batch, draws, dropout_rngs(draws["dropout"], self.dropout_rng))
    w1, w2 = self.phase_loss_weights
    loss = w1 * loss_low + w2 * loss_dense
    return loss, {"loss_lowres": loss_low, "loss_dense": loss_dense,
                  "mask_ratio_lowres": draws["num_masked_low"].astype(jnp.float32) / self.prefix_tokens,
                  "mask_ratio_dense": draws["num_masked_dense"].astype(jnp.float32) / self.num_tokens,
                  "null_pivot_prob": jnp.asarray(self.null_pivot_prob(step), jnp.float32)}

  # -- sampling ----------------------------------------------------------------------------------------------------
  def sample_orders(self, keys):
    """Per-row orders of the pivots (B, P) and of the dense map (B, N) from keys[b] alone."""
    p, n = self.prefix_tokens, self.num_tokens
    low = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, 0), p))(keys)
    dense = jax.vmap(lambda k: jax.random.permutation(jax.random.fold_in(k, 1), n))(keys)
    return low, dense

  def sample_tokens(self, labels, *, keys, num_iter: int, cfg: float = 1.0, re_cfg: float = 1.0,
                    cfg_schedule: str = "linear", temperature: float = 1.0, num_sampling_steps: str | None = None,
                    dit_sampling_steps: str | None = None, dit_sampling_method: str = "ddpm", orders=None,
                    noise=None, known=None, known_mask=None):
    """Hi-MAR's two-phase sampler: (pivots (B, P, C), dense tokens (B, N, C)).

    dit_sampling_method: "ddpm" (the official ancestral sampler) or "ddim" (deterministic DDIM steps over the
    respaced schedule, e.g. dit_sampling_steps="ddim25": the fast preset of SAMPLING_PRESETS).

    Editing: known = (pivots (B, P, C), dense (B, N, C)) with known_mask = ((B, P), (B, N)): known pivots (the
    latents of the known low-resolution image) are visible from phase 1's first step, known dense tokens from
    phase 2's; neither is ever overwritten (KnownMaskSchedule). Phase 2 sees null pivots at the known pivot
    positions, as training does for pivots visible in phase 1.

    keys (B,): row b's orders and noise depend only on keys[b]. Tests may inject `orders` (low (B, P), dense
    (B, N)) and `noise` = dict(low_init (K1, B, cap1, C), low_steps (K1, T1, B, cap1, C), dense_init
    (K2, B, N, C), dense_steps (K2, T2, B, N, C)) with K1 = 4 lowres_grid, K2 = num_iter.
    """
    b, p, n, c = labels.shape[0], self.prefix_tokens, self.num_tokens, self.token_dim
    low_sched = MaskSchedule(p, 4 * self.lowres_grid, re_cfg, cfg_schedule)
    dense_sched = MaskSchedule(n, num_iter, cfg, cfg_schedule)
    mlp_diffusion = create_diffusion(num_sampling_steps or self.num_sampling_steps,
                                     noise_schedule=self.noise_schedule, learn_sigma=True)
    dit_diffusion = create_diffusion(dit_sampling_steps or self.dit_sampling_steps,
                                     noise_schedule=self.noise_schedule, learn_sigma=False)
    order_low, order_dense = self.sample_orders(keys) if orders is None else orders
    ranks_low, ranks_dense = jnp.argsort(order_low, axis=-1), jnp.argsort(order_dense, axis=-1)
    init_low, init_dense = jnp.zeros((b, p, c), jnp.float32), jnp.zeros((b, n, c), jnp.float32)
    if known_mask is not None:
      low_sched, ranks_low = low_sched.with_known(ranks_low, known_mask[0])
      dense_sched, ranks_dense = dense_sched.with_known(ranks_dense, known_mask[1])
      init_low, init_dense = _place_known(init_low, known[0], known_mask[0]), _place_known(init_dense, known[1],
                                                                                            known_mask[1])
    cond, uncond = self.sampling_conditions(labels)
    d = cond.shape[-1]
    twice = lambda x: jnp.concatenate([x, x])

    # Phase 1: pivots; small_z keeps each pivot's decoder output from the step that predicted it.
    cfg1 = re_cfg != 1.0
    class1 = jnp.concatenate([cond, uncond]) if cfg1 else cond

    def low_body(k, carry):
      low, small_z = carry
      mask, to_pred = low_sched.masks(ranks_low, k)
      x = jnp.concatenate([self.cond_proj(low).astype(jnp.float32), jnp.zeros((b, n, d), jnp.float32)], axis=1)
      full_mask = jnp.concatenate([mask, jnp.ones((b, n), bool)], axis=1)
      if cfg1:
        x, full_mask = twice(x), twice(full_mask)
      h, idx, valid = self.encode(x, full_mask, class1, p, phase=0)
      z = self.decode(h, idx, valid, phase=0)[:, :p]
      small_z = jnp.where(to_pred[..., None], z[:b], small_z)
      step_noise = None if noise is None else (noise["low_init"][k], noise["low_steps"][k])
      new, pidx, pvalid = self._sample_positions(
          z, to_pred, capacity=low_sched.capacity, cfg_scale=low_sched.scale(k) if cfg1 else None,
          keys=jax.vmap(lambda kk: jax.random.fold_in(kk, 2))(keys), step=k, diffusion=mlp_diffusion,
          temperature=temperature, noise=step_noise)
      return self._scatter_rows(low, new, pidx, pvalid), small_z

    init = (init_low, jnp.zeros((b, p, self.diffusion_pos_embed.shape[-1]), jnp.float32))
    low, small_z = jax.lax.fori_loop(0, low_sched.lengths.shape[0], low_body, init)

    # Phase 2: dense map; both CFG halves see the conditional pivots.
    cfg2 = cfg != 1.0
    class2 = jnp.concatenate([cond, uncond]) if cfg2 else cond
    pivots = self.pivot_inputs(small_z, None if known_mask is None else known_mask[0])
    dense_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, 3))(keys)
    t2 = dit_diffusion.num_timesteps

    def dense_body(k, dense):
      mask, _ = dense_sched.masks(ranks_dense, k)
      x = jnp.concatenate([pivots, self.z_proj(dense).astype(jnp.float32)], axis=1)
      full_mask = jnp.concatenate([jnp.zeros((b, p), bool), mask], axis=1)
      if cfg2:
        x, full_mask = twice(x), twice(full_mask)
      h, idx, valid = self.encode_bucketed(x, full_mask, class2, self.visible_capacities(p), phase=1)
      z = self.decode(h, idx, valid, phase=1)[:, p:]
      if noise is None:
        row_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, k))(dense_keys)
        x_init = jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, 0), (n, c)))(row_keys)
        steps = None
        if dit_sampling_method != "ddim":  # DDIM (eta 0) takes no per-step noise
          steps = jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, 1), (t2, n, c)))(row_keys)
          steps = steps.transpose(1, 0, 2, 3)
      else:
        x_init, steps = noise["dense_init"][k], noise["dense_steps"][k]
      new = heads.dit_head_sample(self.dit_head, dit_diffusion, z, known=dense, predict_mask=mask,
                                  cfg_scale=dense_sched.scale(k) if cfg2 else None, temperature=temperature,
                                  noise=x_init, step_noise=steps, method=dit_sampling_method)
      return jnp.where(mask[..., None], new, dense)

    dense = jax.lax.fori_loop(0, num_iter, dense_body, init_dense)
    return low, dense

  def sample(self, labels, *, keys, **kwargs):
    """Latent maps (B, grid, grid, C) of the dense phase (decode with the KL VAE after dividing by its scale)."""
    _, dense = self.sample_tokens(labels, keys=keys, **kwargs)
    return unpatchify(dense, 1, self.token_dim)


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
# Config plumbing: families 'pixel_mar' (quickstart), 'mar' and 'himar' (VAE latents)
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
_FAMILIES = ("pixel_mar", "mar", "himar")


def _check_positive(m, *names):
  for name in names:
    value = m[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.model.{name}={value!r} must be a positive integer.")


def validate(config) -> None:
  m = config.model
  if m.family not in _FAMILIES:
    raise ValueError(f"config.model.family={m.family!r} is not one of {_FAMILIES} (himar_jax.models.himar).")
  if m.family == "pixel_mar" and config.data.image_size % m.patch_size:
    raise ValueError(f"config.data.image_size={config.data.image_size} is not divisible by "
                     f"config.model.patch_size={m.patch_size}; pick a patch size that divides it.")
  _check_positive(m, "num_classes", "buffer_size", "encoder_dim", "encoder_depth", "encoder_heads", "decoder_dim",
                  "decoder_depth", "decoder_heads", "head_width", "head_depth", "diffusion_batch_mul", "num_iter")
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
  if m.cfg_schedule not in ("linear", "constant"):
    raise ValueError(f"config.model.cfg_schedule={m.cfg_schedule!r} must be 'linear' or 'constant'.")
  if m.family in ("mar", "himar"):
    _check_positive(m, "grid_size", "token_dim", "encoder_buckets")
  if m.family == "himar":
    _check_positive(m, "lowres_grid", "dit_width", "dit_depth", "dit_heads", "steps_per_epoch")
    dit_remat = m.get("dit_remat", "same")
    if dit_remat != "same" and dit_remat not in REMAT_POLICIES:
      raise ValueError(f"config.model.dit_remat={dit_remat!r} is not 'same' (the backbone's remat) or one of "
                       f"{sorted(REMAT_POLICIES)}.")
    if m.grid_size % m.lowres_grid:
      raise ValueError(f"config.model.lowres_grid={m.lowres_grid} must divide grid_size={m.grid_size} (the "
                       "pivots are the latents of the half-size image: 8 for 16).")
    if m.dit_width % m.dit_heads or m.dit_width % 4:
      raise ValueError(f"config.model.dit_width={m.dit_width} must be divisible by dit_heads={m.dit_heads} and "
                       "by 4 (2D sin-cos position embedding).")
    if not 0.0 <= m.step_stage2_rate <= 1.0:
      raise ValueError(f"config.model.step_stage2_rate={m.step_stage2_rate} must lie in [0, 1].")
    if m.step_warmup_epochs < 0:
      raise ValueError(f"config.model.step_warmup_epochs={m.step_warmup_epochs} must be >= 0.")
    if len(m.phase_loss_weights) != 2:
      raise ValueError(f"config.model.phase_loss_weights={m.phase_loss_weights!r} must hold two weights "
                       "(low-resolution phase, dense phase).")


def _backbone_kwargs(m) -> dict:
  return dict(num_classes=m.num_classes, buffer_size=m.buffer_size,
              encoder_dim=m.encoder_dim, encoder_depth=m.encoder_depth, encoder_heads=m.encoder_heads,
              decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads,
              head_width=m.head_width, head_depth=m.head_depth, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
              label_drop_prob=m.label_drop_prob, mask_ratio_min=m.mask_ratio_min,
              diffusion_batch_mul=m.diffusion_batch_mul, num_sampling_steps=m.num_sampling_steps,
              encoder_buckets=m.get("encoder_buckets", 1), train_encoder_buckets=m.get("train_encoder_buckets", 1),
              remat=m.get("remat", "none"), dropout_rng=m.get("dropout_rng", "threefry"),
              scan_blocks=m.get("scan_blocks", False), fused_mlp=m.get("fused_mlp", False), dtype=_DTYPES[m.dtype])


def build(config, rngs: nnx.Rngs) -> MAR:
  m = config.model
  if m.family == "pixel_mar":
    return PixelMAR(image_size=config.data.image_size, channels=m.channels, patch_size=m.patch_size, rngs=rngs,
                    **_backbone_kwargs(m))
  if m.family == "mar":
    return MAR(num_tokens=m.grid_size ** 2, token_dim=m.token_dim, rngs=rngs, **_backbone_kwargs(m))
  return HiMAR(rngs=rngs, **himar_kwargs(m))


def himar_kwargs(m) -> dict:
  """HiMAR's constructor arguments from config.model (subclasses such as HiMART2I add theirs)."""
  return dict(grid_size=m.grid_size, lowres_grid=m.lowres_grid, token_dim=m.token_dim, dit_width=m.dit_width,
              dit_depth=m.dit_depth, dit_heads=m.dit_heads, dit_mlp_ratio=m.dit_mlp_ratio,
              step_stage2_rate=m.step_stage2_rate, step_warmup_epochs=m.step_warmup_epochs,
              steps_per_epoch=m.steps_per_epoch, phase_loss_weights=tuple(m.phase_loss_weights),
              dit_sampling_steps=m.dit_sampling_steps, fused_norm=m.get("fused_norm", False),
              dit_remat=m.get("dit_remat", "same"), **_backbone_kwargs(m))


# Named sampler settings over a config's own (config.model.sampling_preset). "fast" is not the published sampler:
# deterministic DDIM with 25 of the 1000 steps for the DiT head (the Hi-MAR-B sampler spends ~80% of its FLOPs
# there at 250 DDPM steps); its effect on quality is measured in bench/notes.md, never mixed into headline numbers.
SAMPLING_PRESETS = {
    "published": {},
    "fast": {"dit_sampling_steps": "ddim25", "dit_sampling_method": "ddim"},
}


def sample_kwargs(config) -> dict:
  m = config.model
  out = {"num_iter": m.num_iter, "cfg": m.cfg, "cfg_schedule": m.cfg_schedule, "temperature": m.temperature}
  if m.family == "himar":
    out["re_cfg"] = m.re_cfg
    out["dit_sampling_method"] = m.get("dit_sampling_method", "ddpm")
  preset = m.get("sampling_preset", "published")
  if preset not in SAMPLING_PRESETS:
    raise ValueError(f"config.model.sampling_preset={preset!r} is not one of {sorted(SAMPLING_PRESETS)}.")
  if preset != "published":
    if m.family != "himar":
      raise ValueError(f"config.model.sampling_preset={preset!r} sets the DiT head's sampler, which only the "
                       f"himar family has (this is {m.family!r}); use 'published'.")
    out.update(SAMPLING_PRESETS[preset])
  return out
