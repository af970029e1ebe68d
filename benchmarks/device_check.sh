#!/usr/bin/env bash
# The single GPU check of prograd_fast: one call on a fresh GPU machine, at most 8 minutes
# (DEVICE_CHECK_BUDGET_S=450 s of steps, builds included, plus the summary).
#
#   bash benchmarks/device_check.sh                          # GPU machine (OUT=... keeps files)
#   DEVICE_CHECK_DRY_RUN=1 bash benchmarks/device_check.sh   # no GPU: the CI dry run
#   DEVICE_CHECK_PLAN_ONLY=1 bash benchmarks/device_check.sh # print the GPU steps (CI)
#   DEVICE_CHECK_REHEARSAL=1 bash benchmarks/device_check.sh # no GPU: every step up to its
#                                                  # first CUDA call (benchmarks/device_rehearsal.sh)
#
# Steps, most important first; each limit is an upper bound, cut to the budget left:
#   step                                                       limit  (env override)
#   1. versions: GPU, driver, python, torch, triton, nvcc, sanitizer   ~10 s
#   2. carried wheels .whl/*.whl -> $DEVICE_CHECK_SITE (no registry)    30 s  _WHEELS_S
#   3. the package itself, editable and offline                         60 s  _INSTALL_S
#   4. the C++, CUDA and host-helper extensions, built in parallel,
#      each in its own directory (sm_90 only); afterwards
#      PROGRAD_FAST_PREBUILT=1: no later step compiles one             150 s  _BUILD_S
#   5. benchmarks/gpu_kernels_bench.py: fused backends and torch's fused
#      SGD first (a VERDICT line per scenario as soon as it has its rows),
#      the peers, the compile peer last with the time left; each row to
#      $OUT/gpu_kernels_bench.jsonl as measured                         100 s  _BENCH_S
#   6. benchmarks/device_verdicts.py on what step 5 wrote (also after a
#      timeout): the VERDICT lines, BENCHMARKS.md's gpu-check section    15 s
#   7. tests/test_gpu_step_path.py (capture, streams, AMP, launcher)    90 s  _GPUTESTS_S
#   8. tests/test_cuda_build.py on the device (every plan, every dtype)  60 s  _CUDATESTS_S
#   9. compute-sanitizer memcheck, then racecheck, on every kernel    40+40 s  _MEMCHECK_S,
#      (benchmarks/sanitize_kernels.py)                                       _RACECHECK_S
#  10. the other benchmarks/gpu_*.py scripts (hardening, end to end,
#      shared prefix, one ProGrad step of every prompt learner with rows
#      in $OUT/gpu_learners.jsonl; the end-to-end ones need open_clip
#      from .whl/)                                                   45 s each _OTHER_S
#  11. with the time left: tests/test_triton_backend.py on CUDA        the rest _TRITONTESTS_S
# (overrides are DEVICE_CHECK_<NAME>, e.g. DEVICE_CHECK_BUILD_S.)  Every step prints its
# outcome line as it ends; the log, the VERDICT lines and the bench rows are in $OUT from the
# moment they exist (at most 8 files come back from the GPU machine: device_check.log,
# verdicts.txt, gpu_kernels_bench.jsonl/.json, BENCHMARKS.md, sanitizer.log (both tools),
# gpu_learners.jsonl: 7, one to spare),
# so a call cut short still returns its numbers.  The summary and the VERDICT lines are printed
# last (also on SIGTERM).  Exit status 0 when every step passed.
#
# Without a CUDA device (or with DEVICE_CHECK_DRY_RUN=1) it checks its own pieces on the CPU
# (the sanitizer driver in the Triton interpreter, the verdict script) and prints one
# "VERDICT NOT RUN ...: no CUDA device" line per target.  Plan-only walks the GPU steps without
# running them (each command printed, inline Python syntax-checked): CI uses it so that the
# GPU run does not meet a typo first.  Rehearsal runs every GPU step for real on a machine
# without a GPU, each Python process stopped at its first CUDA call (benchmarks/rehearsal/
# sitecustomize.py; the step reads "rehearsed"); compute-sanitizer is left out, and the Triton
# kernels are compiled for sm_90 (no launch) with the machine's triton after the builds.
#
# Environment: PYTHON (default python3), OUT (logs, JSON, BENCHMARKS.md), DEVICE_CHECK_SITE
# (where carried wheels go, default /tmp/site), PROGRAD_FAST_BUILD_DIR (default
# /tmp/prograd_fast_build).  Carry wheels a test or benchmark needs and the machine lacks
# (open_clip_torch, ftfy, wcwidth) in .whl/: benchmarks/device_rehearsal.sh downloads them.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
START=$(date +%s)
DRY=${DEVICE_CHECK_DRY_RUN:-0}
PLAN_ONLY=${DEVICE_CHECK_PLAN_ONLY:-0}
REHEARSAL=${DEVICE_CHECK_REHEARSAL:-0}
OUTDIR=${OUT:-$(mktemp -d /tmp/device_check.XXXXXX)}
SITE=${DEVICE_CHECK_SITE:-/tmp/site}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PROGRAD_FAST_CUDA_ARCHS=${PROGRAD_FAST_CUDA_ARCHS:-90}
export PROGRAD_FAST_BUILD_DIR=${PROGRAD_FAST_BUILD_DIR:-/tmp/prograd_fast_build}
BUILD_S=${DEVICE_CHECK_BUILD_S:-150}
# A build lock older than the build limit was left by a killed build (torch < 2.14).
export PROGRAD_FAST_BUILD_LOCK_STALE_S=${PROGRAD_FAST_BUILD_LOCK_STALE_S:-$BUILD_S}
REHEARSAL_STOP=86  # benchmarks/rehearsal/sitecustomize.py: stopped before the first CUDA call
if [ "$REHEARSAL" != "0" ]; then
    export PROGRAD_FAST_REHEARSAL=1
    export PYTHONPATH=$PWD/benchmarks/rehearsal${PYTHONPATH:+:$PYTHONPATH}
    PROGRAD_FAST_REHEARSAL_STOPS=$(mktemp /tmp/rehearsal_stops.XXXXXX)  # where each stopped
    export PROGRAD_FAST_REHEARSAL_STOPS
