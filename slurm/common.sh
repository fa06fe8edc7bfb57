# Shared body of the sbatch scripts in slurm/ (sourced by them, not run directly).
#
# The calling script sets its defaults (CONFIG, LAUNCH_CONFIG, SMOKE_PROCS_PER_NODE) and its
# #SBATCH resources; everything below can also be set from outside, e.g.
#   sbatch --export=ALL,DATA_ROOT=/data/imagenet,RUN_DIR=runs/ran92-a slurm/ran92_8gpu.sh
#   DATA_ROOT         ImageNet root (train/ and val/ with class folders)      -> data.root
#   RUN_DIR           run directory; an existing one is resumed               (runs/<job name>-<job id>)
#   OVERRIDES         more config overrides, whitespace-separated key=value words (applied last;
#                     not glob-expanded, so data.test_sizes=[224,320] is safe)
#   MAX_REQUEUES      requeues (SLURM_RESTART_COUNT) after which the job stops requeueing itself (30)
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
# trainer resumes from the run directory's newest checkpoint. Each node's launcher records its
# exit status in RUN_DIR/launchers/<job id>-<attempt>/node<N>: the job requeues only when every
# node stopped at a checkpoint (75); when any node failed it ends with that node's exit status
# (srun alone would report the highest code over the nodes, the 75 of the nodes it stopped).

set -uo pipefail

REQUEUE_EXIT_CODE=75  # ran_bench.train.REQUEUE_EXIT_CODE

_log() { echo "[ran-bench $(date -u +%Y-%m-%dT%H:%M:%SZ) job ${SLURM_JOB_ID:-?} attempt $((${SLURM_RESTART_COUNT:-0} + 1))] $*"; }
_die() { _log "error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || _die "not inside a SLURM job: submit with sbatch (see the comments at the top of this script)"

# The repository: found by the calling script (sbatch runs a copy of it from its spool folder).
REPO=${REPO:-${RAN_BENCH_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}}
[ -f "$REPO/ran_bench/train.py" ] \
  || _die "$REPO is not a ran-bench checkout: submit from the repository root or set RAN_BENCH_REPO=/path/to/ran-bench"
cd "$REPO" || _die "cannot enter $REPO"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi

SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  CONFIG=configs/demo.yaml
  # A few small steps (the model of the demo config), checkpoints on the way, one loader worker
  # process per trainer (users run with workers, and SLURM signals them too).
  SCRIPT_OVERRIDES="optim.global_batch_size=16 optim.per_device_batch_size=8 schedule.reference_batch_size=16
    schedule.total_steps=8 schedule.warmup_steps=0 checkpoint.every_steps=2 log.every_steps=1 eval.batch_size=25
    data.num_threads=1"
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

# The overrides as a list: data.root is one word whatever its characters; the script's and the
# user's are whitespace-separated words, split without glob expansion.
overrides=("data.root=$DATA_ROOT")
# ${a[@]+"${a[@]}"}: an empty array is "unset" to `set -u` before bash 4.4 (RHEL/CentOS 7 has 4.2).
read -r -d '' -a _words <<< "${SCRIPT_OVERRIDES:-}"; overrides+=(${_words[@]+"${_words[@]}"})
read -r -d '' -a _words <<< "${OVERRIDES:-}"; overrides+=(${_words[@]+"${_words[@]}"})
MAX_REQUEUES=${MAX_REQUEUES:-30}
[[ "$MAX_REQUEUES" =~ ^[0-9]+$ ]] || _die "MAX_REQUEUES=$MAX_REQUEUES is not a whole number"
NUM_NODES=${SLURM_JOB_NUM_NODES:-1}
ATTEMPT=$((${SLURM_RESTART_COUNT:-0} + 1))
# Where each node's launcher records its exit status (RUN_DIR is on storage every node sees).
NODE_STATUS_DIR=$RUN_DIR/launchers/$SLURM_JOB_ID-$ATTEMPT
mkdir -p "$NODE_STATUS_DIR" || _die "cannot create $NODE_STATUS_DIR: RUN_DIR must be writable from every node"
rm -f "$NODE_STATUS_DIR"/node*  # left by an earlier cluster's job of the same id

# Read by slurm/launch_node.sh in each task of the step; the overrides one per line.
RAN_BENCH_OVERRIDES=$(printf '%s\n' "${overrides[@]}")
export PYTHON CONFIG LAUNCH_CONFIG RUN_DIR GPUS_PER_NODE NODE_STATUS_DIR RAN_BENCH_OVERRIDES
# The launcher (torchrun's agent inside accelerate launch) forwards SIGUSR1 to the trainers and
# gives them this long to write the checkpoint before it kills them.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-150}

printf -v shown_overrides '%q ' "${overrides[@]}"  # printf %q, not the @Q expansion (bash 4.4+)
_log "start: $NUM_NODES node(s) ${SLURM_JOB_NODELIST:-?} x $GPUS_PER_NODE process(es); config $CONFIG; run dir $RUN_DIR; overrides: ${shown_overrides% }$([ "$SMOKE" = 1 ] && echo " (CPU smoke test)")"
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

# --ntasks as well: the step would otherwise inherit the job's SLURM_NTASKS (e.g. from
# `sbatch --ntasks-per-node=8`) and start several launchers per node.
srun --kill-on-bad-exit=1 --nodes="$NUM_NODES" --ntasks="$NUM_NODES" --ntasks-per-node=1 \
  bash "$REPO/slurm/launch_node.sh" &
_step_pid=$!
# `wait` returns early when a trapped signal arrives; keep waiting until the step has ended.
while :; do
  wait "$_step_pid"; rc=$?
  kill -0 "$_step_pid" 2>/dev/null || break
done

# The decision comes from every node's own exit status: when one node fails, srun stops the
# others, whose trainers checkpoint and exit 75 -- a failure must not look like a requeue.
# Other nodes' records may take a moment to show on a network file system.
for ((_i = 0; _i < 10; _i++)); do
  _missing=0; for ((k = 0; k < NUM_NODES; k++)); do [ -s "$NODE_STATUS_DIR/node$k" ] || _missing=1; done
  [ "$_missing" = 0 ] && break; sleep 1
done
# A node that recorded a failure is the cause: when one node dies, the others' trainers can hang
# in a collective until srun kills them before they record anything, so a node without a record
# is only blamed when no node recorded a failure.
summary=() failed_node="" failed_rc="" unrecorded="" stopped=0
for ((k = 0; k < NUM_NODES; k++)); do
  node_rc="" node_name="?"
  { read -r node_rc node_name < "$NODE_STATUS_DIR/node$k"; } 2>/dev/null
  summary+=("node $k ($node_name): ${node_rc:-no exit status}")
  case "$node_rc" in
    0) ;;
    "$REQUEUE_EXIT_CODE") stopped=1 ;;
    "") unrecorded+=" $k" ;;
    *) if [ -z "$failed_node" ]; then failed_node="$k ($node_name)"; failed_rc=$node_rc; fi ;;
  esac
