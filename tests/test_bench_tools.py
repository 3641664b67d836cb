"""bench/trace_summary.py: per-kernel and per-kind device time from a profiler trace (a synthetic one here)."""
import argparse
import gzip
import json
import os

import pytest

from bench import trace_summary


def _write_trace(root, events):
  folder = os.path.join(root, "plugins", "profile", "2026_01_01_00_00_00")
  os.makedirs(folder)
  with gzip.open(os.path.join(folder, "host.trace.json.gz"), "wt") as f:
    json.dump({"traceEvents": events, "metadata": {}}, f)


def test_summary_sums_device_kernels_per_step_and_kind(tmp_path):
  meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
  kernel = lambda pid, name, dur: {"ph": "X", "pid": pid, "tid": 1, "name": name, "ts": 0, "dur": dur,
                                   "args": {"hlo_op": name + "_op"}}
  events = [meta(1, "/device:GPU:0"), meta(2, "/host:CPU"),
            kernel(1, "sm90_xmma_gemm_bf16bf16_bf16f32", 300.0), kernel(1, "sm90_xmma_gemm_bf16bf16_bf16f32", 300.0),
            kernel(1, "loop_multiply_fusion_3", 150.0), kernel(1, "cudnn_generated_fort_native_sdpa", 90.0),
            kernel(1, "input_reduce_fusion", 60.0), kernel(2, "ThunkExecutor::Execute", 5000.0)]
  _write_trace(str(tmp_path), events)
  s = trace_summary.summarize(trace_summary.newest_trace(str(tmp_path)), steps=2)
  assert s["device_processes"] == ["/device:GPU:0"]
  assert s["device_ms_per_step"] == pytest.approx(0.45)  # 900 us of device kernels over 2 steps; host excluded
  assert s["by_kind_ms_per_step"] == {"matmul": 0.3, "fusion:loop": 0.075, "attention": 0.045,
                                      "fusion:input": 0.03}
  top = s["top_kernels"][0]
  assert top["kind"] == "matmul" and top["calls_per_step"] == 1 and top["share"] == pytest.approx(600 / 900, abs=1e-4)
  assert top["hlo_op"] == "sm90_xmma_gemm_bf16bf16_bf16f32_op"


def test_summary_averages_devices_and_names_collectives(tmp_path):
  meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
  kernel = lambda pid, name, dur: {"ph": "X", "pid": pid, "tid": 1, "name": name, "ts": 0, "dur": dur, "args": {}}
  nccl = "ncclDevKernel_AllReduce_Sum_f32_RING_LL"
  events = [meta(1, "/device:GPU:0"), meta(2, "/device:GPU:1"), kernel(1, nccl, 400.0), kernel(2, nccl, 200.0),
            kernel(1, "loop_add_fusion", 100.0), kernel(2, "loop_add_fusion", 100.0)]
  _write_trace(str(tmp_path), events)
  s = trace_summary.summarize(trace_summary.newest_trace(str(tmp_path)), steps=1)
  assert s["device_processes"] == ["/device:GPU:0", "/device:GPU:1"]
  assert s["device_ms_per_step"] == pytest.approx(0.4)  # 800 us over 2 devices
  assert s["by_kind_ms_per_step"] == {"collective": 0.3, "fusion:loop": 0.1}
  assert s["top_kernels"][0]["calls_per_step"] == 1.0


def test_profile_calls_traces_each_call_and_writes_the_summary(tmp_path):
  """A real jax.profiler trace of 2 calls, summarised per call; on the CPU the ops are host events."""
  import jax
  import jax.numpy as jnp

  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  calls = []
  run = lambda: calls.append(f(x).block_until_ready())
  s = trace_summary.profile_calls(run, str(tmp_path), calls=2, module="jit_f", device_filter="/host:")
  assert len(calls) == 2 and s["steps"] == 2 and s["device_ms_per_step"] > 0
  assert json.loads((tmp_path / "summary.json").read_text())["device_ms_per_step"] == s["device_ms_per_step"]


def test_missing_trace_names_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="jax.profiler.trace"):
    trace_summary.newest_trace(str(tmp_path))


