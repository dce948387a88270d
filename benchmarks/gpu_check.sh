#!/usr/bin/env bash
# One-shot GPU check of the nbp kernels (H100; no network needed).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Logs everything to $OUT/gpu_check.log and writes the attention table
# ($OUT/attention_<card>.md/.json) and a step summary
# ($OUT/gpu_check_summary.md). A failing step is recorded and the remaining
# steps still run; the exit status is non-zero if any step failed.
#
# Sections: each section below defines step functions and registers them with
# `add_step <phase> <name> <function> <timeout_s>`, phase `setup` (before the
# tests: builds) or `table` (after the tests: benchmarks), and adds its test
# files to GPU_TESTS. To add a section (e.g. the CUDA extension build, its
# tests and its table), append a block like the Triton one where marked.
# Run order: env, setup steps, the GPU tests, table steps (each in the order
# registered). A normal H100 run takes ~4-5 minutes; every step at its timeout
# would be ~8.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check_summary.md
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real GPU kernels, never the interpreter

SETUP_STEPS=()  # "name function timeout_s", run in this order
TABLE_STEPS=()
GPU_TESTS=()
add_step() {
    case $1 in
        setup) SETUP_STEPS+=("$2 $3 $4") ;;
        table) TABLE_STEPS+=("$2 $3 $4") ;;
        *) echo "add_step: phase must be setup or table, got $1" >&2; exit 2 ;;
    esac
}

# ---------------------------------------------------------------- environment
step_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || nvidia-smi || true
    "$PY" -c "import sys, torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__); print('device:', torch.cuda.get_device_name(), '| SMs:', torch.cuda.get_device_properties(0).multi_processor_count)"
    "$PY" -c "import nbp_kernels, nbp_kernels.ops; print('backends on cuda:', nbp_kernels.available_backends('cuda'))"
}

# ---------------------------------------------------------------- Triton kernels (issue 3)
GPU_TESTS+=(tests/test_block_causal_attention.py tests/test_block_decode_attention.py
            tests/test_kv_append.py tests/test_custom_ops.py)

step_attention_table() {
    # Prefill TFLOP/s (S = 1024/1280/4096, D = 128/96) vs FlexAttention and SDPA;
    # decode-step µs and GB/s vs SDPA (16 queries x 1280 cached x 16 heads x 96, batch 1 and 8).
    "$PY" benchmarks/gpu_table.py --out "$OUT" --budget-s 100
}
add_step table attention_table step_attention_table 200

# ---------------------------------------------------------------- (append new sections here)

# ---------------------------------------------------------------- run
step_gpu_tests() {
    "$PY" -m pytest -q -m "not slow" -p no:cacheprovider --durations=10 "${GPU_TESTS[@]}"
}

failed=0
{
    echo "# gpu_check $(date -u +%FT%TZ)"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
} >"$SUMMARY"

run_step() {  # name function timeout_s
    local name=$1 func=$2 limit=$3 t0 rc dt status
    t0=$(date +%s)
    echo "===== step $name (timeout $limit s)" | tee -a "$LOG"
    # A child bash, so that `timeout` bounds the step and its whole process group.
    export -f "$func"
    GPU_TESTS_STR="${GPU_TESTS[*]}" timeout -k 10 "$limit" bash -c \
        'set -eo pipefail; GPU_TESTS=($GPU_TESTS_STR); '"$func" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    dt=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then status=ok; else status="FAILED (rc $rc)"; failed=1; fi
    echo "===== step $name: $status in ${dt} s" | tee -a "$LOG"
    echo "| $name | $status | $dt |" >>"$SUMMARY"
}

export PY OUT ROOT
run_step env step_env 60
for s in ${SETUP_STEPS[@]+"${SETUP_STEPS[@]}"}; do run_step $s; done
run_step gpu_tests step_gpu_tests 220
for s in ${TABLE_STEPS[@]+"${TABLE_STEPS[@]}"}; do run_step $s; done
cat "$SUMMARY"
for f in "$OUT"/attention_*.md; do [ -e "$f" ] && cat "$f"; done
exit "$failed"
