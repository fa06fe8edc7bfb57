# Shared body of the sbatch scripts in slurm/ (sourced by them, not run directly).
#
# The calling script sets its defaults (CONFIG, LAUNCH_CONFIG, SMOKE_PROCS_PER_NODE) and its
# #SBATCH resources; everything below can also be set from outside, e.g.
#   sbatch --export=ALL,DATA_ROOT=/data/imagenet,RUN_DIR=runs/ran92-a slurm/ran92_8gpu.sh
#   DATA_ROOT         ImageNet root (train/ and val/ with class folders)      -> data.root
#   RUN_DIR           run directory; an existing one is resumed               (runs/<job name>-<job id>)
#   OVERRIDES         more config overrides, space-separated key=value words (applied last)
#   GPUS_PER_NODE     processes per node                                      (SLURM_GPUS_ON_NODE)
#   SMOKE=1           CPU smoke test: configs/demo.yaml on the demo data set (made in DATA_ROOT,
#                     default data/demo, when missing), SMOKE_PROCS_PER_NODE CPU processes per
#                     node, gloo, 8 steps of 16 images; submit it without GPUs: sbatch --gres=none ...
#
# Flow: one task per node runs slurm/launch_node.sh, which starts `accelerate launch` with this
# node's machine rank and the main node's address and port (python -m ran_bench.slurm_env);
# accelerate starts one trainer process per GPU. The pre-timeout signal (--signal=B:USR1@180)
# reaches this shell, which forwards it to the job step; every trainer finishes its step, the
# ranks write one checkpoint, the trainers exit 75 and this script requeues the job
# (`scontrol requeue`). The requeued job has the same job id, so the same RUN_DIR, and the
# trainer resumes from the run directory's newest checkpoint.

set -uo pipefail

REQUEUE_EXIT_CODE=75  # ran_bench.train.REQUEUE_EXIT_CODE

_log() { echo "[ran-bench $(date -u +%Y-%m-%dT%H:%M:%SZ) job ${SLURM_JOB_ID:-?} attempt $((${SLURM_RESTART_COUNT:-0} + 1))] $*"; }
_die() { _log "error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || _die "not inside a SLURM job: submit with sbatch (see the comments at the top of this script)"

# The repository: sbatch runs a copy of the script from its spool folder, so it is found from the
# submission directory (or RAN_BENCH_REPO).
REPO=${RAN_BENCH_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$REPO/ran_bench/train.py" ] \
  || _die "$REPO is not a ran-bench checkout: submit from the repository root or set RAN_BENCH_REPO=/path/to/ran-bench"
cd "$REPO" || _die "cannot enter $REPO"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi

SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  CONFIG=configs/demo.yaml
  # A few small steps (the model of the demo config), checkpoints on the way, in-process loading.
  SCRIPT_OVERRIDES="optim.global_batch_size=16 optim.per_device_batch_size=8 schedule.reference_batch_size=16
    schedule.total_steps=8 schedule.warmup_steps=0 checkpoint.every_steps=2 log.every_steps=1 eval.batch_size=25
    data.num_threads=0"
  DATA_ROOT=${DATA_ROOT:-$REPO/data/demo}
  GPUS_PER_NODE=${SMOKE_PROCS_PER_NODE:-2}
  export CUDA_VISIBLE_DEVICES=""  # CPU, gloo, even on a GPU node
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  if [ ! -d "$DATA_ROOT/train" ]; then
    _log "making the demo data set in $DATA_ROOT"
    "$PYTHON" -m ran_bench data make-demo "$DATA_ROOT" || _die "ran-bench data make-demo $DATA_ROOT failed"
  fi
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
[ -n "$GPUS_PER_NODE" ] \
  || _die "no GPUs allocated (SLURM_GPUS_ON_NODE is unset): request them with --gres=gpu:N, set GPUS_PER_NODE, or run a CPU smoke test with SMOKE=1"
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-ran-bench}-$SLURM_JOB_ID}
[ -n "${DATA_ROOT:-}" ] || _die "DATA_ROOT is not set: sbatch --export=ALL,DATA_ROOT=/path/to/imagenet slurm/<script>.sh"
[ -f "$CONFIG" ] || _die "config $CONFIG not found in $REPO"

