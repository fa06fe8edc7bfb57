#!/bin/bash
# Attention-92 on ImageNet, 4 nodes x 8 GPUs (32 processes). Submit from the repository root (or
# give the script's full path from anywhere):
#   sbatch --export=ALL,DATA_ROOT=/data/imagenet slurm/ran92_4x8gpu.sh
# Another node count: sbatch --nodes=2 ... (the global batch is the config's, kept by gradient
# accumulation). One `accelerate launch` per node gets its machine rank, the main node's address
# and a port from SLURM's environment (python -m ran_bench.slurm_env).
# Settings (environment or --export): DATA_ROOT, RUN_DIR (default runs/<job name>-<job id>;
# give an existing run directory to continue it), OVERRIDES ("key=value ..." config overrides),
# GPUS_PER_NODE; see slurm/common.sh. Before the time limit the job checkpoints and requeues
# itself; the requeued job resumes from RUN_DIR. Log: ran92x4-<job id>.out in the submission folder.
# CPU smoke test on 2 nodes (demo data, 1 process per node, gloo):
#   SMOKE=1 sbatch --nodes=2 --gres=none --wait slurm/ran92_4x8gpu.sh
#SBATCH --job-name=ran92x4
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

CONFIG=${CONFIG:-configs/attention92.yaml}
LAUNCH_CONFIG=${LAUNCH_CONFIG:-launch/multinode.yaml}
# 32 GPUs x 32 images: global batch 1024, learning rate 0.4 and the schedule rescaled by the config's
# linear-scaling rule (configs/attention92.yaml is the paper's 256 on 8 GPUs).
SCRIPT_OVERRIDES=${SCRIPT_OVERRIDES:-optim.global_batch_size=1024}
SMOKE_PROCS_PER_NODE=${SMOKE_PROCS_PER_NODE:-1}
# The repository: RAN_BENCH_REPO, else the submission folder, else the folder of the script that
# was submitted (sbatch runs a copy of it from its spool folder, so $0 does not say).
REPO=${RAN_BENCH_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$REPO/slurm/common.sh" ] && [ -z "${RAN_BENCH_REPO:-}" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  # SLURM's record names the script as it was given to sbatch: relative to the submission folder
  # for `sbatch ../ran-bench/slurm/x.sh` or `cd slurm; sbatch x.sh`.
  _command=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's|^ *Command=||p' | head -n 1)
  case "$_command" in /*) ;; ?*) _command=${SLURM_SUBMIT_DIR:-$PWD}/$_command ;; esac
  REPO=$(printf '%s\n' "$_command" | sed -n 's|^\(/.*\)/slurm/[^/]*$|\1|p')
  [ -n "$REPO" ] && REPO=$(CDPATH= cd "$REPO" 2>/dev/null && pwd)
fi
if [ ! -f "$REPO/slurm/common.sh" ]; then
  echo "error: cannot find the ran-bench repository (no slurm/common.sh in '${RAN_BENCH_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}'):" \
    "submit from the repository root (cd /path/to/ran-bench; sbatch slurm/<script>.sh) or set RAN_BENCH_REPO=/path/to/ran-bench" >&2
  exit 2
fi
source "$REPO/slurm/common.sh"
