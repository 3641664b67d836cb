"""Where a profiled program spends its device time: kernels of a jax.profiler trace, summed by name and by kind.

  python bench/trace_summary.py TRACE_DIR [--top=40] [--steps=N] [--out=summary.json]

TRACE_DIR is the log_dir given to `jax.profiler.trace` (the newest `plugins/profile/*/*.trace.json.gz` under it is
read). Events on device processes (name containing "/device:") are summed per kernel name; kinds are matmul
(cuBLAS / CUTLASS gemm kernels), attention (cuDNN / flash kernels), and XLA fusions split by what they are named
after (loop / input (reductions) / transpose / ...). --steps divides the totals into per-step milliseconds. Needs
only the standard library, so it runs on the GPU machine as is.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys

_MATMUL = re.compile(r"gemm|xmma|cutlass|sm\d+_.*(tensorop|mma)|cublas|nvjet", re.I)
_ATTENTION = re.compile(r"cudnn|fmha|flash|attention|sdpa", re.I)


def newest_trace(log_dir: str) -> pathlib.Path:
  root = pathlib.Path(log_dir)
  traces = sorted(root.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"no plugins/profile/*/*.trace.json.gz under {log_dir!r}: pass the log_dir given to "
                            "jax.profiler.trace.")
  return traces[-1]


def kind_of(name: str) -> str:
  if _MATMUL.search(name):
    return "matmul"
  if _ATTENTION.search(name):
    return "attention"
  m = re.match(r"(loop|input|transpose|concatenate|scatter|gather|reduce|copy|dynamic_update_slice|"
               r"dynamic_slice|select|broadcast|convert|triton)[_a-z]*", name)
  if m:
    return "fusion:" + m.group(1)
  if "memcpy" in name.lower() or "memset" in name.lower():
    return "memcpy/memset"
  return "other"


def summarize(trace_path, *, device_filter: str = "/device:", steps: int = 1, top: int = 40) -> dict:
  with gzip.open(trace_path, "rb") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  process = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in process.items() if device_filter in name}
  by_name: dict[str, float] = collections.defaultdict(float)
  count: dict[str, int] = collections.Counter()
  hlo: dict[str, str] = {}
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in device_pids:
      continue
    name = e.get("name", "?")
    by_name[name] += float(e.get("dur", 0.0))
    count[name] += 1
    args = e.get("args") or {}
    if name not in hlo:
      hlo[name] = str(args.get("hlo_op") or args.get("long_name") or "")[:120]
  by_kind: dict[str, float] = collections.defaultdict(float)
  for name, us in by_name.items():
    by_kind[kind_of(name)] += us
  total_us = sum(by_name.values())
  ms = lambda us: us / 1e3 / max(steps, 1)
  return {
      "trace": str(trace_path), "device_processes": sorted(process[p] for p in device_pids),
      "steps": steps, "device_ms_per_step": ms(total_us),
      "by_kind_ms_per_step": {k: round(ms(v), 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      "top_kernels": [{"name": n[:160], "kind": kind_of(n), "ms_per_step": round(ms(us), 3),
                       "calls_per_step": count[n] / max(steps, 1), "share": round(us / total_us, 4),
                       "hlo_op": hlo[n]}
                      for n, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]],
  }


def print_summary(summary: dict, file=sys.stdout) -> None:
  print(f"{summary['trace']}\ndevice time {summary['device_ms_per_step']:.2f} ms/step "
        f"({', '.join(summary['device_processes'])})", file=file)
  for kind, v in summary["by_kind_ms_per_step"].items():
    print(f"  {kind:28s} {v:9.3f} ms", file=file)
  print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  kernel [hlo op]", file=file)
  for k in summary["top_kernels"]:
    print(f"{k['ms_per_step']:9.3f} {k['share']:6.3f} {k['calls_per_step']:6.0f}  {k['name'][:90]}"
          f"{' [' + k['hlo_op'] + ']' if k['hlo_op'] else ''}", file=file)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("log_dir")
  p.add_argument("--top", type=int, default=40)
  p.add_argument("--steps", type=int, default=1)
  p.add_argument("--device_filter", default="/device:")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  summary = summarize(newest_trace(args.log_dir), device_filter=args.device_filter, steps=args.steps, top=args.top)
  print_summary(summary)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
