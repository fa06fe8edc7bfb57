#!/usr/bin/env bash
# The prepared device run (issue 13): in one call of about 8 minutes on one GPU, with DALI's GPU
# (`mixed`) decoding, on generated ImageNet-sized JPEGs (375-500 px sides):
#   1. a real `ran-bench train` of Attention-56 (configs/attention56.yaml, short schedule), SIGTERMed
#      to its process group mid-run as SLURM does: it must exit 75 with a checkpoint after step N > 0;
#   2. the same command resumes from step N and finishes (exit 0, results.json at the last step);
#   3. `ran-bench eval` of the run counts every validation image exactly once;
#   4. `ran-bench bench` rows: the DALI loader alone, Attention-56 model-only vs end-to-end with DALI,
#      Attention-92 and Attention-56 eager and compiled, each train row with % of the unfused roofline.
# Every step is checked (exit codes, step numbers, counts, row contents); the first failure stops
# the script with `FAILED: ...` and exit 1. Nothing is skipped.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      # OUT_DIR: default $OUT (the device tool's folder)
#
# Python packages the device lacks (DALI for CUDA 13, OmegaConf, ...) are installed first from the
# chunks scripts/wheels.py carried there (`python3 scripts/wheels.py install`), unless importable.
# Environment: PYTHON (default python3); GPU_CHECK_CPU=1 rehearses the whole run on the CPU at tiny
# sizes with DALI's CPU decoder (automatic when no CUDA device is visible; the compiled rows then
# run with torch.compile disabled, as compiling these networks takes minutes on 2 cores: set
# TORCH_COMPILE_OVERRIDE_BACKENDS='>=0:aot_eager' to trace them for real);
# GPU_CHECK_WORK (default /tmp/ran_bench_gpu_check: data, run and bench files, emptied first);
# RAN_BENCH_GIT_COMMIT (the commit the rows record when the checkout travels without .git).
# OUT_DIR gets at most 8 files (what the device tool brings back): gpu_check.log, summary.txt,
# results.csv and bench.md (the bench rows), and the run's train.log, metrics.jsonl, results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-}}
[ -n "$OUT_DIR" ] || { echo "error: usage: bash scripts/gpu_check.sh OUT_DIR (or set OUT)" >&2; exit 2; }
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/ran_bench_gpu_check}
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

say() { echo "== [${SECONDS}s] $*" | tee -a "$LOG"; }
fail() { echo "FAILED: $*" | tee -a "$LOG" "$OUT_DIR/summary.txt" >&2; exit 1; }
# step SECONDS NAME CMD...: run CMD with a time limit, its output in the log; a non-zero exit fails
step() {
  local limit=$1 name=$2; shift 2
  say "$name: $*"
  local rc=0
  timeout "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || fail "$name exited $rc (limit ${limit}s; see gpu_check.log)"
}
# check NAME PYTHON_CODE: an assertion in Python; its message is the failure
check() {
  local out rc=0
  out=$("$PY" -c "$2" 2>&1) || rc=$?
  echo "$out" >>"$LOG"
  [ "$rc" -eq 0 ] || fail "$1: $(echo "$out" | tail -1)"
  say "ok: $1 ${out:+($(echo "$out" | tail -1))}"
}

# -- 0. packages ------------------------------------------------------------------------------------
if ! "$PY" -c "import nvidia.dali, omegaconf, submitit" 2>/dev/null; then
  step 120 "install the carried wheels" "$PY" scripts/wheels.py install --target /var/tmp/ran_bench_site
  export PYTHONPATH="/var/tmp/ran_bench_site:$PYTHONPATH"
fi
check "DALI, OmegaConf and ran-bench import" "import nvidia.dali, omegaconf, torch, ran_bench.cli; \
print('DALI', nvidia.dali.__version__, 'torch', torch.__version__)"

