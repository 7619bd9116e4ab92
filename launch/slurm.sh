#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, DDP across all GPUs.
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sh --config configs/viton_hd.yaml data.root=...
# Every argument goes to train.py unchanged (in any order; values with spaces survive), after
# `train.resume=latest` (so a later train.resume=... of yours wins).
# Preemption: SLURM sends SIGTERM (with --signal); the trainer saves a checkpoint and exits,
# and `--requeue` resubmits the job, which resumes from the latest checkpoint.
#SBATCH --job-name=i2am-tryon
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
: "${SLURM_NNODES:?is not set: submit this script with sbatch (see its first lines)}"
: "${SLURM_JOB_NODELIST:?is not set: submit this script with sbatch (see its first lines)}"
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
# sed reads every line (head would close the pipe early: SIGPIPE under pipefail with many nodes)
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
# One task per node. The user's arguments travel as positional parameters ("$@"), never
# re-split by a shell; $SLURM_NODEID is read on each node (single quotes).
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch \
  --config_file launch/multi_node.yaml \
  --num_machines "$1" \
  --num_processes "$2" \
  --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$3" --main_process_port 29500 \
  train.py train.resume=latest "${@:4}"' \
  slurm-node "$SLURM_NNODES" "$((SLURM_NNODES * GPUS_PER_NODE))" "$MAIN_HOST" "$@"
