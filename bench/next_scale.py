"""HMAR vs VAR in our code on one accelerator: training step time, sampling time and peak memory.

Run on the GPU machine from the repository root (wheels for ml_collections / grain on PYTHONPATH, see
shared/scripts/gpu_wheels.sh):
  PYTHONPATH=. python bench/next_scale.py --depth=16 --out=bench/results/next_scale_d16_h100.json
CPU smoke run (seconds; writes nothing unless --out is given):
  PYTHONPATH=. python bench/next_scale.py --config=tiny

What runs (random weights: the cost does not depend on their values), bfloat16 matmuls (config.model.dtype),
float32 params, one device:
  train   the trainer's jitted step (AdamW, clipping, EMA; HMAR stage 1 with its unused mask branch frozen, VAR)
          at --train_batch (default 64; the published runs use a global batch of 768 over many GPUs, and the
          references state no per-GPU batch), random token batches; attention through the block-sparse entry
          point (block-causal for VAR, block-diagonal for HMAR; Pallas kernels on GPU).
  sample  --sample_batch (default 64) class-conditional samples (CFG doubles the batch to 128), cfg 1.5, top-k
          900, top-p 0.96 (the settings of HMAR's benchmark/inference.py): VAR with its KV cache (one pass per
          scale), HMAR without a cache, with the default 14-pass mask schedule.
Each measurement runs in its own process, so the device's peak_bytes_in_use is that measurement's alone (weights
included; `weights_gib` says how much of it they are). Where the backend has no memory_stats (CPU), the peak is
the compiled program's memory_analysis (arguments + outputs + temporaries). Times are medians of back-to-back
calls after a compile + warm-up call.
Ratios are VAR / HMAR (> 1: HMAR better), against the HMAR paper's claims: training > 2.5x faster, inference
> 1.75x faster, inference memory > 3x lower.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLAIMS = {"train_speedup": 2.5, "sample_speedup": 1.75, "sample_memory_ratio": 3.0}
# HMAR benchmark/inference.py settings for both models.
SAMPLE_SETTINGS = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}
GIB = 2 ** 30


def _config(kind: str, args):
  from configs.next_scale import get_config
  if args.config == "tiny":
    c = get_config(f"{kind}_tiny")
    c.model.dtype = "bfloat16"
  else:
    c = get_config(f"{kind}_d{args.depth}" + ("_512" if args.resolution == 512 else ""))
  if args.attention:
    c.model.attention_implementation = args.attention
  c.data.global_batch_size = args.train_batch
  c.mesh.shape = (1, 1, 1)
  return c


def _median_time(fn, call_args, repeats: int) -> tuple[float, float, object]:
  import jax
  import numpy as np
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*call_args))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*call_args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), compile_s, out


def _nbytes(tree) -> int:
  import jax
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _memory(compiled) -> dict:
  """Peak device memory of this process (GPU), else the compiled program's own accounting."""
  import jax
  out = {}
  try:
    mem = compiled.memory_analysis()
    out["compiled_temp_gib"] = mem.temp_size_in_bytes / GIB
    out["compiled_total_gib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                                 - getattr(mem, "alias_size_in_bytes", 0)) / GIB
  except Exception as e:  # noqa: BLE001 (not every backend implements it)
    out["compiled_memory_error"] = repr(e)
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    out["peak_gib"], out["peak_source"] = stats["peak_bytes_in_use"] / GIB, "memory_stats"
  elif "compiled_total_gib" in out:
    out["peak_gib"], out["peak_source"] = out["compiled_total_gib"], "memory_analysis"
  return out


def run_train(kind: str, args) -> dict:
  import functools

  import jax
  import numpy as np

  from himar_jax import models
  from himar_jax.models import next_scale
  from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
  from himar_jax.train.optimizer import make_optimizer
  from himar_jax.train.state import count_params, init_train_state, make_train_setup
  from himar_jax.train.step import make_train_step

  config = _config(kind, args)
  mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  # As the trainer (train/loop.py optimizer_for): the family's frozen params (HMAR stage 1: the mask branch).
  tx = make_optimizer(config, 10_000, trainable=functools.partial(next_scale.trainable, config))
  setup = make_train_setup(models.model_fn(config), tx, mesh)
  state = init_train_state(setup, config.seed)
  step = make_train_step(setup, config.optim.ema_decay)
  m = config.model
  length = sum(p * p for p in m.patch_nums)
  rng = np.random.default_rng(0)
  batch = sharding_lib.shard_batch({
      "indices": rng.integers(0, m.vocab_size, (args.train_batch, length)).astype(np.int32),
      "label": rng.integers(0, m.num_classes, args.train_batch).astype(np.int32)}, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  return {"kind": kind, "params": count_params(state.params), "batch": args.train_batch, "tokens": length,
          "step_s": step_s, "images_per_s": args.train_batch / step_s, "compile_s": round(compile_s, 1),
          "loss": float(metrics["loss"]), "train_state_gib": _nbytes(state) / GIB, **_memory(compiled)}


def run_sample(kind: str, args) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from himar_jax import models
  from himar_jax.models import next_scale

  config = _config(kind, args)
  build = models.model_fn(config)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.split(build(nnx.Rngs(0)))[1])()  # weights straight onto the device
  kwargs = dict(SAMPLE_SETTINGS)
  if kind == "hmar":
    kwargs["mask_schedule"] = next_scale.sample_kwargs(config)["mask_schedule"]
  passes = (sum(len(s) for s in kwargs["mask_schedule"]) if kind == "hmar" else len(config.model.patch_nums))
  fn = jax.jit(lambda state, labels, keys: nnx.merge(graphdef, state).sample(labels, keys=keys, **kwargs))
  b = args.sample_batch
  labels = jnp.arange(b, dtype=jnp.int32) % config.model.num_classes
  keys = jax.random.split(jax.random.key(0), b)
  t0 = time.perf_counter()
  compiled = fn.lower(state, labels, keys).compile()
  compile_s = time.perf_counter() - t0
  sample_s, _, tokens = _median_time(compiled, (state, labels, keys), args.sample_repeats)
  return {"kind": kind, "batch": b, "forward_passes": passes, "kv_cache": kind == "var", "sample_s": sample_s,
          "images_per_s": b / sample_s, "compile_s": round(compile_s, 1), "weights_gib": _nbytes(state) / GIB,
          "tokens_shape": list(tokens.shape), **_memory(compiled)}


PARTS = {"train": run_train, "sample": run_sample}


def _run_isolated(part: str, kind: str, argv: list[str]) -> dict:
  """One measurement in a fresh process (its own device peak); errors such as OOM come back as {'error': ...}."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "r.json")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--part={part}", f"--kind={kind}", f"--part_out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(out):
      return {"kind": kind, "error": (proc.stderr or proc.stdout)[-2000:]}
    with open(out) as f:
      return json.load(f)


def _ratio(results, part, key):
  var, hmar = results[f"{part}_var"], results[f"{part}_hmar"]
  if key not in var or key not in hmar:
    return None
  return var[key] / hmar[key]


def _table(results: dict, ratios: dict) -> str:
  rows = [("", "VAR", "HMAR", "VAR/HMAR", "paper claims")]
  fmt = lambda r, k, f: f.format(r[k]) if k in r else ("error" if "error" in r else "-")
  for label, part, key, f, claim in (
      ("train step (s)", "train", "step_s", "{:.4f}", f"> {CLAIMS['train_speedup']}x faster"),
      ("train peak (GiB)", "train", "peak_gib", "{:.2f}", ""),
      ("sample batch (s)", "sample", "sample_s", "{:.3f}", f"> {CLAIMS['sample_speedup']}x faster"),
      ("sample peak (GiB)", "sample", "peak_gib", "{:.2f}", f"> {CLAIMS['sample_memory_ratio']}x lower"),
      ("sample weights (GiB)", "sample", "weights_gib", "{:.2f}", ""),
      ("forward passes", "sample", "forward_passes", "{}", "")):
    var, hmar = results[f"{part}_var"], results[f"{part}_hmar"]
    r = var[key] / hmar[key] if key in var and key in hmar and hmar[key] else None
    rows.append((label, fmt(var, key, f), fmt(hmar, key, f), "-" if r is None else f"{r:.2f}x", claim))
  widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
  return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="published", choices=("published", "tiny"),
                 help="published: hmar_d<depth> / var_d<depth>; tiny: the CPU-sized test variants (seconds)")
  p.add_argument("--depth", type=int, default=16)
  p.add_argument("--resolution", type=int, default=256, choices=(256, 512))
  p.add_argument("--train_batch", type=int, default=64)
  p.add_argument("--sample_batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--sample_repeats", type=int, default=5, help="timed sampling calls (median)")
  p.add_argument("--attention", default=None, help="config.model.attention_implementation override "
                 "(default: the block-sparse entry point's choice; xla | cudnn | pallas_gpu)")
  p.add_argument("--parts", default="train,sample")
  p.add_argument("--in_process", action="store_true", help="all measurements in this process (peaks then "
                 "accumulate: use for debugging only)")
  p.add_argument("--out", default=None, help="JSON path (default for --config=published: "
                 "bench/results/next_scale_d<depth>_<device>.json)")
  p.add_argument("--part", default=None, help=argparse.SUPPRESS)
  p.add_argument("--kind", default=None, help=argparse.SUPPRESS)
  p.add_argument("--part_out", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  raw = list(sys.argv[1:] if argv is None else argv)

  if args.part:  # a child process: one measurement
    result = PARTS[args.part](args.kind, args)
    with open(args.part_out, "w") as f:
      json.dump(result, f)
    return 0

  import jax
  device = jax.devices()[0]
  name = "tiny" if args.config == "tiny" else f"d{args.depth}" + ("_512" if args.resolution == 512 else "")
  out = args.out
  if out is None and args.config != "tiny":
    tag = "".join(ch for ch in device.device_kind.lower().split()[-1] if ch.isalnum()) or device.platform
    tag = next((t for t in ("h100", "h200", "a100") if t in device.device_kind.lower()), tag)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"next_scale_{name}_{tag}.json")
  results = {}
  for part in args.parts.split(","):
    for kind in ("var", "hmar"):
      print(f"[bench/next_scale] {part} {kind} ...", flush=True)
      if args.in_process:
        results[f"{part}_{kind}"] = PARTS[part](kind, args)
      else:
        results[f"{part}_{kind}"] = _run_isolated(part, kind, raw)
      if "error" in results[f"{part}_{kind}"]:
        print(results[f"{part}_{kind}"]["error"], file=sys.stderr)
      else:
        print(json.dumps(results[f"{part}_{kind}"]), flush=True)
      if out:  # a partial file after each measurement: a run cut short keeps what it measured
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".partial", "w") as f:
          json.dump(results, f, indent=2)
  for part in ("train", "sample"):
    for kind in ("var", "hmar"):
      results.setdefault(f"{part}_{kind}", {"kind": kind, "skipped": True})
  ratios = {"train_speedup": _ratio(results, "train", "step_s"),
            "sample_speedup": _ratio(results, "sample", "sample_s"),
            "sample_memory_ratio": _ratio(results, "sample", "peak_gib"),
            "train_memory_ratio": _ratio(results, "train", "peak_gib")}
  verdict = {k: (None if ratios[k] is None else ratios[k] > v) for k, v in CLAIMS.items()}
  report = {
      "command": "PYTHONPATH=. python bench/next_scale.py " + " ".join(shlex.quote(a) for a in raw),
      "device": device.device_kind, "platform": device.platform, "jax": jax.__version__, "model": name,
      "train_batch": args.train_batch, "sample_batch": args.sample_batch, "sample_settings": SAMPLE_SETTINGS,
      "results": results, "ratios_var_over_hmar": ratios, "paper_claims": CLAIMS, "meets_claim": verdict}
  print(_table(results, ratios))
  print(json.dumps({"ratios_var_over_hmar": ratios, "meets_claim": verdict}, indent=2))
  if out:
    with open(out, "w") as f:
      json.dump(report, f, indent=2)
    if os.path.exists(out + ".partial"):
      os.remove(out + ".partial")
    print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
