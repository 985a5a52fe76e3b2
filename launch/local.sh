#!/usr/bin/env bash
# Single-process run (CPU debug run, or one GPU). Any Hydra override passes through:
#   launch/local.sh experiment=mnist1d_cnn max_epochs=3
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
exec "$PY" -m trainer "$@"
