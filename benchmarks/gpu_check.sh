#!/usr/bin/env bash
# One-shot GPU check of the nbp kernels (H100; no network needed; ~6 minutes).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Runs each step below in order, logs everything to $OUT/gpu_check.log, and
# writes the attention table ($OUT/attention_<card>.md/.json) and a step
# summary ($OUT/gpu_check_summary.md). A failing step is recorded and the
# remaining steps still run; the exit status is non-zero if any step failed.
#
# Sections: each section defines step functions and registers them with
# `add_step <name> <function> <timeout_s>`. To add a section (e.g. the CUDA
# extension build and its tests), append a block like the Triton one before
# the "run" section at the bottom, and add test files to GPU_TESTS.
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

STEP_NAMES=()
STEP_FUNCS=()
STEP_TIMEOUTS=()
add_step() { STEP_NAMES+=("$1"); STEP_FUNCS+=("$2"); STEP_TIMEOUTS+=("$3"); }
GPU_TESTS=()

# ---------------------------------------------------------------- environment
step_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || nvidia-smi || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__); print('device:', torch.cuda.get_device_name(), '| SMs:', torch.cuda.get_device_properties(0).multi_processor_count); assert torch.cuda.is_available()"
    "$PY" -c "import nbp_kernels, nbp_kernels.ops; print('backends on cuda:', nbp_kernels.available_backends('cuda'))"
}
add_step env step_env 120

# ---------------------------------------------------------------- Triton kernels (issue 3)
GPU_TESTS+=(tests/test_block_causal_attention.py tests/test_block_decode_attention.py
            tests/test_kv_append.py tests/test_custom_ops.py)

step_attention_table() {
    # Prefill TFLOP/s (S = 1024/1280/4096, D = 128/96) vs FlexAttention and SDPA;
    # decode-step µs and GB/s vs SDPA (16 queries x 1280 cached x 16 heads x 96, batch 1 and 8).
    "$PY" benchmarks/gpu_table.py --out "$OUT" --budget-s 150
}

# ---------------------------------------------------------------- (append new sections here)

# ---------------------------------------------------------------- tests, then tables
step_gpu_tests() {
    "$PY" -m pytest -q -m "not slow" -p no:cacheprovider --durations=10 "${GPU_TESTS[@]}"
}
add_step gpu_tests step_gpu_tests 240
add_step attention_table step_attention_table 240

# ---------------------------------------------------------------- run
failed=0
{
    echo "# gpu_check $(date -u +%FT%TZ)"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
} >"$SUMMARY"
for i in "${!STEP_NAMES[@]}"; do
    name=${STEP_NAMES[$i]}
    t0=$(date +%s)
    echo "===== step $name (timeout ${STEP_TIMEOUTS[$i]} s)" | tee -a "$LOG"
    # Each step runs in a subshell so that `timeout` can bound it.
    export -f "${STEP_FUNCS[$i]}"
    export PY OUT ROOT
    GPU_TESTS_STR="${GPU_TESTS[*]}" timeout "${STEP_TIMEOUTS[$i]}" bash -c \
        'set -eo pipefail; GPU_TESTS=($GPU_TESTS_STR); '"${STEP_FUNCS[$i]}" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    dt=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then status=ok; else status="FAILED (rc $rc)"; failed=1; fi
    echo "===== step $name: $status in ${dt} s" | tee -a "$LOG"
    echo "| $name | $status | $dt |" >>"$SUMMARY"
done
cat "$SUMMARY"
for f in "$OUT"/attention_*.md; do [ -e "$f" ] && cat "$f"; done
exit "$failed"
