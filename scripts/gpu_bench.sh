#!/usr/bin/env bash
# GPU benchmark rows in one call (at most about 9 minutes on one H100): the Table 7 models'
# training step in bf16 with channels_last, the overhead check, torch.compile, the input pipeline
# (DALI GPU decoding of generated JPEGs) and the end-to-end rate with it; then inference, the
# torchvision loader and a second compiled model while the budget lasts. Every measurement
# appends a row to OUT_DIR/results.csv and regenerates OUT_DIR/README.md; the log of everything is
# OUT_DIR/log.txt. Measured on an H100: the required rows (steps 1-3) take about 8 minutes.
#
#   bash scripts/gpu_bench.sh OUT_DIR
#
# Needs: a CUDA GPU, a Python with torch, torchvision, timm, accelerate, omegaconf and pyyaml (and
# nvidia-dali-cuda120/130 for the DALI rows; without it they are skipped and said so). ran-bench
# is used from this checkout (PYTHONPATH), so no install is needed. No network is used.
# Environment: PYTHON (default python3); JPEG_DIR (where the JPEGs are generated, default
# /tmp/ran_bench_gpu_jpegs); BUDGET_S (default 500: the optional rows of step 4 are skipped when
# they would end after that many seconds); BATCH (images per step, default 128);
# RAN_BENCH_GIT_COMMIT: the commit every row records when this checkout is a copy without .git.
# Copying the checkout without its .git? Compute the commit on the development machine first and
# pass it, or the rows say "not recorded":
#   RAN_BENCH_GIT_COMMIT=$(python -c 'from ran_bench.fileio import git_commit; print(git_commit())')
#   ... then on the GPU machine: RAN_BENCH_GIT_COMMIT=<that> bash scripts/gpu_bench.sh OUT_DIR
# Afterwards, on the development machine:
#   ran-bench bench readme --add OUT_DIR/results.csv    # adds the rows to reports/bench/ and its README
set -uo pipefail

OUT=${1:?usage: bash scripts/gpu_bench.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-500}
BATCH=${BATCH:-128}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
FAILED=()

say() { echo "== $*" | tee -a "$LOG"; }

# run SECONDS ARGS...: one `ran-bench bench` measurement, killed after SECONDS; a failure is
# logged and the next measurement still runs.
run() {
  local limit=$1; shift
  say "ran-bench bench $* (limit ${limit}s, ${SECONDS}s elapsed)"
  timeout "$limit" "$PY" -m ran_bench bench "$@" --out-dir "$OUT" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    say "FAILED (exit $rc): ran-bench bench $*"
    FAILED+=("$*")
  fi
}

# time_left SECONDS: true while an optional step of about SECONDS still fits the budget.
time_left() { [ $((SECONDS + $1)) -le "$BUDGET_S" ]; }

COMMIT=$("$PY" -c 'from ran_bench.fileio import git_commit; print(git_commit())' 2>/dev/null || echo unknown)
if [ "$COMMIT" = unknown ]; then
  say "WARNING: no git history here and RAN_BENCH_GIT_COMMIT is not set: the rows will not record the commit."
  say "  On the development machine: python -c 'from ran_bench.fileio import git_commit; print(git_commit())'"
  say "  then rerun with RAN_BENCH_GIT_COMMIT=<that> bash scripts/gpu_bench.sh $OUT"
else
  say "ran-bench commit: $COMMIT"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"
if ! "$PY" -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, 'CUDA', \
torch.version.cuda, 'GPU', torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"; then
  say "no CUDA device visible to $PY: this script records GPU rows only"; exit 1
fi
GPU_OPTS=(--precision bf16 --channels-last --batch-size "$BATCH" --steps 20 --warmup 10 --repeats 3)

# The JPEGs for the loader rows are generated on one CPU core while the GPU rows run.
DATA=${JPEG_DIR:-${TMPDIR:-/tmp}/ran_bench_gpu_jpegs}
if [ ! -d "$DATA/train" ]; then
  say "generating JPEGs (375-500 px sides, like ImageNet's) in $DATA in the background"
  "$PY" -m ran_bench data make-demo "$DATA" --classes 10 --train-per-class 128 --val-per-class 1 \
    --min-side 375 --max-side 500 >>"$LOG" 2>&1 &
  JPEGS_PID=$!
fi

# 1. The training step of every Table 7 model at its registered input size (224; 320 for ResNet-200;
#    299 for the Inception family). Attention-56's run also measures the overhead of the trainer's
#    step against a bare PyTorch loop and timm's benchmark recipe (its model-only row is the same).
run 150 train --model attention56 "${GPU_OPTS[@]}" --overhead
for model in attention92 attentionnext56 attention_inception56 resnet152 resnext101_32x4d resnet200 \
             inception_resnet_v1 inception_resnet_v2; do
  run 120 train --model "$model" "${GPU_OPTS[@]}"
done

# 2. torch.compile of Attention-56 (compiling takes about two minutes, outside the timed steps).
run 240 train --model attention56 "${GPU_OPTS[@]}" --compile

# 3. The input pipeline alone, then the model-only and end-to-end rates in one run (which limits?).
if [ -n "${JPEGS_PID:-}" ]; then wait "$JPEGS_PID" || say "FAILED: generating JPEGs in $DATA"; fi
if "$PY" -c "import nvidia.dali" 2>/dev/null; then
  LOADER=dali
  run 120 data --backend dali --data-root "$DATA" --size 224 --batch-size "$BATCH" --steps 20 --warmup 10 --repeats 3
else
  LOADER=torchvision
  say "NVIDIA DALI is not installed in $PY: no DALI rows (pip install nvidia-dali-cuda120 or -cuda130)"
fi
run 150 train --model attention56 "${GPU_OPTS[@]}" --data-root "$DATA" --backend "$LOADER"

# 4. Optional rows, each only when it fits the budget.
optional() {  # optional SECONDS ARGS...: `run` when about SECONDS still fit in BUDGET_S
  local need=$1; shift
  if time_left "$need"; then run "$need" "$@"; else say "skipped (budget ${BUDGET_S}s): bench $*"; fi
}
INFER_OPTS=(--precision bf16 --channels-last --batch-size 256 --steps 20 --warmup 10 --repeats 3)
optional 60 infer --model attention56 "${INFER_OPTS[@]}"
[ "$LOADER" = dali ] && optional 60 data --backend torchvision --data-root "$DATA" --size 224 --batch-size "$BATCH" \
  --steps 20 --warmup 10 --repeats 3
optional 60 infer --model attention92 "${INFER_OPTS[@]}"
optional 240 train --model attention92 "${GPU_OPTS[@]}" --compile

say "done in ${SECONDS}s; rows in $OUT/results.csv, tables in $OUT/README.md"
if [ ${#FAILED[@]} -gt 0 ]; then
  say "${#FAILED[@]} measurement(s) failed:"; printf '   %s\n' "${FAILED[@]}" | tee -a "$LOG"
  exit 1
fi
