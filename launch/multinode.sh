#!/usr/bin/env bash
# Many nodes: run this same command on every node (c10d rendezvous on the first node).
#   NNODES=2 NPROC=8 RDZV_HOST=node0.cluster RUN_ID=exp42 launch/multinode.sh parallel=fsdp_tp parallel.tp_degree=8
# --max-restarts: after a crash every rank restarts and `resume=auto` continues from the newest
# complete checkpoint; the run folder must be on a filesystem all nodes share.
set -euo pipefail
# Restarts (--max-restarts) must not reuse the dead workers' rendezvous store entries
# (pytorch/pytorch#135712): one store per attempt.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
cd "$(dirname "$0")/.."
source launch/env.sh
: "${NNODES:?set NNODES}" "${NPROC:?set NPROC (processes per node)}" "${RDZV_HOST:?set RDZV_HOST}"
RUN_ID=${RUN_ID:-hooktrain}
exec "$PY" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:${RDZV_PORT:-29500}" --rdzv_id="$RUN_ID" \
  --max-restarts="${MAX_RESTARTS:-3}" --local-ranks-filter=0 \
  -m trainer resume=auto "hydra.run.dir=${RUN_DIR:-outputs/$RUN_ID}" "$@"