def test_scaling_points_see_n_devices_and_speedups_divide_by_one_device():
  from bench import scaling

  env = scaling.point_env(2, "gpu", base={"PATH": "/bin", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
  # the parent's probe-only setting does not reach the measured process
  assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}
  env = scaling.point_env(4, "cpu", base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/x"})
  assert env["XLA_FLAGS"] == "--xla_dump_to=/x --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu"
  with pytest.raises(ValueError, match="platform='tpu'"):
    scaling.point_env(2, "tpu")
  points = [{"devices": 1, "strategy": "data", "images_per_s": 100.0},
            {"devices": 2, "strategy": "data", "images_per_s": 190.0},
            {"devices": 2, "strategy": "fsdp", "images_per_s": 170.0},
            {"devices": 4, "strategy": "fsdp", "error": "out of memory"}]
  assert scaling.speedups(points, "data") == {"1": 1.0, "2": 1.9}
  assert scaling.speedups(points, "fsdp") == {"1": 1.0, "2": 1.7}
  assert scaling.speedups(points[1:], "data") == {}


def test_pods_memory_shards_the_training_state_over_fsdp():
  """bench/pods_memory.py on the 8 fake CPU devices: the compiled step's per-device arguments hold about 1/8 of
  the float32 state (params, EMA, two Adam moments), and the report adds them up."""
  from bench import pods_memory

  r = pods_memory.main(["--variant=himar:himar_tiny", "--per_device_batch=1", "--fsdp=8", "--scan_blocks=1",
                        "--remat=dots"])
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["global_batch"] == 8
  state_gib = r["params"] * 16 / 2 ** 30
  assert r["state_gib_unsharded"] == pytest.approx(state_gib)
  # Small arrays (norm scales, biases below the sharding threshold) stay replicated: between 1/8 and 1/4.
  assert state_gib / 8 <= r["per_device_argument_gib"] < state_gib / 4, (r["per_device_argument_gib"], state_gib)
  assert r["per_device_total_gib"] == pytest.approx(r["per_device_argument_gib"] + r["per_device_temp_gib"] + 2.0)
  assert r["fits"] and r["scan_blocks"] is True


def test_scaling_records_the_gpu_interconnect(monkeypatch):
  import subprocess

  from bench import scaling

  monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, stdout="GPU0 X NV18\n"))
  info = scaling.gpu_interconnect()
  assert info["nvidia_smi_topo"] == "GPU0 X NV18\n" and info["nccl_env"]["NCCL_P2P_DISABLE"] == "1"

  def missing(cmd, **kw):
    raise FileNotFoundError("nvidia-smi")

  monkeypatch.setattr(subprocess, "run", missing)
  assert scaling.gpu_interconnect()["nvidia_smi_topo"].startswith("unavailable")


def test_scaling_point_past_its_timeout_is_recorded_as_an_error():
  from bench import scaling

  args = argparse.Namespace(variant="himar_tiny", per_device_batch=2, steps=1, warmup=1, extra=[],
                            point_timeout=0.01)
  point = scaling.run_point(args, 1, "data", "cpu")
  assert point == {"devices": 1, "strategy": "data", "error": "timed out after --point_timeout=0.01 s"}


HLO_DUMP = """HloModule jit_step_fn

FileNames
1 "/work/main/himar_jax/nn/transformer.py"
2 "/site-packages/flax/nnx/nn/linear.py"

FunctionNames
1 "Block.__call__"
2 "Linear.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=170 end_line=170 column=1 end_column=9}
2 {file_name_id=2 function_name_id=2 line=431 end_line=431 column=6 end_column=57}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}

ENTRY %main {
  %input_add_reduce_fusion.37 = (bf16[256,2048]{1,0}) fusion(%p.1), kind=kInput, calls=%fused.1, metadata={op_name="jit(step_fn)/transpose(jvp())/reduce_sum" stack_frame_id=2}, backend_config={}
  %input_add_reduce_fusion.37.remat2 = (bf16[256,2048]{1,0}) fusion(%p.1), kind=kInput, calls=%fused.2, metadata={op_name="jit(step_fn)/other" stack_frame_id=1}
  %loop_convert_fusion = bf16[8]{0} fusion(%p.2), kind=kLoop, calls=%fused.3, metadata={op_name="jit(step_fn)/convert_element_type"}
}
"""


