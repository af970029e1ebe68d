#!/usr/bin/env bash
# The single GPU check of prograd_fast: one call on a fresh GPU machine, at most 8 minutes.
#
#   bash benchmarks/device_check.sh                      # GPU machine (OUT=... to keep files)
#   DEVICE_CHECK_DRY_RUN=1 bash benchmarks/device_check.sh   # no GPU: the CI dry run
#
# In order (the most important first; each step time-boxed, the whole within the budget):
#  1. versions (GPU, driver, python, torch, triton, nvcc, compute-sanitizer)
#  2. setup: wheels carried in .whl/ (if any) into /tmp/site, the package itself with
#     `pip install --no-deps --no-build-isolation -e .` (no registry there), then the C++,
#     CUDA and host-helper extensions built in parallel (sm_90 only: PROGRAD_FAST_CUDA_ARCHS=90)
#  3. GPU tests: tests/test_gpu_step_path.py (capture, scheduler, coop fallback, streams,
#     allocations, launcher, AMP, compile)
#  4. benchmarks/gpu_kernels_bench.py: every backend and the peers on the DESIGN.md scenarios
#  5. benchmarks/device_verdicts.py: one VERDICT line per target of issue 10, written with
#     the timing table into BENCHMARKS.md's gpu-check section (copied to $OUT)
#  6. tests/test_cuda_build.py on the device (every plan, every dtype)
#  7. compute-sanitizer memcheck, then racecheck, on every kernel
#     (benchmarks/sanitize_kernels.py, each tensor its own allocation)
#  8. every other benchmarks/gpu_*.py script (hardening, end to end, shared prefix), each
#     under its own limit (the end-to-end ones need open_clip: carry it in .whl/)
#  9. with the time left: tests/test_triton_backend.py on CUDA
# The summary and the VERDICT lines are printed last.  Exit status 0 when every step passed.
# Without a CUDA device (or with DEVICE_CHECK_DRY_RUN=1) it checks its own pieces on the
# CPU (the sanitizer driver in the Triton interpreter, the verdict script) and prints one
# "VERDICT NOT RUN ...: no CUDA device" line per target.  DEVICE_CHECK_PLAN_ONLY=1 walks the
# GPU steps without running them (each command printed, inline Python syntax-checked): CI
# uses it so that the GPU run does not meet a typo first.
#
# Environment: PYTHON (default python3), OUT (logs, JSON, BENCHMARKS.md go there; at most
# 8 files), DEVICE_CHECK_BUDGET_S (default 450), DEVICE_CHECK_{BUILD,GPUTESTS,CUDATESTS,
# MEMCHECK,RACECHECK,BENCH,OTHER,TRITONTESTS}_S per-step limits.  Carry wheels a test or benchmark
# needs and the machine lacks (open_clip_torch for the end-to-end suite) in .whl/, see
# /work/.library/device/README.md.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
START=$(date +%s)
DRY=${DEVICE_CHECK_DRY_RUN:-0}
PLAN_ONLY=${DEVICE_CHECK_PLAN_ONLY:-0}
OUTDIR=${OUT:-$(mktemp -d /tmp/device_check.XXXXXX)}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PROGRAD_FAST_CUDA_ARCHS=${PROGRAD_FAST_CUDA_ARCHS:-90}
export PROGRAD_FAST_BUILD_DIR=${PROGRAD_FAST_BUILD_DIR:-/tmp/prograd_fast_build}
SUMMARY=()
VERDICTS="$OUTDIR/verdicts.txt"
FAILED=0
exec > >(tee -a "$OUTDIR/device_check.log") 2>&1

left() { echo $((BUDGET - ($(date +%s) - START))); }

# run_step NAME LIMIT_S CMD...: run under min(LIMIT, time left - 5), record the outcome.
run_step() {
    local name=$1 limit=$2
    shift 2
    local remain
    remain=$(($(left) - 5))
    if [ "$remain" -lt 10 ]; then
        SUMMARY+=("SKIP  $name (budget of ${BUDGET}s spent)")
        FAILED=1
        return 1
    fi
    [ "$limit" -gt "$remain" ] && limit=$remain
    echo
    echo "=== $name (limit ${limit}s, $(left)s left)"
    if [ "$PLAN_ONLY" != "0" ]; then  # print, and check inline Python (a here-document)
        echo "would run: $*"
        if [ "$*" = "$PY -" ]; then
            $PY -c "import ast, sys; ast.parse(sys.stdin.read())" || { SUMMARY+=("FAIL  $name (inline Python does not parse)"); FAILED=1; return 1; }
        fi
        SUMMARY+=("plan  $name")
        return 0
    fi
    local t0 rc secs
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
    secs=$(($(date +%s) - t0))
    if [ $rc -eq 0 ]; then
        SUMMARY+=("ok    $name (${secs}s)")
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        SUMMARY+=("TIME  $name (killed after ${secs}s)")
        FAILED=1
    else
        SUMMARY+=("FAIL  $name (rc=$rc, ${secs}s)")
        FAILED=1
    fi
    return $rc
}

finish() {
    echo
    echo "=== summary ($(($(date +%s) - START))s of ${BUDGET}s; files in $OUTDIR)"
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
    if grep -q '^VERDICT' "$VERDICTS" 2>/dev/null; then
        grep '^VERDICT' "$VERDICTS"
    else
        echo "VERDICT NOT RUN (all targets): no verdicts were computed"
    fi
    exit $FAILED
}

