#!/usr/bin/env bash
# The main job on the embedded demo data, end to end, on whatever this machine has (2 CPU cores
# are enough): set up .venv, generate the demo data set, train the demo config with 2 processes,
# evaluate the result, and write reports/demo.md with its plots.
#   bash scripts/demo.sh [key=value ...]      (config overrides, e.g. schedule.total_steps=40)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
NPROC=${NPROC:-2}
RUN_DIR=${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}
start=$(date +%s)

if [ ! -d data/demo/train ]; then
  ran-bench data make-demo data/demo
fi
# CPU only: threads per process so that NPROC processes share the cores instead of oversubscribing
# them (torchrun would give each 1 thread). The check exits 1 when there is no CUDA device.
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
torchrun --standalone --nproc_per_node "$NPROC" -m ran_bench train --config configs/demo.yaml --run-dir "$RUN_DIR" "$@"
torchrun --standalone --nproc_per_node "$NPROC" -m ran_bench eval "$RUN_DIR"
ran-bench report "$RUN_DIR" -o reports/demo.md

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "results: $RUN_DIR/results.json"
echo "report:  reports/demo.md"
