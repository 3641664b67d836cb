"""Benchmark: tokenizer encode / decode throughput (images/s) for MAR's kl16 and VAR's VQ pyramid.

Run on a GPU machine from the repository root:
  PYTHONPATH=. python bench/tokenizers.py --out bench/results/tokenizers_h100.json
Random weights (throughput does not depend on their values), batch 64 at 256 px, compute dtype bfloat16 (the
default) and float32. encode: kl16 images -> moments; VQ images -> per-scale indices (encoder + quantizer).
decode: kl16 latents -> images; VQ per-scale indices -> images (f_hat + decoder). Times are medians over repeats
of back-to-back jitted calls on device-resident inputs, after a compile + warm-up call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.tokenizers import kl_vae, vq_pyramid


def _time(fn, args, repeats: int) -> tuple[float, float]:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), compile_s


def bench_kl(dtype, batch: int, size: int, repeats: int) -> dict:
  model = kl_vae.KLVAE(kl_vae.kl16_config(), rngs=nnx.Rngs(0), dtype=dtype)
  graphdef, state = nnx.split(model)
  encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_moments(x))
  decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
  x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), minval=-1, maxval=1)
  z = jax.random.normal(jax.random.key(1), (batch, size // 16, size // 16, 16))
  enc_s, enc_c = _time(encode, (state, x), repeats)
  dec_s, dec_c = _time(decode, (state, z), repeats)
  return {"encode_images_per_s": batch / enc_s, "decode_images_per_s": batch / dec_s, "encode_ms": enc_s * 1e3,
          "decode_ms": dec_s * 1e3, "compile_s": {"encode": enc_c, "decode": dec_c},
          "params": kl_vae.count_params(model)}


def bench_vq(dtype, batch: int, size: int, repeats: int) -> dict:
  if size in vq_pyramid.LAYOUTS:
    config = vq_pyramid.var_vqvae_config(size)
  else:  # smoke runs at other sizes: a two-scale layout
    config = vq_pyramid.var_vqvae_config(256).replace(patch_nums=(1, size // 16))
  model = vq_pyramid.VQPyramid(config, rngs=nnx.Rngs(0), dtype=dtype)
  graphdef, state = nnx.split(model)
  encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).img_to_indices(x))
  decode = jax.jit(lambda s, idx: nnx.merge(graphdef, s).indices_to_img(idx))
  x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), minval=-1, maxval=1)
  idx = [jax.random.randint(jax.random.key(k), (batch, pn * pn), 0, config.vocab_size, jnp.int32)
         for k, pn in enumerate(config.patch_nums)]
  enc_s, enc_c = _time(encode, (state, x), repeats)
  dec_s, dec_c = _time(decode, (state, idx), repeats)
  return {"encode_images_per_s": batch / enc_s, "decode_images_per_s": batch / dec_s, "encode_ms": enc_s * 1e3,
          "decode_ms": dec_s * 1e3, "compile_s": {"encode": enc_c, "decode": dec_c},
          "params": vq_pyramid.count_params(model)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="bench/results/tokenizers.json")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--dtypes", default="bfloat16,float32")
  parser.add_argument("--models", default="kl16,vq")
  args = parser.parse_args(argv)
  results = {}
  for model_name in args.models.split(","):
    for dtype_name in args.dtypes.split(","):
      fn = bench_kl if model_name == "kl16" else bench_vq
      r = fn(jnp.dtype(dtype_name), args.batch, args.size, args.repeats)
      results[f"{model_name}/{dtype_name}"] = r
      print(f"{model_name:5s} {dtype_name:9s} encode {r['encode_images_per_s']:8.1f} img/s ({r['encode_ms']:.1f} ms)"
            f"  decode {r['decode_images_per_s']:8.1f} img/s ({r['decode_ms']:.1f} ms)", flush=True)
  record = {"benchmark": "tokenizers", "batch": args.batch, "size": args.size, "repeats": args.repeats,
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "python": platform.python_version(),
            "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
            "note": "float32 convs run at XLA's default GPU precision (TF32 allowed); quantizer distances at HIGHEST",
            "results": results}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