echo "=== versions ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
else
    echo "nvidia-smi: not found"
fi
$PY - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch cuda",
      torch.version.cuda, "| cuda available", torch.cuda.is_available())
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
if [ -x "$NVCC" ]; then "$NVCC" --version | tail -n 1; else echo "nvcc: not found"; fi
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then "$SANITIZER" --version | tail -n 1; else echo "compute-sanitizer: not found"; SANITIZER=""; fi
HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[ "$PLAN_ONLY" != "0" ] && HAS_CUDA=1 && SANITIZER=${SANITIZER:-compute-sanitizer}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    run_step "carried wheels" 60 $PY -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import prograd_fast.kernels, prograd_fast.csrc" >/dev/null 2>&1; then
    run_step "install prograd_fast (editable, offline)" 90 $PY -m pip install -q --no-deps \
        --no-build-isolation --no-index -e .
fi

if [ "$DRY" != "0" ] || [ "$HAS_CUDA" != "1" ]; then
    # The pieces the GPU run relies on, checked here so its minutes are not lost to a typo.
    run_step "sanitizer driver (dry run, Triton interpreter)" 120 \
        env TRITON_INTERPRET=1 $PY benchmarks/sanitize_kernels.py --dry-run
    run_step "verdicts (no device)" 30 $PY benchmarks/device_verdicts.py --no-device \
        > "$VERDICTS"
    echo
    echo "no CUDA device: dry run (the GPU steps were not run)"
    finish
fi

run_step "build C++, CUDA and host-helper extensions (in parallel)" "${DEVICE_CHECK_BUILD_S:-150}" $PY - <<'EOF'
import subprocess, sys
code = """
import sys, time
from prograd_fast import _ext
t = time.perf_counter()
reason = _ext.unavailable_reason(sys.argv[1])
print(f"{sys.argv[1]} extension: {'ok' if reason is None else 'UNAVAILABLE: ' + reason}"
      f" ({time.perf_counter() - t:.0f} s)", flush=True)
sys.exit(reason is not None)
"""
procs = [subprocess.Popen([sys.executable, "-c", code, kind]) for kind in ("cuda", "cpu", "host")]
sys.exit(max(p.wait() for p in procs))
EOF

run_step "GPU tests: tests/test_gpu_step_path.py" "${DEVICE_CHECK_GPUTESTS_S:-120}" \
    $PY -m pytest -q -rs tests/test_gpu_step_path.py
run_step "time every backend and the peers: benchmarks/gpu_kernels_bench.py" \
    "${DEVICE_CHECK_BENCH_S:-90}" env OUT="$OUTDIR" $PY benchmarks/gpu_kernels_bench.py
if [ -s "$OUTDIR/gpu_kernels_bench.json" ] || [ "$PLAN_ONLY" != "0" ]; then
    run_step "verdicts and BENCHMARKS.md gpu-check section" 30 $PY benchmarks/device_verdicts.py \
        "$OUTDIR/gpu_kernels_bench.json" --write BENCHMARKS.md > "$VERDICTS"
    cat "$VERDICTS"
    [ "$PLAN_ONLY" = "0" ] && cp BENCHMARKS.md "$OUTDIR/BENCHMARKS.md"
fi
run_step "CUDA kernel tests: tests/test_cuda_build.py (every plan)" \
    "${DEVICE_CHECK_CUDATESTS_S:-80}" $PY -m pytest -q -rs tests/test_cuda_build.py -k "not compile"
# memcheck sees out-of-bounds accesses inside the caching allocator's blocks only when each
# tensor is its own allocation: PYTORCH_NO_CUDA_MEMORY_CACHING=1.
sanitize() {  # sanitize TOOL: the driver under compute-sanitizer, its log in $OUTDIR
    local log="$OUTDIR/sanitizer_$1.log" rc
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$1" --error-exitcode 3 \
        --print-limit 20 $PY benchmarks/sanitize_kernels.py > "$log" 2>&1
    rc=$?
    tail -n 25 "$log"
    if [ $rc -eq 0 ] && ! grep -q "sanitize driver done: 0 failed" "$log"; then rc=4; fi
    return $rc
}
if [ -n "$SANITIZER" ]; then
    export -f sanitize
    export SANITIZER OUTDIR PY
    run_step "compute-sanitizer memcheck (every kernel)" "${DEVICE_CHECK_MEMCHECK_S:-45}" \
        bash -c "sanitize memcheck"
    run_step "compute-sanitizer racecheck (every kernel)" "${DEVICE_CHECK_RACECHECK_S:-45}" \
        bash -c "sanitize racecheck"
else
    SUMMARY+=("SKIP  compute-sanitizer (not found)")
fi
for script in benchmarks/gpu_*.py; do
    [ "$script" = "benchmarks/gpu_kernels_bench.py" ] && continue
    run_step "$(basename "$script")" "${DEVICE_CHECK_OTHER_S:-60}" env OUT="$OUTDIR" $PY "$script"
done
run_step "Triton tests on CUDA: tests/test_triton_backend.py" "${DEVICE_CHECK_TRITONTESTS_S:-300}" \
    $PY -m pytest -x -q tests/test_triton_backend.py
finish
