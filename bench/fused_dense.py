"""fc1 + bias + GELU: the fused-epilogue Mosaic GPU kernel against XLA (cuBLAS matmul, then an elementwise
kernel), on one GPU.

  PYTHONPATH=. python bench/fused_dense.py --out=bench/results/fused_dense_h100.json
  PYTHONPATH=. python bench/fused_dense.py --gelu=exact --rows=98304 --shapes=768x3072 --configs=128:128:64:3

Shapes: with --gelu=tanh (default) the Hi-MAR DiT head's MLP at sampling batch 256 (256 maps x 256 tokens = 65536
rows, 512 -> 2048 for B / L; 768 -> 3072 for H); with --gelu=exact the backbone's (Hi-MAR-B decoder at sampling
batch 256: 256 x 384 = 98304 rows, 768 -> 3072). Rows per case: ms per call (median of repeats of back-to-back calls, rotating input sets), the
matmul alone (cuBLAS, bfloat16 output: the floor of the unfused path's first kernel), and the errors of both paths
against a float32 evaluation of the same bfloat16 operands (relative Frobenius norm).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import report  # noqa: E402
from bench.timing import time_ms  # noqa: E402
from himar_jax.kernels import fused_dense  # noqa: E402


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rows", type=int, default=256 * 256)
  p.add_argument("--shapes", default="512x2048,768x3072", help="K x N pairs")
  p.add_argument("--configs", default="128:128:64:3,128:128:64:3:1,128:128:64:2,128:128:64:2:1,128:64:64:4:1",
                 help="tile_m:tile_n:tile_k:stages[:tanh] of the fused kernel")
  p.add_argument("--gelu", default="tanh", choices=("tanh", "exact"), help="the GELU form (DiT: tanh; backbone: "
                 "exact)")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  args = p.parse_args()
  rows = []
  approximate = args.gelu == "tanh"
  for shape in args.shapes.split(","):
    k, n = (int(v) for v in shape.split("x"))
    sets = []
    for i in range(2):
      kx, kw, kb = jax.random.split(jax.random.key(1000 * k + i), 3)
      sets.append((jax.random.normal(kx, (args.rows, k), jnp.float32).astype(jnp.bfloat16),
                   jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5,
                   jax.random.normal(kb, (n,), jnp.float32) * 0.1))
    x, w, b = sets[0]
    with jax.default_matmul_precision("float32"):  # the float32 evaluation of the same bfloat16 operands
      exact = jax.jit(lambda x, w, b: fused_dense.reference(
          x.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32), b, jnp.float32, approximate))(x, w, b)
    xla = jax.jit(lambda x, w, b: fused_dense.unfused(x, w, b, approximate))
    matmul_only = jax.jit(lambda x, w, b: jnp.dot(x, w.astype(x.dtype)))
    base = {"rows": args.rows, "k": k, "n": n, "gelu": args.gelu}
    rows.append({**base, "method": "xla_unfused", "ms": time_ms(xla, sets, args.iters, args.repeats),
                 "rel_err": rel_err(xla(x, w, b), exact)})
    rows.append({**base, "method": "cublas_matmul_only", "ms": time_ms(matmul_only, sets, args.iters, args.repeats)})
    print(rows[-2], rows[-1], flush=True)
    for spec in filter(None, args.configs.split(",")):
      tm, tn, tk, st, tanh = (int(v) for v in (spec + ":0").split(":")[:5])
      config = fused_dense.TileConfig(tm, tn, tk, st, bool(tanh))
      row = {**base, "method": f"fused_{spec}"}
      try:
        fn = jax.jit(lambda x, w, b, config=config: fused_dense.dense_gelu(x, w, b, approximate=approximate,
                                                                           config=config))
        row["rel_err"] = rel_err(fn(x, w, b), exact)
        row["ms"] = time_ms(fn, sets, args.iters, args.repeats)
      except Exception as e:  # reported, and the other settings go on
        row["error"] = f"{type(e).__name__}: {str(e)[:800]}"
      rows.append(row)
      print(row, flush=True)
  report({"command": "PYTHONPATH=. python " + " ".join(sys.argv), "device": jax.devices()[0].device_kind,
          "jax": jax.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
  main()