fi
SUMMARY=()
VERDICTS="$OUTDIR/verdicts.txt"
BENCH_ROWS="$OUTDIR/gpu_kernels_bench.jsonl"
FAILED=0
exec > >(tee -a "$OUTDIR/device_check.log") 2>&1

left() { echo $((BUDGET - ($(date +%s) - START))); }

note() {  # note LINE: one outcome, in the summary and in the log at once
    SUMMARY+=("$1")
    echo "--- $1"
}

# run_step NAME LIMIT_S CMD...: run under min(LIMIT, time left - 5), record the outcome.
run_step() {
    local name=$1 limit=$2
    shift 2
    local remain
    remain=$(($(left) - 5))
    if [ "$remain" -lt 10 ]; then
        note "SKIP  $name (budget of ${BUDGET}s spent)"
        FAILED=1
        return 1
    fi
    [ "$limit" -gt "$remain" ] && limit=$remain
    echo
    echo "=== $name (limit ${limit}s, $(left)s left)"
    if [ "$PLAN_ONLY" != "0" ]; then  # print, and check inline Python (a here-document)
        echo "would run: $*"
        if [ "$*" = "$PY -" ]; then
            $PY -c "import ast, sys; ast.parse(sys.stdin.read())" || { note "FAIL  $name (inline Python does not parse)"; FAILED=1; return 1; }
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
        note "ok    $name (${secs}s)"
    elif [ "$REHEARSAL" != "0" ] && [ $rc -eq $REHEARSAL_STOP ]; then
        local where
        where=$(tail -n 1 "$PROGRAD_FAST_REHEARSAL_STOPS" | sed 's/.*CUDA call: //')
        note "rehearsed $name (stopped at its first CUDA call, ${where#"$PWD/"}, after ${secs}s)"
        : > "$PROGRAD_FAST_REHEARSAL_STOPS"
        rc=0
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note "TIME  $name (killed after ${secs}s)"
        FAILED=1
    else
        note "FAIL  $name (rc=$rc, ${secs}s)"
        FAILED=1
    fi
    return $rc
}

