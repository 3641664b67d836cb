"""Which XLA GPU flags speed up the DiT head (the Hi-MAR sampler's hot loop and a third of its training step).

  PYTHONPATH=. python bench/xla_flags.py --workload=dit_sample --out=bench/results/xla_flags_dit_sample.json

Each flag set runs in its own process (XLA reads XLA_FLAGS once, at backend start), appended to any XLA_FLAGS
already set. Workloads, at the published Hi-MAR-B sizes (DiT head 512 x 6, 8 heads, 16 x 16 tokens, random weights):
  dit_sample  `--passes` denoising passes chained in one jitted fori_loop (each pass's output is the next input),
              batch 256 = 128 images x 2 CFG halves: exactly the sampler's inner loop;
  dit_train   value and gradient of the DiT loss w.r.t. the head's parameters, batch 256 = 64 images x
              diffusion_batch_mul 4 (the training step's DiT part), `--passes` calls back to back.
Prints a table (ms per pass, speed-up over the first set, largest relative difference of the output from the first
set's) and writes the rows as JSON with the command that produced them. A set whose process fails (e.g. a flag this
XLA does not know) is reported with its error instead of stopping the sweep.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name=flags pairs; the first is the baseline every other set is compared with.
DEFAULT_SETS = (
    "default=",
    "cublaslt=--xla_gpu_enable_cublaslt=true",
    "triton_gemm_any=--xla_gpu_triton_gemm_any=true",
    "cudnn_gemm_fusion=--xla_gpu_cudnn_gemm_fusion_level=2",
    "block_level_rewriter=--xla_gpu_experimental_enable_fusion_block_level_rewriter=true",
    "all_fusions_triton=--xla_gpu_experimental_all_fusions_with_triton=true",
)
WORKLOADS = ("dit_sample", "dit_train")


def parse_sets(text: str) -> list[tuple[str, str]]:
  """'a=--f=1 --g=2;b=' -> [('a', '--f=1 --g=2'), ('b', '')]; names must be unique and non-empty."""
  sets = []
  for item in filter(None, (part.strip() for part in text.split(";"))):
    name, sep, flags = item.partition("=")
    name = name.strip()
    if not sep or not name or name.startswith("-") or any(c.isspace() for c in name):
      raise ValueError(f"flag set {item!r} must read name=flags (flags may be empty), e.g. 'cublaslt="
                       "--xla_gpu_enable_cublaslt=true'.")
    sets.append((name, flags.strip()))
  names = [n for n, _ in sets]
  if not sets or len(set(names)) != len(names):
    raise ValueError(f"--sets needs at least one flag set and unique names; got {names}.")
  return sets


def relative_difference(a, b) -> float:
  """max |a - b| / max |b| over float32 copies (0 for identical arrays)."""
  import numpy as np
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def run_workload(workload: str, variant: str, passes: int, repeats: int, out_npy: str, norm: str = "xla") -> dict:
  """Times one workload in this process (its XLA_FLAGS already set); saves its output to out_npy."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from configs.himar import get_config
  from himar_jax.diffusion import create_diffusion
  from himar_jax.models import heads

  m = get_config(variant).model
  head = heads.DiTHead(m.token_dim, m.decoder_dim, m.dit_width, m.dit_depth, m.dit_heads,
                       grid_size=m.grid_size, mlp_ratio=m.dit_mlp_ratio, rngs=nnx.Rngs(0),
                       norm_implementation=norm)
  # adaLN weights are zero at init (every block would be the identity): small random values exercise the
  # same kernels with non-trivial numbers.
  graphdef, params = nnx.split(head, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype)
                                        for p, k in zip(leaves, keys)])
  batch, seq = 256, m.grid_size ** 2
  k_x, k_z, k_t = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(k_x, (batch, seq, m.token_dim), jnp.float32)
  z = jax.random.normal(k_z, (batch, seq, m.decoder_dim), jnp.float32)
  t = jax.random.randint(k_t, (batch,), 0, 1000)

  if workload == "dit_sample":
    @jax.jit
    def run(params, x, z, t):
      model = nnx.merge(graphdef, params)
      z_emb = model.embed_condition(z)
      return jax.lax.fori_loop(0, passes, lambda i, x: model.denoise(x, t, z_emb), x)
    call = lambda: run(params, x, z, t)
    calls = 1
  elif workload == "dit_train":
    diffusion = create_diffusion("", learn_sigma=False)
    mask = (jax.random.uniform(jax.random.key(3), (batch, seq)) < 0.5).astype(jnp.float32)
    noise = jax.random.normal(jax.random.key(4), x.shape, jnp.float32)

    @jax.jit
    def run(params, x, z, t):
      def loss(params):
        return jnp.mean(heads.dit_head_loss(nnx.merge(graphdef, params), diffusion, x, z, mask, t=t, noise=noise))
      value, grads = jax.value_and_grad(loss)(params)
      return value, jnp.concatenate([g.reshape(-1) for g in jax.tree.leaves(grads)])
    call = lambda: run(params, x, z, t)
    calls = passes
  else:
    raise ValueError(f"--workload={workload!r} is not one of {WORKLOADS}.")

  t0 = time.perf_counter()
  out = jax.block_until_ready(call())
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = call()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / passes)
  np.save(out_npy, np.asarray(jax.tree.leaves(out)[-1], np.float32))
  return {"ms_per_pass": 1e3 * float(np.median(times)), "first_call_s": first_s,
          "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workload", default="dit_sample", choices=WORKLOADS)
  p.add_argument("--variant", default="himar_b")
  p.add_argument("--passes", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--sets", default=";".join(DEFAULT_SETS), help="name=flags;name=flags (first = baseline)")
  p.add_argument("--timeout", type=int, default=240, help="seconds per flag set")
  p.add_argument("--norm", default="xla", choices=("xla", "pallas_gpu"),
                 help="the DiT head's modulated_layer_norm backend")
  p.add_argument("--out", default=None)
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one set, write JSON here
  args = p.parse_args()

  if args.child:
    npy = args.child + ".npy"
    result = run_workload(args.workload, args.variant, args.passes, args.repeats, npy, args.norm)
    with open(args.child, "w") as f:
      json.dump(result, f)
    return

  from bench.report import report
  sets = parse_sets(args.sets)
  rows, baseline = [], None
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, flags) in enumerate(sets):
      child_out = os.path.join(tmp, f"set{i}.json")
      env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags])))
      cmd = [sys.executable, os.path.abspath(__file__), f"--workload={args.workload}", f"--variant={args.variant}",
             f"--passes={args.passes}", f"--repeats={args.repeats}", f"--norm={args.norm}", f"--child={child_out}"]
      row = {"name": name, "flags": flags}
      try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode == 0:
          with open(child_out) as f:
            row.update(json.load(f))
        else:
          row["error"] = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:300]
      except subprocess.TimeoutExpired:
        row["error"] = f"timed out after {args.timeout} s"
      if "ms_per_pass" in row:
        import numpy as np
        out = np.load(child_out + ".npy")
        if baseline is None:
          baseline = (row["ms_per_pass"], out)
        row["speedup"] = baseline[0] / row["ms_per_pass"]
        row["rel_diff_vs_first"] = relative_difference(out, baseline[1])
      rows.append(row)
      print(f"{name:24s} " + (f"{row['ms_per_pass']:8.3f} ms  x{row['speedup']:.3f}  diff "
                               f"{row['rel_diff_vs_first']:.2e}" if "ms_per_pass" in row else row["error"]),
            flush=True)
  report({"command": "PYTHONPATH=. python " + " ".join(sys.argv), "workload": args.workload, "norm": args.norm,
          "variant": args.variant, "passes": args.passes, "rows": rows}, args.out)


if __name__ == "__main__":
  main()