done
printf -v summary_text '%s; ' "${summary[@]}"
[ "$NUM_NODES" -gt 1 ] && _log "the job step ended (srun exit $rc): ${summary_text%; }"

if [ -n "$failed_node" ]; then
  _log "failed: node $failed_node exited with $failed_rc; see the messages above and $RUN_DIR/train.log"
  exit "$failed_rc"
elif [ -n "$unrecorded" ]; then  # killed before recording anything (SIGKILL, node failure)
  failed_rc=$rc; { [ "$failed_rc" = 0 ] || [ "$failed_rc" = "$REQUEUE_EXIT_CODE" ]; } && failed_rc=1
  _log "failed: node(s)$unrecorded recorded no exit status (killed, or the node failed); srun exited with $rc; see the messages above and $RUN_DIR/train.log"
  exit "$failed_rc"
elif [ "$stopped" = 0 ]; then
  _log "finished: $RUN_DIR/results.json"
  exit 0
elif [ "$_got_term" = 1 ]; then
  _log "the trainers checkpointed and stopped because SLURM is ending the job; if it is not requeued, resubmit with RUN_DIR=$RUN_DIR to resume"
  exit "$REQUEUE_EXIT_CODE"
elif [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
  _log "error: the trainers checkpointed and stopped, but job $SLURM_JOB_ID has been requeued ${SLURM_RESTART_COUNT:-0} times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing again; check the progress in $RUN_DIR/train.log, then resubmit with RUN_DIR=$RUN_DIR (and a higher MAX_REQUEUES) to continue"
  exit "$REQUEUE_EXIT_CODE"
else
  _log "the trainers checkpointed and stopped (exit $REQUEUE_EXIT_CODE on every node): requeueing job $SLURM_JOB_ID; it resumes from $RUN_DIR"
  trap '' TERM  # SLURM now ends this attempt; nothing more to report
  scontrol requeue "$SLURM_JOB_ID" || { _log "error: scontrol requeue $SLURM_JOB_ID failed; resubmit with RUN_DIR=$RUN_DIR to resume"; exit "$REQUEUE_EXIT_CODE"; }
  exit 0
fi
