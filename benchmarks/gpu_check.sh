#!/usr/bin/env bash
# GPU check of the nbp kernels (H100/H200; no network needed).
#
#   OUT=/some/dir GPU_CHECK_STEPS=first-contact bash benchmarks/gpu_check.sh
#
# Logs everything to $OUT/gpu_check.log and appends one row per step to
# $OUT/gpu_check_summary.md as each step ends, so what finished is on disk
# even if the call is killed. A failed or timed-out step is recorded and the
# next step still runs; the exit status is non-zero if any step failed.
#
# Groups (GPU_CHECK_STEPS: a group name or step names, space separated):
#   first-contact  one device call of ~7 minutes, start and CUDA build included.
#                  Steps, in order, each with its own timeout (its share; the
#                  whole group is also capped by GPU_CHECK_BUDGET_S, default 410 s):
#                    env                 30 s  versions, the card (a cold torch import)
#                    cuda_build         120 s  nbp_kernels._C for sm_90a only, imported
#                    quick_tests         90 s  tests/test_gpu_first_contact.py: every Triton and
#                                              CUDA kernel vs the reference, bf16/fp16/fp32
#                    generate_headline  120 s  generate_table.py --quick: k600-base bf16, decode step
#                                              vs its bytes/bandwidth floor at batch 1 and 8, NBP/NTP
#                                              frames/s (AR part and whole job with the tokenizer)
#                    tuning              50 s  tune_decode.py --no-table: nbp_kernels/tuning.json
#                  Files in $OUT (at most 8 come back): gpu_check.log, gpu_check_summary.md,
#                  generate_<card>.md/.json, tuning.json.
#   tests          env cuda_build gpu_tests cuda_tests            (~6 min, 9.5 at most)
#   tables         env cuda_build attention_table cuda_table generate_table  (~8 min, 15 at most:
#                  two calls, e.g. "env cuda_build attention_table" and "env cuda_build cuda_table generate_table")
#   sanitizer      env cuda_build cuda_sanitizer (compute-sanitizer; device machines may refuse it)
#   all (default)  every step except cuda_sanitizer: several device calls' worth
#
# GPU_CHECK_DRY_RUN=1 (or --dry-run) runs the step logic on a CPU: what needs
# CUDA is replaced by a check that runs here (the build by `nvcc --version`,
# the tests by their collection, the headline table by its --tiny smoke run,
# the tuning by nothing). GPU_CHECK_TIMEOUTS="step=seconds ..." overrides
# step timeouts. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
for arg in "$@"; do
    case $arg in
        --dry-run) GPU_CHECK_DRY_RUN=1 ;;
        *) echo "gpu_check.sh: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
    esac
done
DRY=${GPU_CHECK_DRY_RUN:-0}
OUT=${OUT:-$ROOT/benchmarks/results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check_summary.md
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real GPU kernels, never the interpreter

STEPS=()  # "name function timeout_s", in run order
add_step() { STEPS+=("$1 $2 $3"); }

# ---------------------------------------------------------------- environment
step_env() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || nvidia-smi || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
    if [ "$DRY" = 1 ]; then echo "dry run: no CUDA device asserted"; return 0; fi
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(), '| SMs:', torch.cuda.get_device_properties(0).multi_processor_count)"
    "$PY" -c "import nbp_kernels; print('backends on cuda:', nbp_kernels.available_backends('cuda'))"
}
add_step env step_env 30

# ---------------------------------------------------------------- CUDA extension
# nbp_kernels._C is built here if it is missing (carry a .so built elsewhere
# for the same Python to skip it). First contact builds for sm_90a only.
step_cuda_build() {
    if [ "$DRY" = 1 ]; then
        { command -v nvcc >/dev/null && nvcc --version | tail -1; } || echo "nvcc not on PATH"
        echo "dry run: build skipped"; return 0
    fi
    if ! "$PY" -c "import nbp_kernels._C" 2>/dev/null; then
        NBP_BUILD_CUDA=1 NBP_CUDA_ARCHS="${NBP_CUDA_ARCHS:-90a}" MAX_JOBS="${MAX_JOBS:-16}" \
            "$PY" setup.py build_ext --inplace
    fi
    "$PY" -c "from nbp_kernels import cuda_ops; ok, why = cuda_ops.is_available('cuda'); print('cuda backend:', cuda_ops.build_info(), ok, why); assert ok, why"
}
add_step cuda_build step_cuda_build 120

# ---------------------------------------------------------------- first contact
_pytest_par() {  # spread Triton compiles over processes when pytest-xdist is there
    if "$PY" -c "import xdist" 2>/dev/null; then echo "-n ${1:-8}"; fi
}

step_quick_tests() {
    # -v: each result reaches the log as it ends, so a timeout still shows what passed
    local args=(-v -p no:cacheprovider -rs --durations=10 tests/test_gpu_first_contact.py)
    if [ "$DRY" = 1 ]; then "$PY" -m pytest --collect-only "${args[@]}"; return; fi
    # shellcheck disable=SC2046
    "$PY" -m pytest $(_pytest_par 8) "${args[@]}"
}
add_step quick_tests step_quick_tests 90

step_generate_headline() {
    if [ "$DRY" = 1 ]; then "$PY" benchmarks/generate_table.py --tiny --out "$OUT"; return; fi
    "$PY" benchmarks/generate_table.py --quick --out "$OUT"
}
add_step generate_headline step_generate_headline 120

step_tuning() {
    if [ "$DRY" = 1 ]; then echo "dry run: tune_decode.py needs CUDA; not run"; return 0; fi
    "$PY" benchmarks/tune_decode.py --quick --no-table --budget-s 35 --out "$OUT"
}
add_step tuning step_tuning 50

