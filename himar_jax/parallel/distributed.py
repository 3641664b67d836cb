"""Multi-host start-up: join every process of a job through `jax.distributed.initialize`, driven by the
environment, before anything touches a device.

Sources, in order:
1. explicit: flags or HIMAR_COORDINATOR_ADDRESS / HIMAR_NUM_PROCESSES / HIMAR_PROCESS_ID (any cluster, or
   several local processes on one CPU machine);
2. SLURM (SLURM_NTASKS > 1), Cloud TPU pods (TPU_WORKER_HOSTNAMES with more than one host) or
   HIMAR_DISTRIBUTED=auto (what launch/tpu_pod.sh sets): JAX's own cluster detection fills in coordinator, count
   and id;
3. otherwise a single process: nothing to do.
"""
from __future__ import annotations

import logging
import os
import socket
import time

import jax

log = logging.getLogger(__name__)

_ENV_ADDRESS, _ENV_COUNT, _ENV_ID = "HIMAR_COORDINATOR_ADDRESS", "HIMAR_NUM_PROCESSES", "HIMAR_PROCESS_ID"


def _cluster_detected(environ) -> str | None:
  if environ.get("HIMAR_DISTRIBUTED", "").lower() == "auto":
    return "auto-detected cluster"
  if int(environ.get("SLURM_NTASKS", "1")) > 1 or int(environ.get("SLURM_NPROCS", "1")) > 1:
    return "SLURM"
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  if hosts and len(hosts.split(",")) > 1:
    return "TPU pod"
  return None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ=None) -> dict | None:
  """The arguments for jax.distributed.initialize, or None for a single-process run."""
  environ = os.environ if environ is None else environ
  address = coordinator_address or environ.get(_ENV_ADDRESS)
  count = num_processes if num_processes is not None else environ.get(_ENV_COUNT)
  pid = process_id if process_id is not None else environ.get(_ENV_ID)
  if address or count is not None or pid is not None:
    missing = [n for n, v in ((_ENV_ADDRESS, address), (_ENV_COUNT, count), (_ENV_ID, pid)) if v in (None, "")]
    if missing:
      raise ValueError(f"explicit multi-process start needs coordinator address, process count and process id; "
                       f"missing {missing} (flags --coordinator_address/--num_processes/--process_id or the "
                       "environment variables of the same meaning).")
    count, pid = int(count), int(pid)
    if count < 1 or not 0 <= pid < count:
      raise ValueError(f"process id {pid} must lie in [0, {count}) and the process count must be >= 1.")
    if count == 1:
      return None
    return {"coordinator_address": address, "num_processes": count, "process_id": pid}
  cluster = _cluster_detected(environ)
  return {"cluster": cluster} if cluster else None


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Workers check that the coordinator's port accepts connections first: JAX's client aborts the whole process
  (a C++ fatal error, no Python exception) when it cannot register, which would hide the address at fault."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"coordinator address {address!r} must be host:port, e.g. 10.0.0.1:1234.")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, max(timeout_s, 0.1))):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(f"could not join the multi-process job through {address} within {timeout_s:g} s "
                           f"({e}); check that process 0 runs and listens there, that the address is reachable "
                           "from every host, and the process count / ids.") from e
      time.sleep(0.5)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> bool:
  """Joins the job's processes; returns True if this is a multi-process run. Call before any device use."""
  args = resolve(coordinator_address, num_processes, process_id)
  if args is None:
    return False
  # CPU processes exchange collectives through gloo (GPU uses NCCL, TPU its ICI); harmless elsewhere.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  cluster = args.pop("cluster", None)
  where = args.get("coordinator_address", f"the {cluster} coordinator")
  if args.get("process_id", 0) != 0:
    wait_for_coordinator(args["coordinator_address"], timeout_s)
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **args)
  except Exception as e:  # noqa: BLE001  (JAX raises several types; all mean the job could not be joined)
    raise RuntimeError(f"could not join the multi-process job through {where} within {timeout_s} s "
                       f"({type(e).__name__}: {e}); check that the coordinator address is reachable from every "
                       "host, that all processes were started, and the process count / ids.") from e
  log.info("process %d of %d joined through %s; %d local / %d global devices", jax.process_index(),
           jax.process_count(), where, jax.local_device_count(), jax.device_count())
  return True
