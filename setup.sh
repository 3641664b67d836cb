#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine: the Fashion-MNIST dataset package and a virtual environment (.venv) with
# the requirements and this package (editable). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist python3-venv >/dev/null
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "ready: .venv/bin/python -m himar_jax quickstart --workdir=runs/quickstart"