# ---------------------------------------------------------------- full test groups
GPU_TESTS=(tests/test_block_causal_attention.py tests/test_block_decode_attention.py
           tests/test_kv_append.py tests/test_custom_ops.py tests/test_generate.py)
step_gpu_tests() {
    # shellcheck disable=SC2046
    "$PY" -m pytest -q -m "not slow" -p no:cacheprovider --durations=10 $(_pytest_par 6) "${GPU_TESTS[@]}"
}
add_step gpu_tests step_gpu_tests 300

step_cuda_tests() {
    "$PY" -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda_build.py tests/test_cuda_ops.py
}
add_step cuda_tests step_cuda_tests 180

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
add_step cuda_sanitizer step_cuda_sanitizer 300

# ---------------------------------------------------------------- full tables
step_attention_table() {
    # Prefill TFLOP/s (S = 1024/1280/4096, D = 128/96) vs FlexAttention and SDPA;
    # decode-step µs and GB/s vs SDPA (16 queries x 1280 cached x 16 heads x 96, batch 1 and 8).
    "$PY" benchmarks/gpu_table.py --out "$OUT" --budget-s 90 --sweep-s 40
}
add_step attention_table step_attention_table 240

step_cuda_table() {
    # Decode table CUDA vs Triton vs SDPA vs FlexAttention with the bandwidth floor, and tuning.json.
    "$PY" benchmarks/tune_decode.py --quick --budget-s 100 --out "$OUT"
}
add_step cuda_table step_cuda_table 240

step_generate_table() {
    # Registered after cuda_table so that backend "auto" reads the tuning.json it wrote.
    "$PY" benchmarks/generate_table.py --out "$OUT"
}
add_step generate_table step_generate_table 240

# ---------------------------------------------------------------- run
case ${GPU_CHECK_STEPS:-all} in
    first-contact) SELECTED="env cuda_build quick_tests generate_headline tuning"; BUDGET_DEFAULT=410 ;;
    tests) SELECTED="env cuda_build gpu_tests cuda_tests"; BUDGET_DEFAULT=0 ;;
    tables) SELECTED="env cuda_build attention_table cuda_table generate_table"; BUDGET_DEFAULT=0 ;;
    sanitizer) SELECTED="env cuda_build cuda_sanitizer"; BUDGET_DEFAULT=0 ;;
    all) SELECTED="env cuda_build quick_tests gpu_tests cuda_tests attention_table cuda_table generate_table"
         BUDGET_DEFAULT=0 ;;
    *) SELECTED=$GPU_CHECK_STEPS; BUDGET_DEFAULT=0 ;;
esac
for name in $SELECTED; do
    known=0
    for s in "${STEPS[@]}"; do [ "${s%% *}" = "$name" ] && known=1; done
    if [ "$known" = 0 ]; then echo "gpu_check.sh: unknown step $name in GPU_CHECK_STEPS" >&2; exit 2; fi
done
BUDGET=${GPU_CHECK_BUDGET_S:-$BUDGET_DEFAULT}  # 0: no total cap
START=$(date +%s)

timeout_of() {  # name default -> the step's timeout (GPU_CHECK_TIMEOUTS overrides)
    local kv
    for kv in ${GPU_CHECK_TIMEOUTS:-}; do
        if [ "${kv%%=*}" = "$1" ]; then echo "${kv#*=}"; return; fi
    done
    echo "$2"
}

failed=0
{
    echo "# gpu_check $(date -u +%FT%TZ) steps: $SELECTED$([ "$DRY" = 1 ] && echo ' (dry run)')"
    echo
    echo "| step | status | seconds | timeout s |"
    echo "|---|---|---|---|"
} >"$SUMMARY"

run_step() {  # name function timeout_s
    local name=$1 func=$2 limit t0 rc dt status left
    limit=$(timeout_of "$name" "$3")
    if [[ " $SELECTED " != *" $name "* ]]; then return 0; fi
    if [ "$BUDGET" -gt 0 ]; then
        left=$(( BUDGET - ($(date +%s) - START) ))
        if [ "$left" -lt 5 ]; then
            echo "===== step $name: skipped, the ${BUDGET} s budget is spent" | tee -a "$LOG"
            echo "| $name | SKIPPED (budget spent) | 0 | $limit |" >>"$SUMMARY"; failed=1
            return 0
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    t0=$(date +%s)
    echo "===== step $name (timeout $limit s) $(date -u +%T)" | tee -a "$LOG"
    # A child bash, so that `timeout` bounds the step and its whole process group.
    export -f "$func" _pytest_par
    GPU_TESTS_STR="${GPU_TESTS[*]}" timeout -k 5 "$limit" bash -c \
        'set -eo pipefail; GPU_TESTS=($GPU_TESTS_STR); '"$func" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    dt=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then status=ok
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="FAILED (timeout after $limit s)"; failed=1
    else status="FAILED (rc $rc)"; failed=1; fi
    echo "===== step $name: $status in ${dt} s" | tee -a "$LOG"
    echo "| $name | $status | $dt | $limit |" >>"$SUMMARY"
}

export PY OUT ROOT DRY
for s in "${STEPS[@]}"; do run_step $s; done
n_files=$(find "$OUT" -type f | wc -l)
echo "files in $OUT: $n_files$([ "$n_files" -gt 8 ] && echo ' (more than the 8 a device call brings back)')" | tee -a "$LOG"
cat "$SUMMARY"
exit "$failed"
