"""Run every GPU kernel of prograd_fast once on small, awkward groups: the program that
``benchmarks/device_check.sh`` runs under compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py
    python benchmarks/sanitize_kernels.py --dry-run    # no GPU: the list, and the Triton
                                                       # cases in the interpreter

Kernels: Triton single-program (one tensor; a table of misaligned views), reduce + update
(one tensor; a table), each with a first-step momentum buffer and then an existing one, AMP
unscaling and a skipped step; CUDA small, cooperative and two-pass plans on the same groups.
Every case is checked against the float64-free reference (``torch``) with a loose tolerance,
so a kernel that read garbage under the sanitizer fails here too.  Prints
``sanitize driver done`` at the end (the shell script looks for it).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def groups() -> dict:
    """name -> (shapes, element offsets of the domain gradients in their buffers; the CUDA
    kernels take misaligned tensors through their scalar path, Triton per tensor)."""
    return {
        "one tensor": ([(1000,)], [0]),
        "table, misaligned views": ([(33,), (1, 7), (2049,), (64,)], [1, 0, 3, 0]),
        "two launches, one tensor": ([(70_001,)], [0]),
        "two launches, table": ([(40_000,), (5,), (33_000,)], [0, 1, 0]),
    }


def make(shapes, offsets, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps, ds, gs = [], [], []
    for shape, off in zip(shapes, offsets):
        n = int(torch.tensor(shape).prod())
        p = torch.randn(shape, generator=gen)
        buf = torch.randn(n + 8, generator=gen)
        d = buf[off:off + n].view(shape)
        g = -0.5 * d + 0.1 * torch.randn(shape, generator=gen)
        ps.append(p.to(device))
        ds.append(_misaligned(d, off, device) if off else d.contiguous().to(device))
        gs.append(g.to(device))
    return ps, ds, gs


def _misaligned(t, off, device):
    """``t`` on ``device`` starting ``off`` elements into a fresh buffer (not 16-byte aligned)."""
    buf = torch.empty(t.numel() + 8, device=device, dtype=t.dtype)
    view = buf[off:off + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def run_case(backend, ps, ds, gs, plan=None, amp=False, skip=False):
    from prograd_fast.backends import GroupStep, get_backend
    from prograd_fast.functional import prograd_sgd

    if plan is not None:
        os.environ["PROGRAD_FAST_CUDA_PLAN"] = plan
    device = ps[0].device
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, granularity="tensor")
    if amp:
        kw.update(grad_scale=torch.ones(1, device=device),
                  found_inf=torch.full((1,), 1.0 if skip else 0.0, device=device))
    extra, bufs = {}, [None] * len(ps)
    ref_p, ref_b = [p.clone() for p in ps], [None] * len(ps)
    mine = [p.clone() for p in ps]
    be = get_backend(backend)
    for _ in range(2):  # new buffers, then existing ones
        step = GroupStep(mine, ds, gs, bufs, extra=extra, **kw)
        reason = be.unsupported(step)
        if reason:
            return f"skipped: {reason}"
        be.step(step)
        prograd_sgd(ref_p, ds, gs, ref_b, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    for a, b in zip(mine, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    plan_used = extra.get("cuda", {}).get("plan")
    return "ok" + (f" (plan {plan_used})" if plan_used is not None else "")


def cases(device: str):
    names = ["triton"] + (["cuda"] if device == "cuda" else [])
    for backend in names:
        plans = ("small", "coop", "two_pass") if backend == "cuda" else (None,)
        for name, (shapes, offsets) in groups().items():
            for plan in plans:
                if plan == "small" and sum(int(torch.tensor(s).prod()) for s in shapes) > 50_000:
                    continue
                for amp, skip in ((False, False), (True, False), (True, True)):
                    yield backend, name, shapes, offsets, plan, amp, skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: list the cases and run the Triton ones in the interpreter")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device (use --dry-run)")
        return 2
    else:
        device = "cuda"
    failures = 0
    for backend, name, shapes, offsets, plan, amp, skip in cases(device):
        label = f"{backend:6} {name:26} plan={plan or '-':8} amp={amp!s:5} skip={skip!s:5}"
        if args.dry_run and max(int(torch.tensor(s).prod()) for s in shapes) > 5000:
            print(f"{label} (listed; too large for the interpreter)")
            continue
        try:
            ps, ds, gs = make(shapes, offsets, device)
            print(f"{label} {run_case(backend, ps, ds, gs, plan, amp, skip)}", flush=True)
        except Exception as exc:  # report every case, fail at the end
            failures += 1
            print(f"{label} FAILED: {type(exc).__name__}: {exc}", flush=True)
    os.environ.pop("PROGRAD_FAST_CUDA_PLAN", None)
    print(f"sanitize driver done: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
