#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, DDP across all GPUs.
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sh --config configs/viton_hd.yaml data.root=...
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
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file launch/multi_node.yaml \
  --num_machines $SLURM_NNODES \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_HOST --main_process_port 29500 \
  train.py train.resume=latest $*"