if [ "${GPU_CHECK_CPU:-}" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  say "no CUDA device visible: rehearsing on the CPU (GPU_CHECK_CPU=1)"
  GPU_CHECK_CPU=1
fi
if [ "${GPU_CHECK_CPU:-}" = 1 ]; then
  MODE=cpu SIZE=64 BATCH=4 TRAIN_STEPS=8 TERM_AT=3 CLASSES=2 PER_CLASS=12 VAL_PER_CLASS=5 SIDES=(48 80)
  BENCH=(--steps 2 --warmup 1 --repeats 1 --batch-size 2 --size "$SIZE" --channels-last)
  [ -n "${TORCH_COMPILE_OVERRIDE_BACKENDS:-}" ] || export TORCH_COMPILE_DISABLE=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  LIMIT=300
else
  MODE=gpu SIZE=224 BATCH=128 TRAIN_STEPS=300 TERM_AT=150 CLASSES=10 PER_CLASS=256 VAL_PER_CLASS=50 SIDES=(375 500)
  BENCH=(--steps 20 --warmup 8 --repeats 3 --batch-size 128 --size 224 --precision bf16 --channels-last)
  LIMIT=240
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$LOG" 2>&1 || true
fi
say "mode $MODE; work folder $WORK; output $OUT_DIR"
rm -rf "$WORK"
mkdir -p "$WORK"
DATA="$WORK/data" RUN="$WORK/run" BENCH_DIR="$WORK/bench"

# -- 1. data ----------------------------------------------------------------------------------------
step "$LIMIT" "make JPEGs" "$PY" -m ran_bench data make-demo "$DATA" --classes "$CLASSES" \
  --train-per-class "$PER_CLASS" --val-per-class "$VAL_PER_CLASS" --min-side "${SIDES[0]}" \
  --max-side "${SIDES[1]}" --workers "$(nproc)"
N_VAL=$(find "$DATA/val" -name '*.JPEG' | wc -l)
[ "$N_VAL" -eq $((CLASSES * VAL_PER_CLASS)) ] || fail "expected $((CLASSES * VAL_PER_CLASS)) val images, found $N_VAL"

# -- 2. train, SIGTERM, resume, evaluate -------------------------------------------------------------
TRAIN=("$PY" -m ran_bench train --config configs/attention56.yaml --run-dir "$RUN" "data.root=$DATA" data.backend=dali
       "data.train_size=$SIZE" "data.test_sizes=[$SIZE]" "optim.global_batch_size=$BATCH"
       "optim.per_device_batch_size=$BATCH" "schedule.reference_batch_size=$BATCH" "schedule.total_steps=$TRAIN_STEPS"
       "schedule.milestones=[$((TRAIN_STEPS * 2 / 3))]" checkpoint.every_steps=100000 eval.every_steps=100000
       log.every_steps=1 "eval.batch_size=$BATCH")
say "train (to be stopped after step $TERM_AT): ${TRAIN[*]}"
setsid "${TRAIN[@]}" >>"$LOG" 2>&1 &
PID=$!
for _ in $(seq $((LIMIT * 5))); do  # until the run logs step TERM_AT (every 0.2 s)
  kill -0 "$PID" 2>/dev/null || break
  LAST=$(grep -o '"step": [0-9]*' "$RUN/metrics.jsonl" 2>/dev/null | tail -1 | grep -o '[0-9]*$' || true)
  [ "${LAST:-0}" -ge "$TERM_AT" ] && break
  sleep 0.2
done
kill -0 "$PID" 2>/dev/null || fail "the training run ended before step $TERM_AT (see gpu_check.log)"
[ "${LAST:-0}" -ge "$TERM_AT" ] || { kill -KILL -- -"$PID"; fail "no step $TERM_AT within ${LIMIT}s"; }
say "SIGTERM to the run's process group $PID at step $LAST"
kill -TERM -- -"$PID"
RC=0
wait "$PID" || RC=$?
[ "$RC" -eq 75 ] || fail "the SIGTERMed run exited $RC, not 75 (requeue)"
STOPPED=$(grep -o 'stopped by signal SIGTERM after step [0-9]*' "$RUN/train.log" | grep -o '[0-9]*$' || true)
[ "${STOPPED:-0}" -gt 0 ] || fail "train.log does not say 'stopped by signal SIGTERM after step N' with N > 0"
[ -f "$(printf '%s/checkpoints/step_%08d.pt' "$RUN" "$STOPPED")" ] || fail "no checkpoint of step $STOPPED"
say "ok: exit 75, checkpoint of step $STOPPED"
grep -q "decoding on $([ "$MODE" = gpu ] && echo GPU || echo CPU)" "$RUN/train.log" \
  || fail "train.log does not show DALI decoding on the $MODE"

step "$LIMIT" "resume" "${TRAIN[@]}"
grep -q "resumed from .* at step $STOPPED " "$RUN/train.log" || fail "train.log does not say 'resumed from ... at step $STOPPED'"
step "$LIMIT" "evaluate" "$PY" -m ran_bench eval "$RUN" --size "$SIZE"
check "run finished and evaluated on every validation image once" "
import json
r = json.load(open('$RUN/results.json'))
assert r['steps'] == r['total_steps'] == $TRAIN_STEPS, f\"steps {r['steps']} of {r['total_steps']}, expected $TRAIN_STEPS\"
e = [e for e in r['evaluations'] if e['size'] == $SIZE]
assert e and e[0]['num_samples'] == $N_VAL, f'evaluated {e[0][\"num_samples\"] if e else 0} images, expected $N_VAL'
assert e[0]['step'] == $TRAIN_STEPS and 0 <= e[0]['top1_err'] <= 100 and e[0]['device_type'] == r['device_type']
print(f\"step {r['steps']}, {e[0]['num_samples']} images, top-1 err {e[0]['top1_err']:.1f}% on {r['device_name']}\")"

# -- 3. bench rows -----------------------------------------------------------------------------------
B=("$PY" -m ran_bench bench)
step "$LIMIT" "bench: DALI loader alone" "${B[@]}" data --backend dali --data-root "$DATA" --size "$SIZE" \
  --batch-size "$BATCH" "${BENCH[@]:0:6}" --out-dir "$BENCH_DIR"
step "$LIMIT" "bench: Attention-56 model-only vs end-to-end with DALI" "${B[@]}" train --model attention56 \
  "${BENCH[@]}" --data-root "$DATA" --backend dali --out-dir "$BENCH_DIR"
step "$LIMIT" "bench: Attention-92 eager" "${B[@]}" train --model attention92 "${BENCH[@]}" --out-dir "$BENCH_DIR"
step "$LIMIT" "bench: Attention-56 compiled" "${B[@]}" train --model attention56 "${BENCH[@]}" --compile \
  --out-dir "$BENCH_DIR"
step "$LIMIT" "bench: Attention-92 compiled" "${B[@]}" train --model attention92 "${BENCH[@]}" --compile \
  --out-dir "$BENCH_DIR"
check "bench rows: DALI loader, model-only vs end-to-end, eager vs compiled, % of roofline" "
import csv
rows = list(csv.DictReader(open('$BENCH_DIR/results.csv')))
assert len(rows) == 5, f'{len(rows)} rows in results.csv, expected 5'
data, e2e, a92, a56c, a92c = rows
assert data['mode'] == 'data' and data['backend'] == 'dali', f\"the loader row used {data['backend']}, not DALI\"
assert e2e['end_to_end_backend'] == 'dali' and float(e2e['end_to_end_images_per_s']) > 0
assert [(r['model'], r['compile']) for r in (e2e, a92, a56c, a92c)] == [('attention56', 'False'),
    ('attention92', 'False'), ('attention56', 'True'), ('attention92', 'True')], 'rows out of order'
for r in (e2e, a92, a56c, a92c):
    assert float(r['images_per_s']) > 0
    if '$MODE' == 'gpu':
        assert r['roofline_fraction'], f\"no % of roofline in the {r['model']} row: {r['roofline_source']}\"
print(f\"loader {float(data['images_per_s']):.0f} img/s; Attention-56 {float(e2e['images_per_s']):.0f} model-only, \"
      f\"{float(e2e['end_to_end_images_per_s']):.0f} end-to-end\")"

cp "$BENCH_DIR/results.csv" "$OUT_DIR/results.csv"
cp "$BENCH_DIR/README.md" "$OUT_DIR/bench.md"
cp "$RUN/train.log" "$RUN/metrics.jsonl" "$RUN/results.json" "$OUT_DIR/"
"$PY" - "$BENCH_DIR/results.csv" <<'EOF' | tee "$OUT_DIR/summary.txt" | tee -a "$LOG"
import csv, sys
print(f"{'row':44} {'images/s':>9} {'end-to-end':>10} {'% roofline':>10} {'MFU':>6}")
for r in csv.DictReader(open(sys.argv[1])):
    name = f"{r['mode']} {r['model'] or r['backend']}{' compiled' if r['compile'] == 'True' else ''}"
    pct = lambda k: f"{100 * float(r[k]):.1f}" if r.get(k) else "-"
    e2e = f"{float(r['end_to_end_images_per_s']):.4g}" if r.get("end_to_end_images_per_s") else "-"
    print(f"{name:44} {float(r['images_per_s']):9.4g} {e2e:>10} {pct('roofline_fraction'):>10} {pct('mfu'):>6}")
EOF
say "all checks passed ($MODE) in ${SECONDS}s; files in $OUT_DIR"
