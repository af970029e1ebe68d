"""The host path of two (or more) versions of prograd_fast, alternated in one run.

    git archive main | tar -x -C /tmp/old      # any tree with prograd_fast/, kernels/, csrc/
    PROGRAD_BENCH_THREADS=1 python benchmarks/host_versions.py old=/tmp/old new=. [--rounds 3]

Each version runs in its own process (a copy of its ``prograd_fast/`` with ``kernels/`` and
``csrc/`` linked in, first on ``sys.path``), timing what ``test_bench_host.py`` times:
``store_general_grads`` + ``step`` with the Triton backend and every launch stubbed, CPU
process time, median of 7 blocks of 3000 steps, per scenario.  The versions alternate
``--rounds`` times so that a shared machine's load falls on all of them alike; the table
gives every round and the ratio of the medians to the first version.  Each version builds
its own C host helper once, in a build folder of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from test_bench_host import SCENARIOS  # the scenarios of the benchmark (this directory)

CHILD = r"""
import json, os, statistics, sys, time
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
threads = os.environ.get("PROGRAD_BENCH_THREADS", "").strip()
if threads:
    torch.set_num_threads(int(threads))
import prograd_fast as pf
from prograd_fast.backends import triton_backend
assert pf.__file__.startswith(sys.argv[1]), pf.__file__
backend = triton_backend.BACKEND
assert backend.available() is None, backend.available()
backend._k.Launcher.__call__ = lambda self: None
out = {}
for name, shapes in json.loads(sys.argv[2]).items():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    generals = [-0.5 * p.grad for p in params]
    opt = pf.ProGradSGD(params, backend="triton", lr=0.002, momentum=0.9, weight_decay=5e-4)
    def step():
        opt.store_general_grads(generals)
        opt.step()
    for _ in range(300):
        step()
    blocks = []
    for _ in range(7):
        t0 = time.process_time()
        for _ in range(3000):
            step()
        blocks.append((time.process_time() - t0) / 3000 * 1e6)
    out[name] = statistics.median(blocks)
print(json.dumps(out))
"""


def stage(tree: Path, into: Path) -> Path:
    """A directory importing ``tree``'s package as installed (kernels and csrc inside)."""
    pkg = into / "prograd_fast"
    shutil.copytree(tree / "prograd_fast", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("kernels", "csrc"):
        if not (pkg / sub).exists():
            (pkg / sub).symlink_to((tree / sub).resolve(), target_is_directory=True)
    return into


def run_version(staged: Path) -> dict:
    # one extension build folder per version: the versions' host helpers share a name, so a
    # shared folder would rebuild the helper at every alternation
    env = dict(os.environ, PYTHONPATH=str(staged),
               PROGRAD_FAST_BUILD_DIR=str(staged.parent / f"{staged.name}-build"))
    # cwd: the staged tree, so that ``python -c``'s sys.path[0] is not a checkout
    shapes = json.dumps({name: shapes for name, (shapes, _) in SCENARIOS.items()})
    done = subprocess.run([sys.executable, "-c", CHILD, str(staged), shapes], env=env, cwd=staged,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("versions", nargs="+", help="NAME=PATH of a source tree")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    names, trees = zip(*(v.split("=", 1) for v in args.versions))
    results: dict = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        staged = [stage(Path(t).resolve(), Path(tmp) / n) for n, t in zip(names, trees)]
        for _ in range(args.rounds):
            for name, where in zip(names, staged):
                results[name].append(run_version(where))
    scenarios = list(results[names[0]][0])
    first = {s: statistics.median(r[s] for r in results[names[0]]) for s in scenarios}
    print(f"| scenario | {' | '.join(f'{n} (us/step)' for n in names)} | "
          f"{' | '.join(f'{names[0]} / {n}' for n in names[1:])} |")
    print("|---|" + "---:|" * (2 * len(names) - 1))
    for s in scenarios:
        cells = [" / ".join(f"{r[s]:.1f}" for r in results[n]) for n in names]
        ratios = [f"{first[s] / statistics.median(r[s] for r in results[n]):.1f}x"
                  for n in names[1:]]
        print(f"| {s} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
