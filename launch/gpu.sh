#!/usr/bin/env bash
# One node, all its GPUs, one process: JAX drives every local GPU from a single process, so data/FSDP/tensor
# sharding comes from the config's mesh (--config.mesh.shape), not from the launcher.
#   launch/gpu.sh train --config=configs/quickstart.py --workdir=runs/fmnist [--config.<field>=<value> ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# Let XLA take most of the GPU memory up front and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export PYTHONUNBUFFERED=1
exec "$PY" -m himar_jax "$@"
