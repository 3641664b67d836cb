"""Per-device memory of the compiled training step of a big model on an N-way FSDP mesh, without N GPUs.

  # on one GPU: 8 mock devices of that GPU's kind (XLA's mock NCCL topology); compile only, nothing runs
  PYTHONPATH=. python bench/pods_memory.py --variant=himar:himar_h --per_device_batch=64 --fsdp=8 --mock \
      --out=bench/results/pods_memory_himar_h.json
  # on the CPU with fake devices (tests of this script; CPU memory analysis differs from the GPU's)
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python bench/pods_memory.py \
      --variant=himar:himar_tiny --per_device_batch=2 --fsdp=8

The step is lowered from abstract state (ShapeDtypeStructs carrying the FSDP shardings: params, EMA and Adam
moments sharded over `fsdp`), so no weights are allocated; the compiled SPMD program's memory_analysis() is per
device: arguments (the state shard + batch shard), outputs (aliased to the donated arguments), temporaries (the
live activations, gathered weights and gradients at the peak). fits = arguments + temporaries + the runtime's
reserve (--reserve_gib, default 2 GiB for the CUDA context, cuDNN / cuBLAS workspaces) <= --device_gib (80).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="himar:himar_h", help="<configs module>:<variant>, e.g. next_scale:hmar_d30")
  p.add_argument("--per_device_batch", type=int, default=64)
  p.add_argument("--fsdp", type=int, default=8)
  p.add_argument("--mock", action="store_true", help="mock a 1 x fsdp x 1 GPU topology (fsdp hosts of one GPU each) on this one GPU")
  p.add_argument("--remat", default=None, help="config.model.remat override: none | dots | full")
  p.add_argument("--scan_blocks", type=int, default=None, help="config.model.scan_blocks override (0 | 1)")
  p.add_argument("--device_gib", type=float, default=80.0)
  p.add_argument("--reserve_gib", type=float, default=2.0)
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  if args.mock and "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
    # Nothing runs on mock devices, so autotuning buys nothing here; it is the likeliest reason the mock compiles
    # of Hi-MAR-H / HMAR-d30 outlasted 130 - 200 s on the H100 (their one-device compiles take 44 - 120 s).
    # Library workspaces sized without autotuning may differ slightly from a real run's.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
  import jax
  if args.mock:
    jax.config.update("jax_mock_gpu_topology", f"1x{args.fsdp}x1")
  import jax.numpy as jnp
  from bench.report import report
  from himar_jax import models
  from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
  from himar_jax.train.optimizer import make_optimizer
  from himar_jax.train.state import count_params, make_train_setup
  from himar_jax.train.step import make_train_step

  module_name, _, variant = args.variant.partition(":")
  config = importlib.import_module(f"configs.{module_name}").get_config(variant)
  if len(jax.devices()) < args.fsdp:
    raise SystemExit(f"--fsdp={args.fsdp} needs {args.fsdp} devices; this process sees {len(jax.devices())} "
                     "(use --mock on one GPU, or XLA_FLAGS=--xla_force_host_platform_device_count on the CPU).")
  config.mesh.shape = (1, args.fsdp, 1)
  if args.remat is not None:
    config.model.remat = args.remat
  if args.scan_blocks is not None:
    config.model.scan_blocks = bool(args.scan_blocks)
  global_batch = args.per_device_batch * args.fsdp
  config.data.global_batch_size = global_batch
  mesh = mesh_lib.make_mesh(config.mesh.shape, devices=jax.devices()[:args.fsdp])
  setup = make_train_setup(models.model_fn(config), make_optimizer(config, 10_000), mesh)
  step = make_train_step(setup, config.optim.ema_decay)
  m = config.model
  if m.family in ("himar", "mar"):
    g = m.grid_size
    shapes = {"latent": ((global_batch, g, g, m.token_dim), jnp.float32),
              "label": ((global_batch,), jnp.int32)}
    if m.family == "himar":
      shapes["latent_small"] = ((global_batch, m.lowres_grid, m.lowres_grid, m.token_dim), jnp.float32)
  else:
    length = sum(pn * pn for pn in m.patch_nums)
    shapes = {"indices": ((global_batch, length), jnp.int32), "label": ((global_batch,), jnp.int32)}
  batch_sharding = sharding_lib.batch_sharding(mesh, 1)
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding) for k, (s, d) in shapes.items()}
  t0 = time.perf_counter()
  compiled = step.lower(setup.abstract_state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  gib = lambda x: x / 2 ** 30
  total = gib(mem.argument_size_in_bytes + mem.temp_size_in_bytes) + args.reserve_gib
  params = count_params(setup.abstract_state.params)
  result = {
      "command": "PYTHONPATH=. python bench/pods_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
      "device": jax.devices()[0].device_kind, "mock_topology": f"1x{args.fsdp}x1" if args.mock else None,
      "jax": jax.__version__, "variant": args.variant, "params": params, "mesh": dict(mesh.shape),
      "per_device_batch": args.per_device_batch, "global_batch": global_batch,
      "remat": m.get("remat", None), "scan_blocks": m.get("scan_blocks", None), "compile_s": round(compile_s, 1),
      "per_device_argument_gib": gib(mem.argument_size_in_bytes),
      "per_device_output_gib": gib(mem.output_size_in_bytes),
      "per_device_alias_gib": gib(mem.alias_size_in_bytes),
      "per_device_temp_gib": gib(mem.temp_size_in_bytes),
      "state_gib_unsharded": gib(params * 16),  # params + EMA + two Adam moments, float32
      "reserve_gib": args.reserve_gib, "per_device_total_gib": total, "device_gib": args.device_gib,
      "fits": total <= args.device_gib,
  }
  report(result, args.out)
  return result


if __name__ == "__main__":
  main()
