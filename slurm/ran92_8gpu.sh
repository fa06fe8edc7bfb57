#!/bin/bash
# Attention-92 on ImageNet, one node with 8 GPUs. Submit from the repository root (or give the
# script's full path from anywhere):
#   sbatch --export=ALL,DATA_ROOT=/data/imagenet slurm/ran92_8gpu.sh
# Settings (environment or --export): DATA_ROOT, RUN_DIR (default runs/<job name>-<job id>;
# give an existing run directory to continue it), OVERRIDES ("key=value ..." config overrides),
# GPUS_PER_NODE; see slurm/common.sh. Before the time limit the job checkpoints and requeues
# itself; the requeued job resumes from RUN_DIR. Log: ran92-<job id>.out in the submission folder.
# CPU smoke test (demo data, 2 processes, gloo):
#   SMOKE=1 sbatch --gres=none --wait slurm/ran92_8gpu.sh
#SBATCH --job-name=ran92
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

CONFIG=${CONFIG:-configs/attention92.yaml}
LAUNCH_CONFIG=${LAUNCH_CONFIG:-launch/1node_8gpu.yaml}
SMOKE_PROCS_PER_NODE=${SMOKE_PROCS_PER_NODE:-2}
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
