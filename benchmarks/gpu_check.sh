#!/usr/bin/env bash
# One-shot GPU check of the nbp kernels (H100; no network needed).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Logs everything to $OUT/gpu_check.log and writes the attention table
# ($OUT/attention_<card>.md/.json), the generator table
# ($OUT/generate_<card>.md/.json) and a step summary
# ($OUT/gpu_check_summary.md). A failing step is recorded and the remaining
# steps still run; the exit status is non-zero if any step failed.
#
# Sections: each section below defines step functions and registers them with
# `add_step <phase> <name> <function> <timeout_s>`, phase `setup` (before the
# tests: builds) or `table` (after the tests: benchmarks), and adds its test
# files to GPU_TESTS. To add a section (e.g. the CUDA extension build, its
# tests and its table), append a block like the Triton one where marked.
# Run order: env, setup steps, the GPU tests, table steps (each in the order
# registered). GPU_CHECK_STEPS="env gpu_tests attention_table" (names, space
# separated) runs only those steps, e.g. to fit one device call's time limit.
# Step names (timeout s): env (60); setup: cuda_build (240); gpu_tests (300);
# table: attention_table (240), cuda_tests (180), cuda_sanitizer (300),
# cuda_table (240), generate_table (240).
# All steps together take well over one device call (~12-15 minutes on an H100
# expected, 30 at every timeout): run them in groups whose timeouts sum to at
# most ~9 minutes, one device call each (timeout_s 600), e.g.
#   "env cuda_build generate_table"          (~3 min expected, 9 at most)
#   "env gpu_tests"                          (~3-4 min, 6 at most)
#   "env attention_table cuda_table"         (~4 min, 9 at most)
#   "env cuda_tests cuda_sanitizer"          (~4 min, 9 at most; needs nbp_kernels._C:
#                                             carried, or built by an earlier cuda_build)
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
add_step() {  # <phase> <name> <function> <timeout_s>; the 3-argument form means phase `table`
    if [ $# -eq 3 ]; then set -- table "$@"; fi
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
    "$PY" benchmarks/gpu_table.py --out "$OUT" --budget-s 90 --sweep-s 40
}
add_step table attention_table step_attention_table 240

# ---------------------------------------------------------------- (append new sections here)

# ---------------------------------------------------------------- CUDA kernels (issue 7)
# Owned by the CUDA helper (csrc/, nbp_kernels/cuda_ops.py). The build runs in
# the setup phase, the rest after the Triton steps; alone (one device call):
#   GPU_CHECK_STEPS="env cuda_build cuda_tests cuda_sanitizer cuda_table"
# nbp_kernels._C is built here if it is missing (needs nvcc;
# otherwise carry the .so built on the CPU machine,
# nbp_kernels/_C.cpython-<py>-x86_64-linux-gnu.so, for the same Python), then:
# numerics vs the reference, compute-sanitizer memcheck + racecheck on a small
# subset, and the decode table CUDA vs Triton vs SDPA vs FlexAttention with the
# bandwidth floor, plus nbp_kernels/tuning.json (both copied to $OUT).
step_cuda_build() {
    if ! "$PY" -c "import nbp_kernels._C" 2>/dev/null; then
        NBP_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
    fi
    "$PY" -c "from nbp_kernels import cuda_ops; ok, why = cuda_ops.is_available('cuda'); print('cuda backend:', cuda_ops.build_info(), ok, why); assert ok, why"
}

step_cuda_tests() {
    "$PY" -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda_build.py tests/test_cuda_ops.py
}

step_cuda_sanitizer() {
    local san
    san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    [ -x "$san" ] || { echo "compute-sanitizer not found: NOT RUN"; return 1; }
    local subset="(test_decode_matches_reference and (True-16-96 or True-5-96 or False-1-64))"
    subset+=" or (test_kv_append_matches_reference and 7-) or test_unchecked_overflow"
    subset+=" or (test_decode_forced_split_counts and 64-)"
    # Without the caching allocator each tensor is its own allocation, so memcheck sees overruns.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck --error-exitcode 99 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py -k "$subset"
    "$san" --tool racecheck --error-exitcode 99 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py -k "test_decode_matches_reference and True-16-96-bfloat16"
}

step_cuda_table() {
    "$PY" benchmarks/tune_decode.py --quick --budget-s 100 --out "$OUT"
}
add_step setup cuda_build step_cuda_build 240
add_step table cuda_tests step_cuda_tests 180
add_step table cuda_sanitizer step_cuda_sanitizer 300
add_step table cuda_table step_cuda_table 240

# ---------------------------------------------------------------- Generator (issue 4)
# nbp.FastGenerator (nbp/generate.py, runner.py, cache.py, sampler.py): the
# GPU tests of tests/test_generate.py join the GPU tests; the table step writes
# $OUT/generate_<card>.md/.json: k600-base, bf16, random weights; decode step
# (CUDA-graph replay) vs the bytes/copy-bandwidth floor at batch 1 and 8, per
# backend; NBP vs NTP frames/s of 12-frame K600 prediction; the whole job with
# the magvit2-size tokenizer; each issue-4 target met/missed. Registered after
# the CUDA section so that backend "auto" reads the tuning.json cuda_table
# wrote when both run in one call (otherwise auto is triton; the explicit
# triton and cuda rows are measured either way). Alone (one device call,
# ~2-3 minutes, at most 9):
#   GPU_CHECK_STEPS="env cuda_build generate_table"
GPU_TESTS+=(tests/test_generate.py)

step_generate_table() {
    "$PY" benchmarks/generate_table.py --out "$OUT"
}
add_step table generate_table step_generate_table 240

# ---------------------------------------------------------------- run
step_gpu_tests() {
    # Most of this step is Triton compiling kernel variants: spread it over processes.
    local par=()
    if "$PY" -c "import xdist" 2>/dev/null; then par=(-n 6); fi
    "$PY" -m pytest -q -m "not slow" -p no:cacheprovider --durations=10 "${par[@]}" "${GPU_TESTS[@]}"
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
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        echo "| $name | not selected (GPU_CHECK_STEPS) | 0 |" >>"$SUMMARY"
        return 0
    fi
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
run_step gpu_tests step_gpu_tests 300
for s in ${TABLE_STEPS[@]+"${TABLE_STEPS[@]}"}; do run_step $s; done
cat "$SUMMARY"
for f in "$OUT"/attention_*.md "$OUT"/generate_*.md; do [ -e "$f" ] && cat "$f"; done
exit "$failed"
