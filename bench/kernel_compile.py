"""How long the fused fc1 kernel (kernels/fused_dense.dense_gelu) takes to compile, and whether call sites share it.

  PYTHONPATH=. python bench/kernel_compile.py --out=bench/results/kernel_compile_h100.json

For n_sites in --sites: one jitted program with n_sites calls of the kernel at the same shape (chained, so none
is dead code), timed for lowering, XLA compilation and the first call (where Mosaic GPU kernels get built), in a
fresh process each (so no in-process cache carries over), and the same program with the unfused layer.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(n_sites: int, fused: bool, rows: int, k: int, n: int) -> dict:
  import jax
  import jax.numpy as jnp

  from himar_jax.kernels import fused_dense
  x = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32).astype(jnp.bfloat16)
  ws = [jax.random.normal(jax.random.key(i + 1), (k, n), jnp.float32) * k ** -0.5 for i in range(n_sites)]
  back = jax.random.normal(jax.random.key(99), (n, k), jnp.float32).astype(jnp.bfloat16) * n ** -0.5
  bias = jnp.zeros((n,), jnp.float32)
  layer = fused_dense.dense_gelu if fused else (lambda x, w, b: fused_dense.unfused(x, w, b))

  @jax.jit
  def program(x, ws):
    for w in ws:  # each site feeds the next, so every call is live
      x = jnp.dot(layer(x, w, bias), back)
    return x

  t0 = time.perf_counter()
  lowered = program.lower(x, ws)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  jax.block_until_ready(compiled(x, ws))
  t3 = time.perf_counter()
  jax.block_until_ready(compiled(x, ws))
  t4 = time.perf_counter()
  return {"n_sites": n_sites, "fused": fused, "lower_s": t1 - t0, "compile_s": t2 - t1, "first_call_s": t3 - t2,
          "second_call_s": t4 - t3, "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sites", default="1,2,8")
  p.add_argument("--shape", default="65536x512x2048", help="rows x K x N")
  p.add_argument("--out", default=None)
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  rows, k, n = (int(v) for v in args.shape.split("x"))
  if args.child:
    n_sites, fused = args.child.split(":")
    print(json.dumps(child(int(n_sites), fused == "1", rows, k, n)))
    return
  rows_out = []
  for fused in (1, 0):
    for n_sites in (int(s) for s in args.sites.split(",")):
      proc = subprocess.run([sys.executable, __file__, f"--child={n_sites}:{fused}", f"--shape={args.shape}"],
                            capture_output=True, text=True, timeout=600)
      row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
          "n_sites": n_sites, "fused": bool(fused), "error": proc.stderr[-800:]}
      rows_out.append(row)
      print(row, flush=True)
  result = {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "shape": args.shape, "rows": rows_out}
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
