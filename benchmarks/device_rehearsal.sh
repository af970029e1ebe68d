#!/usr/bin/env bash
# Rehearse benchmarks/device_check.sh without a GPU, on the GPU machine's software.
#
#   bash benchmarks/device_rehearsal.sh
#
# The GPU machine runs Python 3.12, torch 2.11.0+cu130, triton 3.6.0 and nvcc 13.0, has no
# package registry, and lacks open_clip_torch, ftfy and wcwidth.  This script
#  1. makes (once; cached in $REHEARSAL_CACHE, default ~/.cache/prograd_fast/rehearsal, outside
#     the repository) a Python 3.12 venv with torch==2.11.0 and triton==3.6.0 from the package
#     registry (a CUDA build: several GB) and the packages of the machine's image the check uses;
#  2. downloads the wheels the machine lacks into .whl/ (gitignored), as they travel there
#     with the device tool's `carry` argument;
#  3. copies the working tree (tracked and untracked-not-ignored files, and .whl/) to a
#     scratch folder, as the device tool does, with no prograd_fast installed and empty
#     build and wheel folders, as on a fresh machine;
#  4. runs `bash benchmarks/device_check.sh` there in rehearsal mode: the offline install from
#     the carried wheels, the editable install, the extension builds (nvcc here) in the same
#     order and time limits, every import and every script up to its first CUDA call, the
#     partial results and the VERDICT lines written to $OUT;
#  5. prints the check's summary, the files in $OUT and the wall time; exit status 0 when
#     every step passed or was rehearsed.
# Not run in CI (the download alone is several GB); CI keeps the plan-only dry run.
# The step limits are the GPU machine's (16 idle cores there): on a small, busy machine the
# three builds in parallel can pass the 150 s build limit (the CUDA extension alone is about
# 50 CPU-seconds), and the steps after it then run without the extensions;
# DEVICE_CHECK_BUILD_S=400 lets them finish here, so the later steps load them.
#
# Environment: REHEARSAL_CACHE, REHEARSAL_PYTHON (a python3.12; default: found on PATH or
# under pyenv), OUT (default $REHEARSAL_CACHE/out, emptied first), and device_check.sh's own.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
CACHE=${REHEARSAL_CACHE:-$HOME/.cache/prograd_fast/rehearsal}
TORCH=2.11.0 TRITON=3.6.0 TORCHVISION=0.26.0  # the GPU machine's versions
VENV=$CACHE/venv-py3.12-torch$TORCH-triton$TRITON
# What the GPU machine lacks (open_clip's needs that are not in its image), as wheels.
CARRIED=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
# Packages of the GPU machine's image that the check imports (installed here from the registry).
IMAGE=(numpy ninja setuptools wheel pytest pytest-benchmark hypothesis regex tqdm
       huggingface_hub safetensors timm filelock)
mkdir -p "$CACHE"

say() { echo "[rehearsal $(($(date +%s) - START))s] $*"; }

find_python() {
    [ -n "${REHEARSAL_PYTHON:-}" ] && { echo "$REHEARSAL_PYTHON"; return; }
    command -v python3.12 >/dev/null 2>&1 && python3.12 -c "" 2>/dev/null && { command -v python3.12; return; }
    for p in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
        [ -x "$p" ] && { echo "$p"; return; }
    done
    return 1
}

# 1. the venv with the GPU machine's versions
if ! "$VENV/bin/python" -c "import torch, triton, torchvision, pytest, ninja, setuptools, timm; assert torch.__version__.startswith('$TORCH') and triton.__version__ == '$TRITON'" 2>/dev/null; then
    PY312=$(find_python) || { echo "no python3.12 found: set REHEARSAL_PYTHON"; exit 2; }
    say "making $VENV with $PY312 (torch $TORCH: a download of several GB)"
    [ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV" || exit 2
    if ! "$VENV/bin/pip" index versions torch 2>/dev/null | grep -q "Available versions:.*\b$TORCH\b"; then
        echo "torch $TORCH is not available from this machine's package index (a cap?):"
        "$VENV/bin/pip" index versions torch 2>&1 | grep -v "^WARNING" | head -3
        exit 2
    fi
    "$VENV/bin/pip" install -q "torch==$TORCH" "triton==$TRITON" "torchvision==$TORCHVISION" \
        "${IMAGE[@]}" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || exit 2
fi
say "venv $VENV: $("$VENV/bin/python" -c "import sys, torch, triton; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}')")"

# 2. the wheels the GPU machine lacks, in .whl/ (gitignored; carried with `carry: [".whl"]`)
mkdir -p .whl
for spec in "${CARRIED[@]}"; do
    name=${spec%%==*} version=${spec##*==}
    if ! ls .whl/"${name}"-"${version}"-*.whl >/dev/null 2>&1; then
        say "downloading $spec into .whl/"
        "$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d .whl "$spec" 2>&1 \
            | grep -v "^WARNING: Location" || true
        ls .whl/"${name}"-"${version}"-*.whl >/dev/null 2>&1 || { echo "could not download $spec"; exit 2; }
    fi
done
say ".whl/: $(ls .whl | tr '\n' ' ')($(du -sh .whl | cut -f1))"

# 3. the tree as the device tool sends it, on a machine as fresh as the GPU machine
TREE=$CACHE/tree
rm -rf "$TREE" "$CACHE/site" "$CACHE/build"
mkdir -p "$TREE"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$TREE" 2>/dev/null
cp -r .whl "$TREE/.whl"
"$VENV/bin/pip" uninstall -q -y prograd_fast open_clip_torch ftfy wcwidth >/dev/null 2>&1
OUTDIR=${OUT:-$CACHE/out}
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR"
say "tree copied to $TREE; OUT=$OUTDIR"

# 4. the check, in rehearsal mode
t0=$(date +%s)
(cd "$TREE" && env PATH="$VENV/bin:$PATH" PYTHON="$VENV/bin/python" OUT="$OUTDIR" \
    DEVICE_CHECK_REHEARSAL=1 DEVICE_CHECK_SITE="$CACHE/site" PROGRAD_FAST_BUILD_DIR="$CACHE/build" \
    bash benchmarks/device_check.sh > "$CACHE/device_check.out" 2>&1)
rc=$?
secs=$(($(date +%s) - t0))

# 5. what came of it
echo
sed -n '/^=== summary/,$p' "$CACHE/device_check.out"
echo
echo "files in \$OUT ($(find "$OUTDIR" -type f | wc -l) of the 8 that come back):"
(cd "$OUTDIR" && find . -type f -printf '  %P %s B\n' | sort)
grep -h "^REHEARSAL STOP" "$CACHE/device_check.out" | sort | uniq -c | sed 's/^/  /'
bad=$(sed -n '/^=== summary/,$p' "$CACHE/device_check.out" | grep -cE '^  (FAIL|TIME|SKIP|KILLED)')
echo
echo "rehearsal: device_check.sh exit $rc, ${secs}s (budget ${DEVICE_CHECK_BUDGET_S:-450}s);" \
     "whole rehearsal $(($(date +%s) - START))s; full log $CACHE/device_check.out"
[ "$rc" -eq 0 ] && [ "$bad" -eq 0 ]
