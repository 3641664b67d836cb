"""Hi-MAR / MAR sampling speed on one accelerator: seconds per batch and per image, peak memory.

  PYTHONPATH=. python bench/himar_sample.py --variant=himar_b --batch=128 --out=bench/results/sample_himar_b.json

Random weights (speed does not depend on them), the variant's published sampling settings unless overridden
(Hi-MAR-B: 32 low-resolution steps (4 x lowres_grid), num_iter=4 dense steps, cfg 2.5, re_cfg 2.7, linear
schedule, 100 MLP-head and 250 DiT-head diffusion steps, temperature 1.0). One jitted program per batch shape
(the whole sampler is lax control flow); the first call compiles and is timed separately. --profile=DIR traces one
more batch and prints the device time per kernel (per batch).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import trace_summary  # noqa: E402
from bench.report import report  # noqa: E402
from configs.himar import get_config  # noqa: E402
from himar_jax import models  # noqa: E402
from himar_jax.cli import enable_compilation_cache  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="himar_b")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--num_iter", type=int, default=None)
  p.add_argument("--dit_steps", default=None, help="DiT-head diffusion steps, e.g. 250 or ddim50")
  p.add_argument("--mlp_steps", default=None, help="MLP-head diffusion steps, e.g. 100")
  p.add_argument("--preset", default="published", help="config.model.sampling_preset: published | fast (DDIM, "
                 "25 DiT-head steps; never the headline number)")
  p.add_argument("--profile", default=None, help="trace one more batch into this log_dir and print where the "
                 "device time goes (bench/trace_summary.py; kernels annotated when XLA_FLAGS has --xla_dump_to)")
  p.add_argument("--fused_norm", type=int, default=None, help="config.model.fused_norm override: 0 | 1 (1: the DiT "
                 "head's LayerNorm + modulation as one Pallas kernel, GPU only)")
  p.add_argument("--fused_mlp", type=int, default=None, help="config.model.fused_mlp override: 0 | 1 (1: the DiT "
                 "MLP's fc1 bias + GELU in the matmul epilogue, Hopper only)")
  p.add_argument("--buckets", type=int, default=None, help="config.model.encoder_buckets override (phase-2 / MAR "
                 "encoder capacities compiled as lax.switch branches)")
  p.add_argument("--scan_blocks", type=int, default=None, help="config.model.scan_blocks override: 0 | 1 (1: one "
                 "lax.scan per block stack, over the blocks' weights stacked at call time)")
  p.add_argument("--compilation_cache", default="none", help="JAX persistent compilation cache folder (the CLI's "
                 "--compilation_cache; default none here, so first_call_s is a compile)")
  p.add_argument("--devices", type=int, default=0, help="N > 0: sample through himar_jax.sampling.sample_batches "
                 "(the CLI's path) on a data-parallel mesh of the first N devices, --batch images per device")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  enable_compilation_cache(args.compilation_cache)

  config = get_config(args.variant)
  config.model.sampling_preset = args.preset
  if args.fused_norm is not None:
    config.model.fused_norm = bool(args.fused_norm)
  if args.fused_mlp is not None:
    config.model.fused_mlp = bool(args.fused_mlp)
  if args.buckets is not None:
    config.model.encoder_buckets = args.buckets
  if args.scan_blocks is not None:
    config.model.scan_blocks = bool(args.scan_blocks)
  family = models.family_module(config)
  kwargs = family.sample_kwargs(config)
  if args.num_iter is not None:
    kwargs["num_iter"] = args.num_iter
  if args.dit_steps is not None:
    kwargs["dit_sampling_steps"] = args.dit_steps
  if args.mlp_steps is not None:
    kwargs["num_sampling_steps"] = args.mlp_steps
  model = models.model_fn(config)(nnx.Rngs(0))
  common = {
      "command": "PYTHONPATH=. python " + " ".join(sys.argv),
      "device": jax.devices()[0].device_kind, "jax": jax.__version__, "variant": args.variant,
      "sampling_preset": args.preset, "fused_norm": config.model.get("fused_norm"),
      "fused_mlp": config.model.get("fused_mlp"), "encoder_buckets": config.model.encoder_buckets,
      "scan_blocks": config.model.scan_blocks, "compilation_cache": args.compilation_cache,
      "sample_kwargs": dict(kwargs),
      "dit_sampling_steps": kwargs.get("dit_sampling_steps", config.model.get("dit_sampling_steps")),
      "mlp_sampling_steps": kwargs.get("num_sampling_steps", config.model.num_sampling_steps),
  }
  if args.devices:
    return _sample_on_mesh(args, config, model, kwargs, common)
  graphdef, state = nnx.split(model)

  @jax.jit
  def sample(state, labels, keys):
    return nnx.merge(graphdef, state).sample(labels, keys=keys, **kwargs)

  labels = jnp.arange(args.batch, dtype=jnp.int32) % config.model.num_classes
  keys_of = lambda seed: jax.random.split(jax.random.key(seed), args.batch)
  first_s, times, out = _time_calls(lambda seed: jax.block_until_ready(sample(state, labels, keys_of(seed))),
                                    args.repeats)
  batch_s = float(np.median(times))
  stats = jax.devices()[0].memory_stats() or {}
  if args.profile:
    trace_summary.profile_calls(lambda: sample(state, labels, keys_of(args.repeats)), args.profile, calls=1,
                                module="jit_sample")
  report({
      **common, "batch": args.batch,
      "first_call_s (compile + run)": first_s, "batch_s": batch_s, "batch_s_each": times,
      "s_per_image": batch_s / args.batch,
      "peak_memory_gib": stats.get("peak_bytes_in_use", float("nan")) / 2 ** 30,
      "output_shape": list(out.shape), "finite": bool(jnp.all(jnp.isfinite(out))),
  }, args.out)


def _time_calls(run, repeats: int):
  """(seconds of run(0), the compiling call; seconds of run(1) .. run(repeats); the last output). run(seed) must
  return finished results."""
  t0 = time.perf_counter()
  out = run(0)
  first_s = time.perf_counter() - t0
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    out = run(r + 1)
    times.append(time.perf_counter() - t0)
  return first_s, times, out


def _sample_on_mesh(args, config, model, kwargs, common):
  """Seconds per global batch of sampling.sample_batches (samples back on the host) on a data-parallel mesh of
  args.devices devices, args.batch images per device."""
  from himar_jax import sampling
  from himar_jax.parallel import mesh as mesh_lib
  restored = sampling.place_for_sampling(model, mesh_lib.make_mesh((-1, 1, 1), jax.devices()[:args.devices]))
  batch = args.batch * args.devices
  labels = np.arange(batch) % config.model.num_classes
  first_s, times, out = _time_calls(
      lambda seed: sampling.sample_batches(restored, labels, seed=seed, batch_size=batch, **kwargs), args.repeats)
  batch_s = float(np.median(times))
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / 2 ** 30
           for d in restored.mesh.devices.flat]
  report({
      **common, "devices": args.devices, "batch_per_device": args.batch, "global_batch": batch,
      "first_call_s (compile + run)": first_s, "batch_s": batch_s, "batch_s_each": times,
      "s_per_image": batch_s / batch, "peak_memory_gib_per_device": peaks,
      "output_shape": list(out.shape), "finite": bool(np.all(np.isfinite(out))),
  }, args.out)


if __name__ == "__main__":
  main()
