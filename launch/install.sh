#!/usr/bin/env bash
# Install hooktrain into ./.venv (or the active virtual environment).
#   bash launch/install.sh        # runtime only
#   bash launch/install.sh dev    # plus pytest and ruff
# Where no torch is installed yet, the CPU build goes in first so that pip does not pull a
# multi-GB CUDA build; install a CUDA build of torch yourself beforehand to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY=python
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  # PyTorch's CPU index as an extra index: for the same version its `+cpu` build ranks above
  # PyPI's CUDA build, and torch's own dependencies still come from PyPI.
  "$PY" -m pip install -q "torch==${HOOKTRAIN_TORCH_VERSION:-2.13.0}" \
    --extra-index-url "${HOOKTRAIN_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
extra=${1:+[$1]}
"$PY" -m pip install -q -e ".${extra}"
