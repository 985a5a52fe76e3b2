#!/usr/bin/env bash
# One node, N processes (one per GPU; on CPU, gloo). Only rank 0's console output is shown;
# every rank's log is in the run folder as hooktrain_rank<N>.log.
#   NPROC=4 launch/torchrun.sh parallel=fsdp model=transformer
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --standalone --nproc_per_node="$NPROC" --local-ranks-filter=0 \
  -m trainer "parallel=${PARALLEL:-ddp}" "$@"
