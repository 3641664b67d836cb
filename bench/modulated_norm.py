"""The fused residual + LayerNorm + adaLN-modulation kernel against XLA's fusions of the same formula, on one GPU.

  PYTHONPATH=. python bench/modulated_norm.py --out=bench/results/modulated_norm_h100.json

Shapes: the Hi-MAR DiT heads' rows (256 sampling maps x 256 tokens; width 512 for B / L, 768 for H), mod = 6 adaLN
chunks in bfloat16, y in bfloat16; with and without the gated residual. Per case: ms per call (median of repeats of
back-to-back calls), the bytes a single pass must move and the bandwidth that implies, and the largest differences
from the XLA path (x_out relative, y absolute in bf16 units).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import report  # noqa: E402
from bench.timing import time_ms  # noqa: E402
from himar_jax.kernels.modulated_norm import modulated_layer_norm  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=256 * 256)
  p.add_argument("--widths", default="512,768")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  args = p.parse_args()
  rows = []
  for width in (int(w) for w in args.widths.split(",")):
    kx, km, kh = jax.random.split(jax.random.key(width), 3)
    x = jax.random.normal(kx, (args.rows, width), jnp.float32)
    mod = jax.random.normal(km, (args.rows, 6 * width), jnp.float32).astype(jnp.bfloat16)
    h = jax.random.normal(kh, (args.rows, width), jnp.float32).astype(jnp.bfloat16)
    for residual in (False, True):
      extra = dict(h=h, gate=2) if residual else {}

      def make(impl, extra=extra):
        return jax.jit(lambda x, mod, h: modulated_layer_norm(x, mod, shift=3, scale=4, implementation=impl,
                                                              **({"h": h, "gate": 2} if extra else {})))
      fused, xla = make("pallas_gpu"), make("xla")
      got, want = fused(x, mod, h), xla(x, mod, h)
      # x (f32) and 2 chunks (bf16) in, x_out (f32) and y (bf16) out; with the residual also h and the gate chunk.
      moved = args.rows * width * (4 + 2 * 2 + 4 + 2 + (2 * 2 if residual else 0))
      row = {"width": width, "residual": residual, "rows": args.rows,
             "fused_ms": time_ms(fused, [(x, mod, h)], args.iters, args.repeats),
             "xla_ms": time_ms(xla, [(x, mod, h)], args.iters, args.repeats), "bytes_one_pass": moved,
             "x_out_rel_diff": float(jnp.max(jnp.abs(got[0] - want[0])) / jnp.max(jnp.abs(want[0]))),
             "y_max_abs_diff": float(jnp.max(jnp.abs(got[1].astype(jnp.float32) - want[1].astype(jnp.float32))))}
      row["fused_tb_per_s"] = moved / row["fused_ms"] / 1e9
      row["speedup"] = row["xla_ms"] / row["fused_ms"]
      rows.append(row)
      print(f"width {width} residual {residual!s:5}: fused {row['fused_ms']:.3f} ms ({row['fused_tb_per_s']:.2f} "
            f"TB/s)  xla {row['xla_ms']:.3f} ms  x{row['speedup']:.2f}  diff x {row['x_out_rel_diff']:.1e} "
            f"y {row['y_max_abs_diff']:.1e}", flush=True)
  report({"command": "PYTHONPATH=. python " + " ".join(sys.argv), "device": jax.devices()[0].device_kind,
          "jax": jax.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
  main()
