#!/usr/bin/env bash
# One node, N processes (one per GPU; on CPU, gloo). Only rank 0's console output is shown
# (SHOW_RANKS=0,1 shows ranks 0 and 1); every rank's log is in the run folder as
# hooktrain_rank<N>.log.
#   NPROC=4 launch/torchrun.sh parallel=fsdp model=transformer
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
NPROC=${NPROC:-$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" --local-ranks-filter="${SHOW_RANKS:-0}" \
  -m trainer "parallel=${PARALLEL:-ddp}" "$@"
