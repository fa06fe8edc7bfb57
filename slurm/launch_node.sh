#!/bin/bash
# One task per node of a job started by slurm/common.sh (through srun): start `accelerate launch`
# with this node's machine rank and the main node's address and port, which
# `python -m ran_bench.slurm_env` derives from SLURM's environment (node list, node id, job id).
# Records this node's exit status in $NODE_STATUS_DIR/node$SLURM_NODEID ("<status> <node name>"),
# from which common.sh decides between requeue and failure. The status is 75 (REQUEUE_EXIT_CODE)
# when the trainers stopped on a signal after a checkpoint, even though the launcher itself
# reports the signal as a failure (torchrun's agent raises on a signal it handles).
set -uo pipefail
trap 'echo "$? ${SLURMD_NODENAME:-$(hostname)}" > "$NODE_STATUS_DIR/node${SLURM_NODEID:-0}"' EXIT
vars=$("$PYTHON" -m ran_bench.slurm_env) || exit 1
eval "$vars"
echo "[ran-bench node $NODE_RANK/$NUM_NODES ${SLURMD_NODENAME:-?}] main $MAIN_ADDR:$MAIN_PORT, $GPUS_PER_NODE process(es) here"

# SLURM delivers a signal to every process of the step (this shell, the launcher and the
# trainers), so it is only noted here, not forwarded: a second signal would cut short the
# launcher's wait for the trainers' checkpoint.
signalled=0
trap 'signalled=1' USR1 TERM

mapfile -t overrides <<< "$RAN_BENCH_OVERRIDES"  # one per line (common.sh), no splitting or globbing
"$PYTHON" -m accelerate.commands.launch --config_file "$LAUNCH_CONFIG" \
  --num_machines "$NUM_NODES" --machine_rank "$NODE_RANK" --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
  --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
  -m ran_bench train --config "$CONFIG" --run-dir "$RUN_DIR" "${overrides[@]}" &
pid=$!
while :; do
  wait "$pid"; rc=$?
  kill -0 "$pid" 2>/dev/null || break
done
if [ "$rc" != 0 ] && [ "$signalled" = 1 ]; then rc=75; fi
exit "$rc"
