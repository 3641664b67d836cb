#!/usr/bin/env bash
# Runs the same install + train command on every worker of a Cloud TPU VM pod (one process per host; JAX joins
# them through the pod metadata). The workdir must be shared by all workers, e.g. a gs:// bucket.
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh --config=configs/quickstart.py --workdir=gs://bucket/runs/x
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM pod name}"
: "${ZONE:?set ZONE to the pod zone}"
REPO_URL=${REPO_URL:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}
: "${REPO_URL:?set REPO_URL to a git URL every worker can clone}"
BRANCH=${BRANCH:-main}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
set -e
if [ ! -d himar_jax ]; then git clone -q --branch $BRANCH $REPO_URL himar_jax; fi
cd himar_jax && git fetch -q origin $BRANCH && git checkout -q origin/$BRANCH
bash setup.sh && .venv/bin/python -m pip install -q -U 'jax[tpu]'
HIMAR_DISTRIBUTED=auto PYTHONUNBUFFERED=1 .venv/bin/python -m himar_jax train$ARGS
"