# Read by slurm/launch_node.sh in each task of the step.
export PYTHON CONFIG LAUNCH_CONFIG RUN_DIR GPUS_PER_NODE
RAN_BENCH_OVERRIDES=$(echo "data.root=$DATA_ROOT ${SCRIPT_OVERRIDES:-} ${OVERRIDES:-}" | tr -s ' \n' '  ')
export RAN_BENCH_OVERRIDES
# The launcher (torchrun's agent inside accelerate launch) forwards SIGUSR1 to the trainers and
# gives them this long to write the checkpoint before it kills them.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-150}

_log "start: ${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-?} x $GPUS_PER_NODE process(es); config $CONFIG; run dir $RUN_DIR; overrides: $RAN_BENCH_OVERRIDES$([ "$SMOKE" = 1 ] && echo " (CPU smoke test)")"
if [ -d "$RUN_DIR/checkpoints" ] && [ -n "$(ls -A "$RUN_DIR/checkpoints" 2>/dev/null)" ]; then
  _log "resuming from $RUN_DIR/checkpoints (newest: $(ls "$RUN_DIR/checkpoints" | sort | tail -n 1))"
fi

# Signals. SIGUSR1 is the pre-timeout warning (--signal=B:USR1@...), sent to this shell only:
# forward it to the job step (srun passes it to every process of the step) and requeue once the
# trainers have checkpointed. SIGTERM means SLURM itself is ending the job (scancel, preemption,
# scontrol requeue) and signals every process of the step too: the trainers checkpoint on it, and
# whether the job comes back is SLURM's decision, so this script does not requeue it.
_got_term=0
_on_usr1() {
  _log "received SIGUSR1 (time limit near): asking every trainer to finish its step, checkpoint and stop"
  [ -n "${_step_pid:-}" ] && kill -USR1 "$_step_pid" 2>/dev/null
}
_on_term() { _got_term=1; _log "received SIGTERM: SLURM is ending the job; the trainers checkpoint and stop"; }
trap _on_usr1 USR1
trap _on_term TERM

srun --kill-on-bad-exit=1 --ntasks-per-node=1 --nodes="${SLURM_JOB_NUM_NODES:-1}" \
  bash "$REPO/slurm/launch_node.sh" &
_step_pid=$!
# `wait` returns early when a trapped signal arrives; keep waiting until the step has ended.
while :; do
  wait "$_step_pid"; rc=$?
  kill -0 "$_step_pid" 2>/dev/null || break
done

if [ "$rc" = 0 ]; then
  _log "finished: $RUN_DIR/results.json"
  exit 0
elif [ "$rc" = "$REQUEUE_EXIT_CODE" ] && [ "$_got_term" = 0 ]; then
  _log "the trainers checkpointed and stopped (exit $rc): requeueing job $SLURM_JOB_ID; it resumes from $RUN_DIR"
  trap '' TERM  # SLURM now ends this attempt; nothing more to report
  scontrol requeue "$SLURM_JOB_ID" || { _log "error: scontrol requeue $SLURM_JOB_ID failed; resubmit with RUN_DIR=$RUN_DIR to resume"; exit "$rc"; }
  exit 0
elif [ "$rc" = "$REQUEUE_EXIT_CODE" ]; then
  _log "the trainers checkpointed and stopped (exit $rc) because SLURM is ending the job; if it is not requeued, resubmit with RUN_DIR=$RUN_DIR to resume"
  exit "$rc"
else
  _log "failed: the job step exited with $rc; see the messages above and $RUN_DIR/train.log"
  exit "$rc"
fi
