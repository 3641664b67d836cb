"""Where a profiled program spends its device time: kernels of a jax.profiler trace, summed by name and by kind.

  python bench/trace_summary.py TRACE_DIR [--top=40] [--steps=N] [--hlo=DUMP.txt[.gz]] [--out=summary.json]

TRACE_DIR is the log_dir given to `jax.profiler.trace` (the newest `plugins/profile/*/*.trace.json.gz` under it is
read). Events on device processes (name containing "/device:") are summed per kernel name; kinds are matmul
(cuBLAS / CUTLASS gemm kernels), attention (cuDNN / flash kernels), and XLA fusions split by what they are named
after (loop / input (reductions) / transpose / ...), and collectives (NCCL kernels). --steps divides the totals
into per-step milliseconds, and with several device processes (one SPMD program on N GPUs) they are averaged per
device. The timeline per device (averaged over devices, per step): span (first kernel start to last kernel end), busy
(the union of kernel intervals over all streams), idle = span - busy (waits: host dispatch, a slower peer GPU),
and the collective time that no compute kernel overlaps (exposed). Needs only the standard library, so it runs on
the GPU machine as is.

--hlo names the program's optimised HLO text (XLA_FLAGS=--xla_dump_to=DIR: the `*after_optimizations.txt` of the
jitted function): each top kernel that is an XLA fusion then gets the shapes it writes and the JAX operation it
came from (the fusion's op_name metadata), which says which line of the model a kernel belongs to.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys

_MATMUL = re.compile(r"gemm|xmma|cutlass|sm\d+_.*(tensorop|mma)|cublas|nvjet", re.I)
_ATTENTION = re.compile(r"cudnn|fmha|flash|attention|sdpa", re.I)
_COLLECTIVE = re.compile(r"nccl|all-?reduce|all-?gather|reduce-?scatter|collective-?permute", re.I)


def newest_trace(log_dir: str) -> pathlib.Path:
  root = pathlib.Path(log_dir)
  traces = sorted(root.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"no plugins/profile/*/*.trace.json.gz under {log_dir!r}: pass the log_dir given to "
                            "jax.profiler.trace.")
  return traces[-1]


def kind_of(name: str) -> str:
  if _COLLECTIVE.search(name):
    return "collective"
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


def _union(intervals) -> list[tuple[float, float]]:
  merged: list[list[float]] = []
  for start, end in sorted(intervals):
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  return [(a, b) for a, b in merged]


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
  """Total length of the intersection of two sorted, disjoint interval lists."""
  i = j = 0
  total = 0.0
  while i < len(a) and j < len(b):
    lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
    total += max(0.0, hi - lo)
    if a[i][1] < b[j][1]:
      i += 1
    else:
      j += 1
  return total


def timeline(kernels_by_pid: dict) -> dict[str, float]:
  """{span, busy, idle, collective, collective_exposed} in us summed over devices, from {pid: [(ts, dur, kind)]}."""
  out = collections.Counter()
  for kernels in kernels_by_pid.values():
    if not kernels:
      continue
    busy = _union((ts, ts + dur) for ts, dur, _ in kernels)
    coll = _union((ts, ts + dur) for ts, dur, kind in kernels if kind == "collective")
    compute = _union((ts, ts + dur) for ts, dur, kind in kernels if kind != "collective")
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(b - a for a, b in busy)
    coll_us = sum(b - a for a, b in coll)
    out["span"] += span
    out["busy"] += busy_us
    out["idle"] += span - busy_us
    out["collective"] += coll_us
    out["collective_exposed"] += coll_us - _overlap(coll, compute)
  return out


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
  kernels_by_pid: dict[int, list] = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in device_pids:
      continue
    name = e.get("name", "?")
    by_name[name] += float(e.get("dur", 0.0))
    kernels_by_pid[e["pid"]].append((float(e.get("ts", 0.0)), float(e.get("dur", 0.0)), kind_of(name)))
    count[name] += 1
    args = e.get("args") or {}
    if name not in hlo:
      hlo[name] = str(args.get("hlo_op") or args.get("long_name") or "")[:120]
  by_kind: dict[str, float] = collections.defaultdict(float)
  for name, us in by_name.items():
    by_kind[kind_of(name)] += us
  total_us = sum(by_name.values())
  per = max(steps, 1) * max(len(device_pids), 1)  # per step and per device: devices of one SPMD program match
  ms = lambda us: us / 1e3 / per
  return {
      "trace": str(trace_path), "device_processes": sorted(process[p] for p in device_pids),
      "steps": steps, "device_ms_per_step": ms(total_us),
      "timeline_ms_per_step": {k: round(ms(v), 3) for k, v in timeline(kernels_by_pid).items()},
      "by_kind_ms_per_step": {k: round(ms(v), 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      "top_kernels": [{"name": n[:160], "kind": kind_of(n), "ms_per_step": round(ms(us), 3),
                       "calls_per_step": count[n] / per, "share": round(us / total_us, 4),
                       "hlo_op": hlo[n]}
                      for n, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]],
  }


_FUSION_LINE = re.compile(r"^\s*%([\w.\-]+) = (.*?) fusion\(.*?metadata=\{op_name=\"([^\"]*)\"(.*)$")
_TABLE_ROW = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})$')


def _source_frames(hlo_text: str):
  """stack_frame_id -> ["file:line (function)", ...] innermost first, from the dump's FileNames / FunctionNames /
  FileLocations / StackFrames tables (the walk stops where a frame is its own parent, as at a scan body's root)."""
  tables: dict[str, dict[int, str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
      continue
    m = _TABLE_ROW.match(line) if current is not None else None
    if m:
      current[int(m.group(1))] = m.group(2) if m.group(2) is not None else m.group(3)
    elif current is not None and line.strip():
      current = None
  field = lambda row, key: int(re.search(key + r"=(\d+)", row).group(1))
  files, funcs = tables.get("FileNames", {}), tables.get("FunctionNames", {})
  locs, frames = tables.get("FileLocations", {}), tables.get("StackFrames", {})

  def where(frame_id: int) -> list[str]:
    out, seen = [], set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      row = frames[frame_id]
      loc = locs.get(field(row, "file_location_id"), "")
      if loc:
        path = files.get(field(loc, "file_name_id"), "?")
        out.append(f"{'/'.join(path.split('/')[-2:])}:{field(loc, 'line')} ({funcs.get(field(loc, 'function_name_id'), '?')})")
      frame_id = field(row, "parent_frame_id")
    return out
  return where


def fusion_origins(hlo_text: str) -> dict[str, dict]:
  """{kernel name: {"writes": result shape(s), "op_name": JAX op path, "source": its Python frames}} for every
  fusion instruction of an HLO
  dump. A kernel is named after its fusion with '.' turned into '_' (`input_add_reduce_fusion.37` runs as
  `input_add_reduce_fusion_37`); XLA's own rematerialised copies (`.remat`, `.remat2`) run under the same name."""
  origins = {}
  where = _source_frames(hlo_text)
  for line in hlo_text.splitlines():
    m = _FUSION_LINE.match(line)
    if m:
      name = re.sub(r"\.remat\d*$", "", m.group(1)).replace(".", "_")
      frame = re.search(r"stack_frame_id=(\d+)", m.group(4))
      origins.setdefault(name, {"writes": m.group(2)[:200], "op_name": m.group(3),
                                "source": where(int(frame.group(1)))[:4] if frame else []})
  return origins


def annotate(summary: dict, hlo_text: str) -> dict:
  """summary with "writes" / "op_name" added to each top kernel found among the HLO text's fusions."""
  origins = fusion_origins(hlo_text)
  for k in summary["top_kernels"]:
    k.update(origins.get(k["name"], {}))
  return summary


def hlo_dump_of(module: str, xla_flags: str | None = None) -> str | None:
  """The optimised HLO text file XLA dumped for `module` (e.g. jit_step_fn) under --xla_dump_to, if any."""
  flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  m = re.search(r"--xla_dump_to=(\S+)", flags)
  if not m:
    return None
  found = sorted(pathlib.Path(m.group(1)).glob(f"*.{module}.*after_optimizations.txt"))
  return str(found[-1]) if found else None


def read_text(path: str) -> str:
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt") as f:
    return f.read()


def print_summary(summary: dict, file=sys.stdout) -> None:
  print(f"{summary['trace']}\ndevice time {summary['device_ms_per_step']:.2f} ms/step "
        f"({', '.join(summary['device_processes'])})", file=file)
  if summary.get("timeline_ms_per_step"):
    print("  timeline: " + ", ".join(f"{k} {v:.3f} ms" for k, v in summary["timeline_ms_per_step"].items()), file=file)
  for kind, v in summary["by_kind_ms_per_step"].items():
    print(f"  {kind:28s} {v:9.3f} ms", file=file)
  print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  kernel [hlo op]", file=file)
  for k in summary["top_kernels"]:
    print(f"{k['ms_per_step']:9.3f} {k['share']:6.3f} {k['calls_per_step']:6.0f}  {k['name'][:90]}"
          f"{' [' + k['hlo_op'] + ']' if k['hlo_op'] else ''}", file=file)
    if "op_name" in k:
      print(f"{'':24}writes {k['writes']}\n{'':24}from {k['op_name'][:140]}", file=file)
      if k.get("source"):
        print(f"{'':24}at {' <- '.join(k['source'])}", file=file)


def profile_calls(run, log_dir: str, *, calls: int, module: str, top: int = 40,
                  device_filter: str = "/device:") -> dict:
  """Traces `calls` back-to-back run() calls into log_dir (dispatched without waiting in between, as in a training
  loop; the last call's result is waited for), then summarises them per call, annotated from the HLO dump of
  `module` when XLA_FLAGS has --xla_dump_to; prints the summary to stderr and writes it to log_dir/summary.json."""
  import jax  # only the profiling entry point needs jax; the rest of this module is standard library
  with jax.profiler.trace(log_dir):
    for _ in range(calls):
      result = run()
    jax.block_until_ready(result)
  summary = summarize(newest_trace(log_dir), device_filter=device_filter, steps=calls, top=top)
  dump = hlo_dump_of(module)
  if dump:
    annotate(summary, read_text(dump))
  print_summary(summary, file=sys.stderr)
  pathlib.Path(log_dir, "summary.json").write_text(json.dumps(summary, indent=1))
  return summary


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("log_dir")
  p.add_argument("--top", type=int, default=40)
  p.add_argument("--steps", type=int, default=1)
  p.add_argument("--device_filter", default="/device:")
  p.add_argument("--hlo", default=None, help="the program's optimised HLO text (.txt or .txt.gz)")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  summary = summarize(newest_trace(args.log_dir), device_filter=args.device_filter, steps=args.steps, top=args.top)
  if args.hlo:
    annotate(summary, read_text(args.hlo))
  print_summary(summary)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
