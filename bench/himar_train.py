"""Hi-MAR / MAR training throughput on one accelerator: step time, images/s, peak memory, FLOPs and MFU.

  PYTHONPATH=. python bench/himar_train.py --variant=himar_b --batch=64 --steps=20 --out=bench/results/x.json

Synthetic latents of the published shapes (latent (B,16,16,16), latent_small (B,8,8,16), labels), the published
optimizer (AdamW, clip 3.0, EMA), dropout 0.1, diffusion_batch_mul 4, bfloat16 matmuls. FLOPs are XLA's count of
the lowered step (cost_analysis before optimisation: every dot the program executes, padding of static shapes
included; every branch of a lax.switch counted); MFU uses the analytic count of bench/flops.py (the official
algorithm's useful matmul FLOPs, no padding, no recomputation) over the accelerator's dense bf16 peak given by
--peak_tflops (H100 SXM: 989).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.report import report  # noqa: E402
from bench import trace_summary  # noqa: E402
from bench.flops import train_flops_per_image  # noqa: E402
from configs.himar import get_config  # noqa: E402
from himar_jax import models  # noqa: E402
from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib  # noqa: E402
from himar_jax.train.optimizer import make_optimizer  # noqa: E402
from himar_jax.train.state import count_params, init_train_state, make_train_setup  # noqa: E402
from himar_jax.train.step import make_train_step  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="himar_b")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--mesh", default="-1,1,1")
  p.add_argument("--peak_tflops", type=float, default=989.0)
  p.add_argument("--out", default=None)
  p.add_argument("--remat", default=None, help="config.model.remat override: none | dots | full")
  p.add_argument("--dit_remat", default=None, help="config.model.dit_remat override: same | none | dots | full")
  p.add_argument("--scan_blocks", type=int, default=None, help="config.model.scan_blocks override: 0 | 1")
  p.add_argument("--dropout_rng", default=None, help="config.model.dropout_rng override: threefry | rbg")
  p.add_argument("--buckets", type=int, default=None, help="config.model.encoder_buckets override")
  p.add_argument("--fused_norm", type=int, default=None, help="config.model.fused_norm override: 0 | 1 (Hi-MAR)")
  p.add_argument("--fused_mlp", type=int, default=None, help="config.model.fused_mlp override: 0 | 1 (Hi-MAR; the "
                 "training step itself computes the unfused layer either way)")
  p.add_argument("--gradients", default="spmd", help="config.mesh.gradients: spmd | per_device (pure data "
                 "parallelism with one all-reduce; see himar_jax/train/step.py)")
  p.add_argument("--compile_only", action="store_true", help="print the compiled memory analysis and stop")
  p.add_argument("--profile", default=None, help="trace 3 more steps into this log_dir and print where the device "
                 "time goes (bench/trace_summary.py)")
  args = p.parse_args()

  config = get_config(args.variant)
  config.data.global_batch_size = args.batch
  config.mesh.shape = tuple(int(s) for s in args.mesh.split(","))
  if args.remat is not None:
    config.model.remat = args.remat
  if args.buckets is not None:
    config.model.encoder_buckets = args.buckets
  if args.fused_norm is not None:
    config.model.fused_norm = bool(args.fused_norm)
  if args.fused_mlp is not None:
    config.model.fused_mlp = bool(args.fused_mlp)
  if args.dit_remat is not None:
    config.model.dit_remat = args.dit_remat
  if args.scan_blocks is not None:
    config.model.scan_blocks = bool(args.scan_blocks)
  if args.dropout_rng is not None:
    config.model.dropout_rng = args.dropout_rng
  mesh = mesh_lib.mesh_from_config(config)
  setup = make_train_setup(models.model_fn(config), make_optimizer(config, 10_000), mesh)
  state = init_train_state(setup, config.seed)
  step = make_train_step(setup, config.optim.ema_decay, gradients=args.gradients)
  rng = np.random.default_rng(0)
  m = config.model
  batch = {"latent": rng.standard_normal((args.batch, 16, 16, m.token_dim), np.float32),
           "latent_small": rng.standard_normal((args.batch, 8, 8, m.token_dim), np.float32),
           "label": rng.integers(0, m.num_classes, args.batch).astype(np.int32)}
  batch = sharding_lib.shard_batch(batch, mesh)

  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  print(f"lowered in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  print(f"compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
  # The lowered (pre-optimisation) program still has every matmul as a dot; after compilation GPU matmuls and
  # fused attention are library custom calls that XLA's cost analysis does not count.
  cost, flops_source = lowered.cost_analysis(), "lowered"
  if not cost:  # some backends only analyse compiled programs (which miss library calls: then no MFU)
    cost, flops_source = compiled.cost_analysis(), "compiled (undercount: excludes cuBLAS / cuDNN custom calls)"
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  flops = float(cost.get("flops", float("nan")))
  mem = compiled.memory_analysis()
  if args.compile_only:
    print(json.dumps({"variant": args.variant, "batch": args.batch, "remat": config.model.get("remat", "none"),
                      "dit_remat": config.model.get("dit_remat", "same"),
                      "scan_blocks": config.model.get("scan_blocks", False),
                      "buckets": config.model.encoder_buckets, "compile_s": round(compile_s, 1),
                      "temp_gib": mem.temp_size_in_bytes / 2 ** 30,
                      "argument_gib": mem.argument_size_in_bytes / 2 ** 30, "flops": flops}))
    return
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - t0) / args.steps
  stats = jax.devices()[0].memory_stats() or {}
  if args.profile:
    def run_step():
      nonlocal state
      state, _ = compiled(state, batch)
      return state
    trace_summary.profile_calls(run_step, args.profile, calls=3, module="jit_step_fn")
  n_dev = mesh.devices.size
  analytic = train_flops_per_image(config)
  analytic_tflops = analytic["train"] * args.batch / step_s / 1e12 / n_dev
  result = {
      "command": "PYTHONPATH=. python " + " ".join(sys.argv),
      "device": jax.devices()[0].device_kind, "num_devices": n_dev, "jax": jax.__version__,
      "variant": args.variant, "params": count_params(state.params), "global_batch": args.batch,
      "mesh": dict(mesh.shape), "gradients": args.gradients, "compile_s": round(compile_s, 1),
      "step_s": step_s,
      "images_per_s": args.batch / step_s,
      "peak_memory_gib": stats.get("peak_bytes_in_use", float("nan")) / 2 ** 30,
      "compiled_temp_gib": getattr(mem, "temp_size_in_bytes", float("nan")) / 2 ** 30,
      "compiled_argument_gib": getattr(mem, "argument_size_in_bytes", float("nan")) / 2 ** 30,
      "remat": config.model.get("remat", "none"), "dit_remat": config.model.get("dit_remat", "same"),
      "encoder_buckets": config.model.encoder_buckets,
      "train_encoder_buckets": config.model.get("train_encoder_buckets", config.model.encoder_buckets),
      "dropout_rng": config.model.get("dropout_rng", "threefry"),
      "scan_blocks": config.model.get("scan_blocks", False),
      "analytic_train_tflop_per_image": analytic["train"] / 1e12,
      "analytic_tflops_per_s_per_device": analytic_tflops,
      "mfu": analytic_tflops / args.peak_tflops,
      "xla_flops_per_step_per_device": flops, "xla_flops_source": flops_source,
      "peak_tflops_assumed": args.peak_tflops,
      "loss": float(metrics["loss"]),
  }
  report(result, args.out)


if __name__ == "__main__":
  main()
