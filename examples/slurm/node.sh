#!/bin/bash
# One node's launcher, run once per node by train.sbatch's srun (and by the two-node test on 127.0.0.1).
# Needs SLURM_NNODES, SLURM_JOB_ID, HEAD_NODE and GPUS_PER_NODE; RDZV_PORT (29500) and MAX_RESTARTS (3)
# are optional. Arguments go to `largebatch train`.
set -euo pipefail
exec torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:${RDZV_PORT:-29500}" --rdzv-id "$SLURM_JOB_ID" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    -m largebatch train --resume auto "$@"