def test_trace_summary_names_where_a_fusion_kernel_comes_from():
  origins = trace_summary.fusion_origins(HLO_DUMP)
  assert origins["input_add_reduce_fusion_37"] == {
      "writes": "(bf16[256,2048]{1,0})", "op_name": "jit(step_fn)/transpose(jvp())/reduce_sum",
      "source": ["nn/linear.py:431 (Linear.__call__)", "nn/transformer.py:170 (Block.__call__)"]}
  assert origins["loop_convert_fusion"]["source"] == []
  summary = {"top_kernels": [{"name": "loop_convert_fusion"}, {"name": "nvjet_sm90_gemm"}]}
  trace_summary.annotate(summary, HLO_DUMP)
  assert summary["top_kernels"][0]["writes"] == "bf16[8]{0}" and "op_name" not in summary["top_kernels"][1]


def test_trace_summary_finds_the_dumped_program(tmp_path):
  (tmp_path / "module_0744.jit_step_fn.sm_9.0a_gpu_after_optimizations.txt").write_text(HLO_DUMP)
  (tmp_path / "module_0744.jit_step_fn.sm_9.0a_gpu_after_optimizations-buffer-assignment.txt").write_text("x")
  found = trace_summary.hlo_dump_of("jit_step_fn", f"--xla_foo --xla_dump_to={tmp_path}")
  assert found.endswith("gpu_after_optimizations.txt")
  assert trace_summary.hlo_dump_of("jit_step_fn", "--xla_foo") is None


def test_timeline_measures_idle_gaps_and_exposed_collectives(tmp_path):
  """Per device: span 0..1000 us, kernels cover 0..300 and 500..1000 (idle 200); the all-reduce 800..1100 overlaps
  compute for 200 of its 300 us. Two devices, the second identical but shifted, so the per-device averages equal
  one device's; two steps halve them."""
  meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
  kernel = lambda pid, tid, name, ts, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur,
                                            "args": {}}
  nccl = "ncclDevKernel_AllReduce_Sum_f32_RING_LL"
  events = [meta(1, "/device:GPU:0"), meta(2, "/device:GPU:1")]
  for pid, shift in ((1, 0.0), (2, 5000.0)):
    events += [kernel(pid, 1, "sm90_xmma_gemm", shift + 0, 200), kernel(pid, 1, "loop_add_fusion", shift + 100, 200),
               kernel(pid, 1, "input_reduce_fusion", shift + 500, 500), kernel(pid, 2, nccl, shift + 800, 300)]
  _write_trace(str(tmp_path), events)
  s = trace_summary.summarize(trace_summary.newest_trace(str(tmp_path)), steps=2)
  t = s["timeline_ms_per_step"]
  assert t["span"] == pytest.approx(1.1 / 2) and t["busy"] == pytest.approx(0.9 / 2)
  assert t["idle"] == pytest.approx(0.2 / 2)
  assert t["collective"] == pytest.approx(0.3 / 2) and t["collective_exposed"] == pytest.approx(0.1 / 2)


def test_xla_flag_sets_parse_and_reject_bad_text():
  from bench import xla_flags

  assert xla_flags.parse_sets("a=; b=--x=1 --y=2 ;") == [("a", ""), ("b", "--x=1 --y=2")]
  with pytest.raises(ValueError, match="name=flags"):
    xla_flags.parse_sets("--xla_gpu_enable_cublaslt=true")
  with pytest.raises(ValueError, match="unique names"):
    xla_flags.parse_sets("a=;a=--x=1")
  assert xla_flags.relative_difference([1.0, 2.0], [1.0, 4.0]) == 0.5


def test_xla_flag_sweep_times_each_set_in_its_own_process(tmp_path):
  # A tiny DiT head on the CPU: the baseline is timed and compared with itself; a flag XLA does not know stops
  # only its own process, and the sweep reports XLA's message for it.
  import subprocess
  import sys

  out = tmp_path / "sweep.json"
  env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  subprocess.run([sys.executable, "bench/xla_flags.py", "--workload=dit_sample", "--variant=himar_tiny",
                  "--passes=2", "--repeats=1", "--sets=base=;bogus=--xla_gpu_no_such_flag=1", f"--out={out}"],
                 env=env, check=True, capture_output=True, timeout=300)
  rows = json.loads(out.read_text())["rows"]
  assert [r["name"] for r in rows] == ["base", "bogus"]
  assert rows[0]["ms_per_pass"] > 0 and rows[0]["speedup"] == 1.0 and rows[0]["rel_diff_vs_first"] == 0.0
  assert "ms_per_pass" not in rows[1] and "xla_gpu_no_such_flag" in rows[1]["error"]
