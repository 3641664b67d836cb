"""Training throughput on 1 and N devices of one host, and per-device memory of data parallel vs FSDP.

  # on a 2-GPU machine (the pods issue's measurement: Hi-MAR-B, 64 images per GPU)
  PYTHONPATH=. python bench/scaling.py --variant=himar_b --per_device_batch=64 --devices=1,2 \
      --out=bench/results/scaling_himar_b_2xh200.json
  # CPU smoke run with fake devices (seconds per point)
  JAX_PLATFORMS=cpu PYTHONPATH=. python bench/scaling.py --variant=himar_tiny --per_device_batch=2 --devices=1,2

Each point is bench/himar_train.py in its own process, restricted to its first n devices (CUDA_VISIBLE_DEVICES on
GPUs, --xla_force_host_platform_device_count on the CPU), at a global batch of n x --per_device_batch, so the
peak memory is that point's alone. --meshes lists the strategies at every n > 1: data (the mesh (-1, 1, 1)) and
fsdp ((1, -1, 1): params, EMA and Adam moments sharded). speedup[n] = images/s at n / images/s at 1, for the
first strategy; the pods issue's target is >= 1.9 at n = 2. Flags it does not know go to himar_train.py, e.g.
--gradients=per_device (DDP-style data parallelism: the one-device program per device plus one all-reduce).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MESHES = {"data": "-1,1,1", "fsdp": "1,-1,1"}
HERE = os.path.dirname(os.path.abspath(__file__))


def gpu_interconnect() -> dict:
  """How this host's GPUs are linked (`nvidia-smi topo -m`: NV# = NVLink, PIX / PHB / SYS = PCIe paths) and the
  NCCL settings that change the transport: what a multi-GPU speedup depends on besides the program."""
  try:
    topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError) as e:
    topo = f"unavailable: {e}"
  return {"nvidia_smi_topo": topo, "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}


def point_env(n: int, platform: str, base: dict | None = None) -> dict:
  """The environment of a process that sees exactly the first n devices of `platform` (gpu | cpu)."""
  env = dict(os.environ if base is None else base)
  env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)  # set only for this parent's device probe
  if platform == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
  elif platform == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
  else:
    raise ValueError(f"platform={platform!r}: bench/scaling.py restricts devices on 'gpu' or 'cpu' only.")
  return env


def speedups(points: list[dict], strategy: str) -> dict:
  """{n: images/s at n over images/s at 1} for one strategy (the 1-device point serves every strategy)."""
  base = next((p for p in points if p["devices"] == 1 and "images_per_s" in p), None)
  if base is None:
    return {}
  return {str(p["devices"]): p["images_per_s"] / base["images_per_s"] for p in points
          if "images_per_s" in p and (p["devices"] == 1 or p["strategy"] == strategy)}


def run_point(args, n: int, strategy: str, platform: str) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.json")
    cmd = [sys.executable, os.path.join(HERE, "himar_train.py"), f"--variant={args.variant}",
           f"--batch={n * args.per_device_batch}", f"--mesh={MESHES[strategy]}", f"--steps={args.steps}",
           f"--warmup={args.warmup}", f"--out={out}", *args.extra]
    print(f"[bench/scaling] {n} device(s), {strategy}: {' '.join(cmd[1:])}", flush=True)
    try:
      proc = subprocess.run(cmd, env=point_env(n, platform), capture_output=True, text=True,
                            timeout=args.point_timeout or None)
    except subprocess.TimeoutExpired:
      return {"devices": n, "strategy": strategy, "error": f"timed out after --point_timeout={args.point_timeout} s"}
    if proc.returncode != 0 or not os.path.exists(out):
      text = proc.stderr or proc.stdout
      # XLA appends long Python stack traces to its messages: keep the lines that name an error, then the tail.
      named = [line[:1000] for line in text.splitlines() if "Error" in line or "error:" in line][:8]
      return {"devices": n, "strategy": strategy, "error": "\n".join(named + ["...", text[-2000:]])}
    with open(out) as f:
      result = json.load(f)
  keep = ("step_s", "images_per_s", "peak_memory_gib", "compiled_temp_gib", "compiled_argument_gib", "mfu",
          "compile_s", "mesh", "device", "jax")
  return {"devices": n, "strategy": strategy, "global_batch": n * args.per_device_batch,
          **{k: result[k] for k in keep if k in result}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="himar_b")
  p.add_argument("--per_device_batch", type=int, default=64)
  p.add_argument("--devices", default="1,2", help="comma-separated device counts")
  p.add_argument("--meshes", default="data,fsdp", help=f"strategies at n > 1: {sorted(MESHES)}")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--platform", default=None, help="gpu | cpu (default: JAX's default backend)")
  p.add_argument("--point_timeout", type=float, default=0, help="seconds per point (0: none); a point that "
                 "runs longer is recorded as an error and the next one starts")
  p.add_argument("--out", default=None)
  args, extra = p.parse_known_args(argv)
  args.extra = extra  # passed through to himar_train.py, e.g. --remat=dots --scan_blocks=1
  strategies = args.meshes.split(",")
  for s in strategies:
    if s not in MESHES:
      raise SystemExit(f"--meshes: {s!r} is not one of {sorted(MESHES)}.")
  counts = sorted({int(n) for n in args.devices.split(",")})
  if counts[0] != 1:
    raise SystemExit(f"--devices={args.devices!r} must include 1 (the baseline of the speedups).")
  platform = args.platform
  if platform is None:
    # The probe must not keep GPU memory from the points' processes (JAX preallocates 75% by default).
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax
    platform = jax.default_backend()
    available = jax.device_count()
    if platform == "gpu" and counts[-1] > available:
      raise SystemExit(f"--devices={args.devices!r} asks for {counts[-1]} GPUs; this machine has {available}.")
  points = []
  interconnect = gpu_interconnect() if platform == "gpu" else None
  command = "PYTHONPATH=. python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
  for n in counts:
    for strategy in (strategies[:1] if n == 1 else strategies):
      points.append(run_point(args, n, strategy, platform))
      print(json.dumps(points[-1]), flush=True)
      report = {"command": command, "variant": args.variant, "per_device_batch": args.per_device_batch,
                "xla_flags": os.environ.get("XLA_FLAGS", ""), "interconnect": interconnect, "points": points,
                "speedup": {s: speedups(points, s) for s in strategies}}
      if args.out:  # after every point, so a run stopped at its time limit keeps what it measured
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
          json.dump(report, f, indent=2)
  print(json.dumps(report["speedup"], indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