finish() {
    trap - TERM INT
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
trap 'note "KILLED (signal) after $(($(date +%s) - START))s"; FAILED=1; finish' TERM INT

echo "=== versions ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
[ "$REHEARSAL" != "0" ] && echo "REHEARSAL: each Python process stops at its first CUDA call"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
else
    echo "nvidia-smi: not found"
fi
timeout 60 $PY - <<'EOF'
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
    run_step "carried wheels (.whl/, offline)" "${DEVICE_CHECK_WHEELS_S:-30}" \
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl \
        && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import prograd_fast.kernels, prograd_fast.csrc" >/dev/null 2>&1; then
    run_step "install prograd_fast (editable, offline)" "${DEVICE_CHECK_INSTALL_S:-60}" \
        $PY -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi

if [ "$REHEARSAL" = "0" ] && { [ "$DRY" != "0" ] || [ "$HAS_CUDA" != "1" ]; }; then
    # The pieces the GPU run relies on, checked here so its minutes are not lost to a typo.
    run_step "sanitizer driver (dry run, Triton interpreter)" 120 \
        env TRITON_INTERPRET=1 $PY benchmarks/sanitize_kernels.py --dry-run
    run_step "verdicts (no device)" 30 $PY benchmarks/device_verdicts.py --no-device \
        > "$VERDICTS"
    echo
    echo "no CUDA device: dry run (the GPU steps were not run)"
    finish
fi

# Builds happen here, once, before any timed step: three processes, one directory each.
run_step "build C++, CUDA and host-helper extensions (in parallel)" "$BUILD_S" $PY - <<'EOF'
import subprocess, sys
code = """
import sys, time
from prograd_fast import _ext
t = time.perf_counter()
reason = _ext.unavailable_reason(sys.argv[1])
print(f"{sys.argv[1]} extension: {'ok' if reason is None else 'UNAVAILABLE: ' + reason}"
      f" ({time.perf_counter() - t:.0f} s, in {_ext.build_directory(sys.argv[1])})", flush=True)
sys.exit(reason is not None)
"""
procs = [subprocess.Popen([sys.executable, "-c", code, kind]) for kind in ("cuda", "cpu", "host")]
sys.exit(max(p.wait() for p in procs))
EOF
export PROGRAD_FAST_PREBUILT=1  # from here on an extension that did not build is unavailable
if [ "$REHEARSAL" != "0" ]; then  # no kernel launches here: compile the Triton kernels instead
    run_step "rehearsal: Triton kernels compile for sm_90 with this triton (no launch)" 60 \
        $PY -m pytest -q -p no:cacheprovider tests/test_triton_backend.py -k compile_for_sm90
fi

BENCH_S=${DEVICE_CHECK_BENCH_S:-100}
run_step "time the fused backends, torch's fused SGD, the peers: benchmarks/gpu_kernels_bench.py" \
    "$BENCH_S" env OUT="$OUTDIR" GPU_BENCH_BUDGET_S=$((BENCH_S - 15)) \
    $PY benchmarks/gpu_kernels_bench.py
if [ -s "$BENCH_ROWS" ] || [ "$PLAN_ONLY" != "0" ]; then  # also after a timeout: the rows so far
    run_step "verdicts and BENCHMARKS.md gpu-check section" 15 $PY benchmarks/device_verdicts.py \
        "$BENCH_ROWS" --write BENCHMARKS.md > "$VERDICTS"
    cat "$VERDICTS"
    [ "$PLAN_ONLY" = "0" ] && cp BENCHMARKS.md "$OUTDIR/BENCHMARKS.md"
fi
run_step "GPU tests: tests/test_gpu_step_path.py" "${DEVICE_CHECK_GPUTESTS_S:-90}" \
    $PY -m pytest -q -rs tests/test_gpu_step_path.py
run_step "CUDA kernel tests: tests/test_cuda_build.py (every plan)" \
    "${DEVICE_CHECK_CUDATESTS_S:-60}" $PY -m pytest -q -rs tests/test_cuda_build.py -k "not compile"
# memcheck sees out-of-bounds accesses inside the caching allocator's blocks only when each
# tensor is its own allocation: PYTORCH_NO_CUDA_MEMORY_CACHING=1.
sanitize() {  # sanitize TOOL: the driver under compute-sanitizer, appended to $OUTDIR/sanitizer.log
    local log rc
    log=$(mktemp)
    if [ "$REHEARSAL" != "0" ]; then  # no GPU for the tool: the driver alone, up to CUDA
        echo "rehearsal: compute-sanitizer $1 left out, the driver runs alone"
        $PY benchmarks/sanitize_kernels.py > "$log" 2>&1
        rc=$?
        tail -n 5 "$log"
    else
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$1" --error-exitcode 3 \
            --print-limit 20 $PY benchmarks/sanitize_kernels.py > "$log" 2>&1
        rc=$?
        tail -n 25 "$log"
        if [ $rc -eq 0 ] && ! grep -q "sanitize driver done: 0 failed" "$log"; then rc=4; fi
    fi
    { echo "=== compute-sanitizer $1 (exit $rc)"; cat "$log"; } >> "$OUTDIR/sanitizer.log"
    rm -f "$log"
    return $rc
}
if [ -n "$SANITIZER" ] || [ "$REHEARSAL" != "0" ]; then
    export -f sanitize
    export SANITIZER OUTDIR PY REHEARSAL
    run_step "compute-sanitizer memcheck (every kernel)" "${DEVICE_CHECK_MEMCHECK_S:-40}" \
        bash -c "sanitize memcheck"
    run_step "compute-sanitizer racecheck (every kernel)" "${DEVICE_CHECK_RACECHECK_S:-40}" \
        bash -c "sanitize racecheck"
else
    note "SKIP  compute-sanitizer (not found)"
fi
for script in benchmarks/gpu_*.py; do
    [ "$script" = "benchmarks/gpu_kernels_bench.py" ] && continue
    args=()
    [ "$script" = "benchmarks/gpu_hardening.py" ] && args=(--skip-sanitizer)  # step 9 did it
    run_step "$(basename "$script")" "${DEVICE_CHECK_OTHER_S:-45}" env OUT="$OUTDIR" \
        $PY "$script" "${args[@]}"
done
run_step "Triton tests on CUDA: tests/test_triton_backend.py" "${DEVICE_CHECK_TRITONTESTS_S:-300}" \
    $PY -m pytest -x -q tests/test_triton_backend.py
finish
