"""Multi-process start-up: environment resolution, a clear time-out, and a real two-process CPU training run."""
import os
import socket
import subprocess
import sys

import pytest

from himar_jax.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_single_process_by_default():
  assert distributed.resolve(environ={}) is None
  assert distributed.resolve(environ={"SLURM_NTASKS": "1"}) is None


def test_resolve_explicit_flags_and_environment():
  env = {"HIMAR_COORDINATOR_ADDRESS": "10.0.0.1:1234", "HIMAR_NUM_PROCESSES": "4", "HIMAR_PROCESS_ID": "2"}
  assert distributed.resolve(environ=env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                              "process_id": 2}
  assert distributed.resolve("h:1", 2, 0, environ={}) == {"coordinator_address": "h:1", "num_processes": 2,
                                                          "process_id": 0}
  with pytest.raises(ValueError, match="missing.*HIMAR_PROCESS_ID"):
    distributed.resolve("h:1", 2, None, environ={})
  with pytest.raises(ValueError, match="process id 5 must lie in"):
    distributed.resolve("h:1", 2, 5, environ={})


def test_resolve_detects_slurm_and_tpu_pods():
  assert distributed.resolve(environ={"SLURM_NTASKS": "16"}) == {"cluster": "SLURM"}
  assert distributed.resolve(environ={"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == {"cluster": "TPU pod"}
  assert distributed.resolve(environ={"TPU_WORKER_HOSTNAMES": "a"}) is None
  assert distributed.resolve(environ={"HIMAR_DISTRIBUTED": "auto"}) == {"cluster": "auto-detected cluster"}


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_unreachable_coordinator_times_out_naming_the_address():
  port = _free_port()
  code = ("from himar_jax.parallel import distributed\n"
          f"distributed.initialize('localhost:{port}', 2, 1, timeout_s=5)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert f"could not join the multi-process job through localhost:{port} within 5 s" in out.stderr


@pytest.mark.parametrize("gradients", ["spmd", "per_device"])
def test_two_processes_train_and_checkpoint(fake_fashion_mnist, tmp_path, gradients):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", XLA_FLAGS="")
  procs, logs = [], []
  for pid in range(2):
    cmd = [sys.executable, "-m", "himar_jax", "train", "--config=configs/quickstart.py:tiny",
           f"--config.data.path={fake_fashion_mnist}", "--config.train.num_steps=3",
           "--config.train.checkpoint_every=3", "--config.train.log_every=1", f"--workdir={tmp_path}",
           f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={pid}",
           f"--config.mesh.gradients={gradients}"]
    # Output to files, not pipes: a full pipe would block one process inside a collective the other waits on.
    logs.append(open(tmp_path / f"process_{pid}.log", "w+"))
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
  outs = []
  for p, log in zip(procs, logs):
    p.wait(timeout=600)
    log.seek(0)
    outs.append(log.read())
    log.close()
    assert p.returncode == 0, outs[-1][-3000:]
  assert "process 0 of 2 joined" in outs[0] and "8 global devices" in outs[0]
  assert "train/loss=" in outs[0] and "train/loss=" not in outs[1]  # only process 0 logs metrics
  step_dir = tmp_path / "checkpoints" / "3"
  assert (step_dir / "state").is_dir()
  data_files = sorted(os.listdir(step_dir / "data"))
  assert len([f for f in data_files if "process" in f]) == 2, data_files  # one grain state per process
