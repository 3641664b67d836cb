"""Analytic FLOP counts of one Hi-MAR / MAR training step (what MFU divides by).

Counts every weight matmul and attention matmul of the official algorithm, 2 FLOPs per multiply-add, at the
EXPECTED number of tokens each stack processes: the official PyTorch code drops masked tokens exactly (every row of
a batch shares one mask ratio), so the encoder sees buffer + E[visible] tokens, with the mask-ratio distributions
of training (MAR: truncated normal, mean 1, std 0.25 on [mask_ratio_min, 1]; Hi-MAR phase 2: cos(pi/2 U)).
Padding our static shapes add (encoder capacities) is overhead, not useful work, and is not counted.
Backward = 2 x forward (training = 3 x forward); activation recomputation is not counted either.
Elementwise work (norms, softmax, adaLN modulation) is left out: it is < 1% of the matmul FLOPs here.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def expected_truncnorm_ratio(mask_ratio_min: float, std: float = 0.25) -> float:
  """E[r] for MAR's mask ratio r ~ truncnorm(mean 1, std, [mask_ratio_min, 1])."""
  a = (mask_ratio_min - 1.0) / std
  return float(stats.truncnorm(a, 0.0, loc=1.0, scale=std).mean())


def expected_masked(n: int, ratio_samples: np.ndarray) -> float:
  return float(np.mean(np.ceil(n * ratio_samples)))


def _block_flops(tokens: float, width: int, mlp_ratio: float, *, adaln: int = 0) -> float:
  """One pre-LN Transformer block over `tokens` tokens (per image): qkv + proj + MLP + attention (+ per-token adaLN
  producing `adaln` x width values)."""
  hidden = int(width * mlp_ratio)
  dense = tokens * (4 * width * width + 2 * width * hidden + adaln * width * width)
  attention = 2 * tokens * tokens * width  # q k^T and p v
  return 2.0 * (dense + attention)


def _mlp_head_flops(rows: float, m) -> float:
  w, c, dz = m.head_width, m.token_dim, m.decoder_dim
  per_row = c * w + dz * w + 256 * w + w * w + m.head_depth * (2 * w * w + 3 * w * w) + 2 * w * w + w * 2 * c
  return 2.0 * rows * per_row


def _dit_head_flops(rows: float, m) -> float:
  w, c, dz, n = m.dit_width, m.token_dim, m.decoder_dim, m.grid_size ** 2
  per_row = n * (c * w + dz * w + 2 * w * w + w * c) + 256 * w + w * w
  blocks = m.dit_depth * _block_flops(n, w, m.dit_mlp_ratio, adaln=6) / 2.0
  return 2.0 * rows * (per_row + blocks)


def train_flops_per_image(config, samples: int = 200_000, seed: int = 0) -> dict:
  """Forward and training FLOPs per image for the config's model (family mar or himar), with the breakdown."""
  m = config.model
  rng = np.random.default_rng(seed)
  a = (m.mask_ratio_min - 1.0) / 0.25
  r_trunc = stats.truncnorm(a, 0.0, loc=1.0, scale=0.25).rvs(samples, random_state=rng)
  n, nb, mul = m.grid_size ** 2, m.buffer_size, m.diffusion_batch_mul
  enc = lambda tokens: m.encoder_depth * _block_flops(tokens, m.encoder_dim, m.mlp_ratio)
  dec = lambda tokens: m.decoder_depth * _block_flops(tokens, m.decoder_dim, m.mlp_ratio)
  embed = lambda tokens: 2.0 * tokens * (m.token_dim * m.encoder_dim + m.encoder_dim * m.decoder_dim)
  parts = {}
  if m.family == "mar":
    visible = n - expected_masked(n, r_trunc)
    parts["encoder"] = enc(nb + visible)
    parts["decoder"] = dec(nb + n)
    parts["embeddings"] = embed(nb + n)
    parts["mlp_head"] = _mlp_head_flops(mul * n, m)
  elif m.family == "himar":
    p = m.lowres_grid ** 2
    s = p + n
    visible_low = p - expected_masked(p, r_trunc)
    r2 = np.cos(rng.uniform(size=samples) * np.pi / 2)
    visible_dense = n - float(np.mean(np.clip(np.ceil(n * r2), 1, n)))
    parts["phase1_encoder"] = enc(nb + visible_low)
    parts["phase1_decoder"] = dec(nb + s)
    parts["phase1_mlp_head"] = _mlp_head_flops(mul * p, m)
    parts["phase2_encoder"] = enc(nb + p + visible_dense)
    parts["phase2_decoder"] = dec(nb + s)
    parts["phase2_dit_head"] = _dit_head_flops(mul, m)
    parts["embeddings"] = 2 * embed(nb + s) + 2.0 * p * m.decoder_dim * m.encoder_dim
    parts["expected_visible_pivots"] = visible_low
    parts["expected_visible_dense"] = visible_dense
  else:
    raise ValueError(f"no FLOP count for family {m.family!r} (mar, himar).")
  forward = sum(v for k, v in parts.items() if not k.startswith("expected"))
  return {"forward": forward, "train": 3.0 * forward, "parts": parts}


if __name__ == "__main__":
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs.himar import get_config
  for variant in ("mar_b", "himar_b", "himar_l", "himar_h"):
    f = train_flops_per_image(get_config(variant))
    print(f"{variant}: {f['train'] / 1e12:.3f} TFLOP/image (train), forward {f['forward'] / 1e9:.1f} GFLOP; "
          + ", ".join(f"{k} {v / 1e9:.1f}" if not k.startswith("expected") else f"{k} {v:.1f}"
                      for k, v in f["parts"].items()))
