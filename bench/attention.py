"""Benchmark: block-sparse attention kernels vs XLA dense-masked, cudnn dense-masked and cudnn unmasked attention.

Run on a GPU machine from the repository root:
  PYTHONPATH=. python bench/attention.py --out bench/results/attention_h100.json
Methods: ours (automatic dispatch, what callers get), ours_mosaic (Mosaic GPU forward + Triton backward),
ours_mgpu_fwd / ours_mgpu_fwd_unshifted (Mosaic GPU forward with its CTA rows shifted for the fewest key steps /
from row 0, automatic backward),
ours_triton (Triton-lowering forward and backward), ours_triton_bwd / ours_mgpu_bwd (automatic forward + Triton /
Mosaic GPU backward), ours_padded (automatic, Mosaic copies through tiled views: odd lengths padded),
xla_masked, cudnn_masked, cudnn_nomask. --variants adds forward-only timings of Mosaic GPU settings
(block_k:stages:persistent); --bwd-variants forward+backward timings of Mosaic GPU backward settings
(block_bwd:persistent:forward kernel). Before timing, checks both kernels
(bfloat16) against the float32 XLA reference on fresh random inputs: output and dq, dk, dv, relative Frobenius
error. Times are medians over repeats of back-to-back jitted calls, rotating among input sets so the L2 cache does
not hold them; forward+backward is jax.vjp of the attention, applied to a random cotangent (all three gradients).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import time_ms
from himar_jax.kernels import PATCH_NUMS_256, PATCH_NUMS_512, PATCH_NUMS_1024, ScaleLayout, block_sparse_attention
from himar_jax.kernels import block_sparse
from himar_jax.nn.attention import xla_attention

SIZES = {"L680": (32, PATCH_NUMS_256), "L2240": (8, PATCH_NUMS_512), "L9451": (1, PATCH_NUMS_1024),
         # the Hi-MAR DiT head's attention at sampling batch 256 (one 16 x 16 map; use --patterns full --heads 8)
         "dit256": (256, (16,))}
# HMAR's Triton kernel on the H100 (fp16, head_dim 64), from the issue: (forward, forward+backward) ms.
TRITON_MS = {
    ("L680", "block_diagonal"): (0.157, 1.236), ("L2240", "block_diagonal"): (0.231, 2.245),
    ("L9451", "block_diagonal"): (0.419, 3.790), ("L680", "block_causal"): (0.231, 1.998),
    ("L2240", "block_causal"): (0.397, 4.081), ("L9451", "block_causal"): (0.791, 7.996)}
TORCH_FLASH_FWDBWD_MS = {"L680": 0.828, "L2240": 1.512, "L9451": 3.124}


CUDNN_PAD = 8  # cudnn rejects L=9451: lengths not a multiple of this run padded (mask False on padding keys)


def _cudnn(layout: ScaleLayout, masked: bool):
  length = layout.length
  l_pad = -(-length // CUDNN_PAD) * CUDNN_PAD
  mask = np.zeros((l_pad, l_pad), bool)
  mask[:length, :length] = layout.dense_mask()
  mask[length:, :] = True  # padding rows attend somewhere (no empty softmax); their outputs are dropped
  mask = jnp.asarray(mask)[None, None] if masked else None

  def attend(q, k, v):
    if l_pad == length:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    pad = [(0, 0), (0, l_pad - length), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")[:, :length]
  return attend


def methods(layout: ScaleLayout, kernel_kwargs):
  mask = jnp.asarray(layout.dense_mask())[None, None]
  return {
      "ours": lambda q, k, v: block_sparse_attention(q, k, v, layout, **kernel_kwargs),  # auto dispatch
      "ours_mosaic": lambda q, k, v: block_sparse_attention(q, k, v, layout, gpu_kernel="mosaic",
                                                            gpu_bwd_kernel="triton", **kernel_kwargs),
      # Mosaic GPU forward (rows shifted for the fewest key steps, or a grid from row 0) with the auto backward
      "ours_mgpu_fwd": lambda q, k, v: block_sparse_attention(q, k, v, layout, gpu_kernel="mosaic", **kernel_kwargs),
      "ours_mgpu_fwd_unshifted": lambda q, k, v: block_sparse_attention(q, k, v, layout, gpu_kernel="mosaic",
                                                                        row_shift=0, **kernel_kwargs),
      "ours_mosaic_grid": lambda q, k, v: block_sparse_attention(q, k, v, layout, gpu_kernel="mosaic",
                                                                 gpu_bwd_kernel="triton", align_keys=False,
                                                                 **kernel_kwargs),
      "ours_triton": lambda q, k, v: block_sparse_attention(q, k, v, layout, gpu_kernel="triton",
                                                            gpu_bwd_kernel="triton", **kernel_kwargs),
      # automatic forward with the Triton backward (the dispatch before the Mosaic GPU backward) / Mosaic backward
      "ours_triton_bwd": lambda q, k, v: block_sparse_attention(q, k, v, layout, gpu_bwd_kernel="triton",
                                                                **kernel_kwargs),
      "ours_mgpu_bwd": lambda q, k, v: block_sparse_attention(q, k, v, layout, gpu_bwd_kernel="mosaic",
                                                              **kernel_kwargs),
      # Triton kernels on a fixed tile grid (before tiles were cut at scale starts), and the Triton forward with
      # the Mosaic backward on either tiling
      "ours_triton_grid": lambda q, k, v: block_sparse_attention(q, k, v, layout, gpu_kernel="triton",
                                                                 gpu_bwd_kernel="triton", align_tiles=False,
                                                                 **kernel_kwargs),
      "ours_tfwd_mbwd": lambda q, k, v: block_sparse_attention(q, k, v, layout, gpu_kernel="triton",
                                                               gpu_bwd_kernel="mosaic", **kernel_kwargs),
      "ours_tfwd_mbwd_grid": lambda q, k, v: block_sparse_attention(q, k, v, layout, gpu_kernel="triton",
                                                                    gpu_bwd_kernel="mosaic", align_tiles=False,
                                                                    **kernel_kwargs),
      # automatic dispatch with the Mosaic kernels' TMA copies through the tiled views (L % 8 != 0: q, k, v
      # padded by < 8 rows, the output sliced), as before untiled_copy_views
      "ours_padded": lambda q, k, v: block_sparse_attention(q, k, v, layout, untiled_copies=False,
                                                            **kernel_kwargs),
      "xla_masked": lambda q, k, v: xla_attention(q, k, v, mask),
      "cudnn_masked": _cudnn(layout, masked=True),
      "cudnn_nomask": _cudnn(layout, masked=False),
  }


def fwd_bwd(fn):
  def run(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)
  return run


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(layout, batch, heads, head_dim, key, kernel_kwargs, dtype=jnp.bfloat16):
  """Relative errors of ours (dtype) vs the float32 reference on the same rounded inputs: out, dq, dk, dv."""
  shape = (batch, layout.length, heads, head_dim)
  q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in jax.random.split(key, 4))
  f32 = lambda x: x.astype(jnp.float32)
  mask = jnp.asarray(layout.dense_mask())[None, None]
  ref_out, ref_vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask), f32(q), f32(k), f32(v))
  ref = (ref_out, *ref_vjp(f32(do)))
  ours_fn = jax.jit(fwd_bwd(lambda q, k, v: block_sparse_attention(q, k, v, layout, **kernel_kwargs)))
  out, grads = ours_fn(q, k, v, do)
  got = (out, *grads)
  errs = [rel_err(a, b) for a, b in zip(got, ref)]
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in got)
  return errs, finite


def check_all(args, key, kernel_kwargs, on_row=lambda row: None):
  """Both GPU kernels on every benchmark layout (B2 H4), plus head_dim 128, float16 and an odd layout (padding)."""
  cases = [(size, pattern, args.head_dim, jnp.bfloat16) for size in args.sizes.split(",")
           for pattern in args.patterns.split(",")]
  cases += [("L680", "block_causal", 128, jnp.bfloat16), ("L2240", "block_diagonal", 128, jnp.bfloat16),
            ("L680", "block_diagonal", 64, jnp.float16), ("odd", "block_causal", 64, jnp.bfloat16),
            ("odd", "block_diagonal", 128, jnp.bfloat16)]
  checks = []
  for size, pattern, head_dim, dtype in cases:
    layout = (ScaleLayout((1, 4, 9, 16, 25, 30, 77, 3, 200), pattern) if size == "odd"
              else ScaleLayout.from_patch_nums(SIZES[size][1], pattern))
    for pair in args.check_kernels.split(","):
      gpu_kernel, gpu_bwd_kernel = (None if x == "auto" else x for x in pair.split(":"))
      key, sub = jax.random.split(key)
      try:
        errs, finite = check(layout, 2, 4, head_dim, sub, dict(kernel_kwargs, gpu_kernel=gpu_kernel,
                                                                gpu_bwd_kernel=gpu_bwd_kernel), dtype)
      except Exception as e:  # reported, and the rest goes on
        traceback.print_exc()
        errs, finite = [f"{type(e).__name__}: {str(e)[:1500]}"], False
      probe = jnp.zeros((1, layout.length, 1, head_dim), dtype)
      ran = block_sparse._choose_gpu_kernel(probe, gpu_kernel, False, pattern)
      aligned_diagonal = pattern == "block_diagonal" and layout.length <= block_sparse.ALIGN_TILES_MAX_LENGTH
      ran_bwd = block_sparse._choose_gpu_bwd_kernel(probe, gpu_bwd_kernel, False, None, aligned_diagonal)
      row = {"size": size, "length": layout.length, "pattern": pattern, "head_dim": head_dim,
             "dtype": jnp.dtype(dtype).name, "gpu_kernel": ran, "gpu_bwd_kernel": ran_bwd,
             "rel_err_out_dq_dk_dv": errs, "finite": finite}
      checks.append(row)
      on_row(row)  # the caller saves after every check: a run cut by its timeout keeps what it has
      print("check", json.dumps(row), flush=True)
  return checks


def extra_checks(key):
  """float32 inputs (tf32 dots on GPU) and jax.shard_map with check_vma over all local devices."""
  layout = ScaleLayout.from_patch_nums(PATCH_NUMS_256, "block_diagonal")
  shape = (2, layout.length, 4, 64)
  q, k, v, do = (jax.random.normal(kk, shape, jnp.float32) for kk in jax.random.split(key, 4))
  mask = jnp.asarray(layout.dense_mask())[None, None]
  ref_out, ref_vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v)
  ref = (ref_out, *ref_vjp(do))
  attend = lambda q, k, v: block_sparse_attention(q, k, v, layout, implementation="pallas_gpu")  # f32: Triton
  out, vjp = jax.vjp(jax.jit(attend), q, k, v)
  errs_f32 = [rel_err(a, b) for a, b in zip((out, *vjp(do)), ref)]
  print(f"check float32 L680 block_diagonal: rel err out/dq/dk/dv {[f'{e:.2e}' for e in errs_f32]}", flush=True)
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices).reshape(1, len(devices)), ("data", "model"))
  spec = jax.sharding.PartitionSpec("data", None, "model", None)
  result = {"float32_rel_err_out_dq_dk_dv": errs_f32}
  bf = lambda x: x.astype(jnp.bfloat16)
  for name, inputs in (("float32_triton", (q, k, v, do)), ("bfloat16_mosaic", tuple(map(bf, (q, k, v, do))))):
    try:
      sharded = jax.jit(jax.shard_map(attend, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
      out, vjp = jax.vjp(sharded, *inputs[:3])
      errs = [rel_err(a, b) for a, b in zip((out, *vjp(inputs[3])), ref)]
    except Exception as e:  # reported, and the rest goes on
      errs = [f"{type(e).__name__}: {str(e)[:1500]}"]
    print(f"check shard_map (check_vma) {name} {len(devices)} device(s): rel err {errs}", flush=True)
    result[f"shard_map_{name}_rel_err_out_dq_dk_dv"] = errs
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="bench/results/attention_h100.json")
  parser.add_argument("--sizes", default="L680,L2240,L9451")
  parser.add_argument("--patterns", default="block_diagonal,block_causal")
  parser.add_argument("--methods", default="ours_mosaic,ours_triton,xla_masked,cudnn_masked,cudnn_nomask")
  parser.add_argument("--variants", default="",
                      help="Mosaic GPU forward settings to time, block_k:stages[:persistent 0/1], e.g. 64:2,128:2:0")
  parser.add_argument("--bwd-variants", default="",
                      help="Mosaic GPU backward settings to time (forward+backward), block_bwd:persistent 0/1"
                           "[:forward kernel mosaic/triton/auto], e.g. 64:1,128:0:mosaic")
  parser.add_argument("--check-kernels", default="mosaic:triton,triton:triton,auto:mosaic",
                      help="forward:backward GPU kernel pairs to check (mosaic / triton / auto)")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--batch", type=int, default=None, help="override the per-size batch (smoke runs)")
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--input-sets", type=int, default=3)
  parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--extra-checks", action=argparse.BooleanOptionalAction, default=False)
  parser.add_argument("--block-q", type=int, default=None)
  parser.add_argument("--block-k", type=int, default=None)
  parser.add_argument("--block-bwd", type=int, default=None)
  parser.add_argument("--num-warps", type=int, default=None)
  parser.add_argument("--num-stages", type=int, default=3)
  parser.add_argument("--fast-exp", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args()
  kernel_kwargs = dict(implementation="pallas_gpu", block_q=args.block_q, block_k=args.block_k,
                       block_bwd=args.block_bwd, num_warps=args.num_warps, num_stages=args.num_stages,
                       fast_exp=args.fast_exp)
  key = jax.random.key(int(time.time_ns() % (2**31)))
  rows, checks, extra = [], [], {}

  def save():
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "python": platform.python_version(),
        "dtype": "bfloat16", "checks": checks, "extra_checks": extra, "rows": rows,
        "triton_targets_ms": {f"{a}/{b}": t for (a, b), t in TRITON_MS.items()},
        "torch_flash_unmasked_fwd_bwd_ms": TORCH_FLASH_FWDBWD_MS}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)

  if args.check:
    key, sub = jax.random.split(key)
    check_all(args, sub, kernel_kwargs, on_row=lambda row: (checks.append(row), save()))
    save()
  if args.extra_checks:
    key, sub = jax.random.split(key)
    try:
      extra.update(extra_checks(sub))
    except Exception as e:  # reported, and the benchmark goes on
      extra["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
      print("extra checks failed:", extra["error"], flush=True)
    save()
  variants = [tuple(int(x) for x in (v + ":1").split(":")[:3]) for v in args.variants.split(",") if v]
  bwd_variants = [v for v in args.bwd_variants.split(",") if v]
  for size in args.sizes.split(","):
    batch, patch_nums = SIZES[size]
    batch = args.batch or batch
    for pattern in args.patterns.split(","):
      layout = ScaleLayout.from_patch_nums(patch_nums, pattern)
      shape = (batch, layout.length, args.heads, args.head_dim)
      input_sets = []
      for _ in range(args.input_sets):
        key, *subs = jax.random.split(key, 5)
        input_sets.append([jax.random.normal(s, shape, jnp.bfloat16) for s in subs])
      todo = [(name, fn, True) for name, fn in methods(layout, kernel_kwargs).items()
              if name in args.methods.split(",")]
      for block_k, stages, persistent in variants:
        fn = functools.partial(lambda q, k, v, bk, st, pe: block_sparse_attention(
            q, k, v, layout, implementation="pallas_gpu", gpu_kernel="mosaic", block_k=bk, stages=st,
            persistent=bool(pe)), bk=block_k, st=stages, pe=persistent)
        todo.append((f"mosaic_bk{block_k}_s{stages}_{'pers' if persistent else 'grid'}", fn, False))
      for variant in bwd_variants:
        block_bwd, persistent, fwd_kernel = (variant.split(":") + ["auto"])[:3]
        fn = functools.partial(lambda q, k, v, bb, pe, fk: block_sparse_attention(
            q, k, v, layout, implementation="pallas_gpu", gpu_kernel=fk, gpu_bwd_kernel="mosaic", block_bwd=bb,
            bwd_persistent=pe), bb=int(block_bwd), pe=bool(int(persistent)),
            fk=None if fwd_kernel == "auto" else fwd_kernel)
        todo.append((f"mbwd_b{block_bwd}_{'pers' if int(persistent) else 'grid'}_{fwd_kernel}", fn, True))
      for name, fn, with_bwd in todo:
        row = {"size": size, "pattern": pattern, "method": name, "batch": batch, "heads": args.heads,
               "length": layout.length, "head_dim": args.head_dim}
        try:
          fwd = jax.jit(fn)
          row["fwd_ms"] = time_ms(lambda q, k, v, do: fwd(q, k, v), input_sets, args.iters, args.repeats)
          if with_bwd:
            both = jax.jit(fwd_bwd(fn))
            row["fwd_bwd_ms"] = time_ms(both, input_sets, args.iters, args.repeats)
        except Exception as e:  # a method that fails to compile (e.g. cudnn limits) is reported, not fatal
          row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        row["triton_fwd_ms"], row["triton_fwd_bwd_ms"] = TRITON_MS.get((size, pattern), (float("nan"),) * 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
  print()
  print(f"{'size':6} {'pattern':15} {'method':24} {'fwd ms':>8} {'f+b ms':>8} {'fwd/T':>6} {'f+b/T':>6}")
  for r in rows:
    if "error" in r:
      print(f"{r['size']:6} {r['pattern']:15} {r['method']:24} error: {r['error'][:60]}")
      continue
    fb = r.get("fwd_bwd_ms", float("nan"))
    print(f"{r['size']:6} {r['pattern']:15} {r['method']:24} {r['fwd_ms']:8.3f} {fb:8.3f} "
          f"{r['fwd_ms'] / r['triton_fwd_ms']:6.2f} {fb / r['triton_fwd_bwd_ms']:6.2f}")
  for c in checks:
    errs = c["rel_err_out_dq_dk_dv"]
    shown = " ".join(f"{e:.1e}" if isinstance(e, float) else str(e)[:70] for e in errs)
    print(f"check {c['size']:6} {c['pattern']:15} d{c['head_dim']} {c['dtype']:9} {c['gpu_kernel']:7} "
          f"{c.get('gpu_bwd_kernel', 'triton'):7} {shown}")
  save()
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
