#!/usr/bin/env bash
# The single GPU check (< 5 minutes on an H200): versions, builds the C++/CUDA extensions,
# runs the test suite on CUDA, times every backend (benchmarks/gpu_kernels_bench.py), then
# every other benchmarks/gpu_*.py script, each under its own timeout, and prints a summary.
# On a machine without a CUDA device it runs the CPU parts (versions, C++ build, the cpp
# tests, a quick CPU benchmark), prints "no CUDA device" and exits 0 (when those passed).
#
# Environment: PYTHON (default: python3 on PATH), OUT (logs + JSON go there when set),
# DEVICE_CHECK_BUDGET_S (whole-script budget, default 285), per-step limits
# DEVICE_CHECK_{BUILD,KTESTS,TESTS,BENCH,OTHER}_S.  Exit status: 0 when every step passed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${DEVICE_CHECK_BUDGET_S:-285}
START=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
SUMMARY=()
FAILED=0
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/device_check.log") 2>&1
fi

# run_step NAME LIMIT_S CMD...: run under min(LIMIT, time left), record the outcome.
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 10 ]; then
        SUMMARY+=("SKIP  $name (budget of ${BUDGET}s spent)")
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "=== $name (limit ${limit}s)"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local secs=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        SUMMARY+=("ok    $name (${secs}s)")
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        SUMMARY+=("TIME  $name (killed after ${secs}s)")
        FAILED=1
    else
        SUMMARY+=("FAIL  $name (rc=$rc, ${secs}s)")
        FAILED=1
    fi
}

print_summary() {
    echo
    echo "=== summary ($(($(date +%s) - START))s)"
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
}

echo "=== versions ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
else
    echo "nvidia-smi: not found"
fi
$PY - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB")
EOF
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
if [ -x "$NVCC" ]; then "$NVCC" --version | tail -n 2; else echo "nvcc: not found"; fi

HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

run_step "build extensions" "${DEVICE_CHECK_BUILD_S:-180}" $PY - <<'EOF'
import sys, time, torch
from prograd_fast import _ext
from prograd_fast.backends import available_backends
kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
bad = 0
for kind in kinds:
    t = time.perf_counter()
    reason = _ext.unavailable_reason(kind)
    print(f"{kind} extension: {'built/loaded' if reason is None else 'UNAVAILABLE: ' + reason}"
          f" in {time.perf_counter() - t:.1f} s")
    bad |= reason is not None
print("backends:", {k: (v or "ok") for k, v in available_backends().items()})
sys.exit(bad)
EOF

if [ "$HAS_CUDA" != "1" ]; then
    run_step "cpp tests (CPU)" "${DEVICE_CHECK_TESTS_S:-180}" $PY -m pytest -x -q tests/test_cpp_backend.py
    run_step "kernel benchmark (CPU, quick)" "${DEVICE_CHECK_BENCH_S:-120}" \
        $PY benchmarks/gpu_kernels_bench.py --quick
    print_summary
    echo
    echo "no CUDA device: CPU parts done, GPU parts skipped"
    exit $FAILED
fi

# The kernel tests first (the CUDA correctness matrix in every launch plan), then the rest of
# the suite: together they are `pytest -x -q tests`.
KERNEL_TESTS="tests/test_cuda_build.py tests/test_cpp_backend.py"
run_step "pytest -x -q (kernel tests, CUDA)" "${DEVICE_CHECK_KTESTS_S:-120}" \
    $PY -m pytest -x -q $KERNEL_TESTS
run_step "pytest -x -q tests (the rest, CUDA)" "${DEVICE_CHECK_TESTS_S:-150}" \
    $PY -m pytest -x -q tests $(for f in $KERNEL_TESTS; do printf -- "--ignore=%s " "$f"; done)
run_step "gpu_kernels_bench.py" "${DEVICE_CHECK_BENCH_S:-90}" $PY benchmarks/gpu_kernels_bench.py
for script in benchmarks/gpu_*.py; do
    [ "$script" = "benchmarks/gpu_kernels_bench.py" ] && continue
    [ -e "$script" ] || continue
    run_step "$(basename "$script")" "${DEVICE_CHECK_OTHER_S:-60}" $PY "$script"
done
print_summary
exit $FAILED
