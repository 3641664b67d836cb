"""Exact (erf) GELU on the backbone's MLP activations: how long XLA takes for it, alone and inside fc1 -> GELU -> fc2.

  PYTHONPATH=. python bench/gelu.py --out=bench/results/gelu_h100.json

The Hi-MAR-B sampling profile (bench/notes.md, v5) shows ~1 ms per decoder block for a fusion on the MLP's hidden
activations (256 maps x 384 tokens x 3072, bfloat16): five times the bytes floor. This times the candidates on that
shape: jax.nn.gelu(approximate=False) in bfloat16 (what the backbone ran), the same computed in float32 and cast
back, the tanh approximation (not the official model's; for scale), nn.activations.gelu_erf (what the backbone runs
now), and the whole fc1 -> GELU -> fc2 with each. Each
row: ms per call (median of repeats of back-to-back calls), the bytes floor (read + write bf16) and the largest
difference from a float64 NumPy GELU of the same bfloat16 inputs (absolute, and relative where |GELU| >= 1e-3).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import report  # noqa: E402
from bench.timing import time_ms  # noqa: E402
from himar_jax.nn.activations import gelu_erf  # noqa: E402

VARIANTS = {
    "exact_bf16": lambda x: jax.nn.gelu(x, approximate=False),
    "exact_f32_compute": lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype),
    "tanh_bf16": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_erf (ours: closed-form erf, float32)": gelu_erf,
}


def gelu64(x: np.ndarray) -> np.ndarray:
  erf = np.vectorize(math.erf)
  return x * (1.0 + erf(x / math.sqrt(2.0))) / 2.0


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=256 * 384)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--hidden", type=int, default=3072)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  args = p.parse_args()
  kx, k1, k2, kh = jax.random.split(jax.random.key(0), 4)
  h = (2.0 * jax.random.normal(kh, (args.rows, args.hidden), jnp.float32)).astype(jnp.bfloat16)
  x = jax.random.normal(kx, (args.rows, args.width), jnp.float32).astype(jnp.bfloat16)
  w1 = (jax.random.normal(k1, (args.width, args.hidden), jnp.float32) / args.width ** 0.5).astype(jnp.bfloat16)
  w2 = (jax.random.normal(k2, (args.hidden, args.width), jnp.float32) / args.hidden ** 0.5).astype(jnp.bfloat16)
  sample = np.asarray(h[:256], np.float64)
  want = gelu64(sample)
  rows = []
  for name, gelu in VARIANTS.items():
    alone = jax.jit(gelu)
    mlp = jax.jit(lambda x, w1, w2, gelu=gelu: gelu(x @ w1) @ w2)
    got = np.asarray(alone(h[:256]), np.float64)
    big = np.abs(want) >= 1e-3
    row = {"variant": name, "gelu_ms": time_ms(alone, [(h,)], args.iters, args.repeats),
           "mlp_ms": time_ms(mlp, [(x, w1, w2)], args.iters, args.repeats),
           "bytes_floor_ms_at_3tbps": 2 * h.size * 2 / 3e12 * 1e3,
           "max_abs_err": float(np.max(np.abs(got - want))),
           "max_rel_err_where_abs_ge_1e-3": float(np.max(np.abs(got - want)[big] / np.abs(want[big])))}
    rows.append(row)
    print(f"{name:42s} gelu {row['gelu_ms']:.3f} ms  fc1-gelu-fc2 {row['mlp_ms']:.3f} ms  (bytes floor "
          f"{row['bytes_floor_ms_at_3tbps']:.3f})  max abs err {row['max_abs_err']:.1e}, rel "
          f"{row['max_rel_err_where_abs_ge_1e-3']:.1e}", flush=True)
  report({"command": "PYTHONPATH=. python " + " ".join(sys.argv), "device": jax.devices()[0].device_kind,
          "jax": jax.__version__, "shape": [args.rows, args.hidden], "rows": rows}, args.out)


if __name__ == "__main__":
  main()
