#!/usr/bin/env bash
# Create/refresh the project's virtual environment in .venv (idempotent, used by test.sh, demo.sh
# and .ci/run). Installs the CPU build of PyTorch pinned for these machines; cluster users install
# their own CUDA build of torch first and then `pip install -e .[train]` (the project's own range
# for torch is open).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
log=.venv/setup.log
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing PyTorch ${HEART_TORCH_VERSION:-2.13.0} (CPU build) into .venv"
  pip install -q "torch==${HEART_TORCH_VERSION:-2.13.0}" >"$log" 2>&1 || { cat "$log"; exit 1; }
fi
# the build backend's warnings go to the log; any failure prints it
pip install -q -e ".[train,test,fast,formats]" >"$log" 2>&1 || { cat "$log"; exit 1; }
