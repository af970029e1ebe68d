"""Micro-benchmark of the Triton backend's step, per DESIGN.md section 2 scenario.

    python benchmarks/bench_triton_micro.py            # GPU: wall time per step (us)
    python benchmarks/bench_triton_micro.py --host     # any machine: host-side Python
                                                       # overhead with the launches stubbed

GPU mode times ``TritonBackend.step`` (fp32, momentum 0.9, weight decay, "global") with
CUDA events around N back-to-back steps (median of repeats) and the torch reference for
comparison.  ``--host`` replaces the kernel launchers with no-ops and times what is left
(validation, cache look-ups, argument packing): the floor the launch latency adds to.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SCENARIOS = {
    "coop_16x512": [(16, 512)],
    "maple_27x3.6M": [(2, 768)] * 24 + [(1000, 1188)] * 3,  # 27 tensors, 3.6M elements
    "one_8.2M": [(1000, 16, 512)],
    "dense_64M": [(64 * 2**20,)],
    "dense_256M": [(256 * 2**20,)],
}


def make(shapes, device):
    ps = [torch.randn(s, device=device) for s in shapes]
    ds = [torch.randn_like(p) for p in ps]
    gs = [-d * 0.5 + 0.1 * torch.randn_like(d) for d in ds]
    return ps, ds, gs


def group_step(ps, ds, gs, bufs, extra):
    from prograd_fast.backends import GroupStep
    return GroupStep(ps, ds, gs, bufs, lr=0.002, momentum=0.9, weight_decay=5e-4, extra=extra)


def bench_gpu(names, steps=50, repeats=5):
    from prograd_fast.backends.triton_backend import BACKEND
    from prograd_fast.functional import prograd_sgd
    print(f"{'scenario':16} {'tensors':>7} {'elements':>11} {'triton us':>10} {'torch us':>10}")
    for name in names:
        shapes = SCENARIOS[name]
        ps, ds, gs = make(shapes, "cuda")
        bufs, extra = [None] * len(ps), {}
        for _ in range(3):  # compile + first-step buffers + table
            BACKEND.step(group_step(ps, ds, gs, bufs, extra))
        rbufs = [b.clone() for b in bufs]

        def timed(fn):
            out = []
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(steps):
                    fn()
                end.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(end) * 1e3 / steps)
            return statistics.median(out)

        t_tr = timed(lambda: BACKEND.step(group_step(ps, ds, gs, bufs, extra)))
        t_ref = timed(lambda: prograd_sgd(ps, ds, gs, rbufs, lr=0.002, momentum=0.9,
                                          weight_decay=5e-4))
        n = sum(p.numel() for p in ps)
        print(f"{name:16} {len(ps):7d} {n:11d} {t_tr:10.1f} {t_ref:10.1f}", flush=True)
        del ps, ds, gs, bufs, rbufs, extra
        torch.cuda.empty_cache()


def bench_host(names, steps=2000):
    """Host overhead of one step with the launches stubbed out (CPU tensors, interpreter)."""
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from prograd_fast.backends import run_step
    from prograd_fast.backends.triton_backend import BACKEND
    from prograd_fast.kernels import prograd_sgd as k
    k.launch_fused = k.launch_reduce = k.launch_update = lambda *a, **kw: None
    print(f"{'scenario':16} {'tensors':>7} {'select+step us':>15} {'step only us':>13}")
    for name in names:
        shapes = [(min(8, s[0]),) for s in SCENARIOS[name]]  # sizes do not matter here
        ps, ds, gs = make(shapes, "cpu")
        bufs, extra = [None] * len(ps), {}
        for _ in range(3):
            BACKEND.step(group_step(ps, ds, gs, bufs, extra))
        t0 = time.perf_counter()
        for _ in range(steps):
            st = group_step(ps, ds, gs, bufs, extra)
            run_step("triton", st)
        t1 = time.perf_counter()
        for _ in range(steps):
            BACKEND.step(group_step(ps, ds, gs, bufs, extra))
        t2 = time.perf_counter()
        print(f"{name:16} {len(ps):7d} {(t1 - t0) / steps * 1e6:15.1f} "
              f"{(t2 - t1) / steps * 1e6:13.1f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="store_true", help="host overhead, launches stubbed")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    args = parser.parse_args()
    if args.host:
        bench_host(args.scenarios)
    elif torch.cuda.is_available():
        bench_gpu(args.scenarios)
    else:
        raise SystemExit("no CUDA device: use --host")


if __name__ == "__main__":
    main()
