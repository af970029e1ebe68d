"""Time one ProGrad-SGD optimizer step per backend on the DESIGN.md section 2 scenarios.

On CUDA: CoOp 16x512, 27 tensors / 3.6M (MaPLe-like), one 8.2M tensor, dense 64M and 256M,
fp32, for every available backend (torch reference, triton, cuda) and for the peers of
``peers.py`` (the official per-tensor loop ``paper_style``, no-sync ``foreach``, ``compile``
of the reference, ``torch_sgd``: ``torch.optim.SGD(fused=True)`` alone, no ProGrad); the cuda
backend also with each launch plan forced.  Per implementation: median wall time of one step in a loop (host clock,
synchronised once around the loop) and the CUDA-event time of the same loop divided by the
step count (it includes GPU idle gaps, so it approaches the wall time when the host is the
bottleneck and the kernel time when the GPU is).  Also a measured device-to-device copy bandwidth and the 32 B/element floor.
On a CPU (no CUDA device): 1M and 16M element groups plus CoOp and MaPLe, for the torch
reference, a no-sync ``torch._foreach`` version, the C++ backend and ``torch.optim.SGD``
(foreach); the ratio reference / cpp is printed.

Prints one markdown table; writes JSON to ``$OUT/gpu_kernels_bench.json`` when ``OUT`` is
set.  ``--quick`` runs fewer iterations (smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import prograd_fast
from prograd_fast.backends import available_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (benchmarks/peers.py: the implementations a user could run instead)

HYPER = dict(lr=0.002, momentum=0.9, weight_decay=5e-4, lam=1.0)
PLAN_NAMES = {1: "small", 2: "coop", 3: "two_pass"}


def maple_shapes() -> list[tuple[int, ...]]:
    """27 tensors, 3.56M elements: text context + 8 deeper prompts + 9 (768x512 + 768)."""
    shapes = [(2, 512)] * 9
    for _ in range(9):
        shapes += [(768, 512), (768,)]
    return shapes


GPU_SCENARIOS = {
    "coop 16x512": [(16, 512)],
    "maple 27 / 3.6M": maple_shapes(),
    "classctx 8.2M": [(1000, 16, 512)],
    "dense 64M": [(64 * 2**20,)],
    "dense 256M": [(256 * 2**20,)],
}
CPU_SCENARIOS = {
    "coop 16x512": [(16, 512)],
    "maple 27 / 3.6M": maple_shapes(),
    "dense 1M": [(2**20,)],
    "dense 16M": [(16 * 2**20,)],
}


def make_group(shapes, device, dtype=torch.float32, seed=0):
    """Params, domain grads and general grads with a conflict in every tensor."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ps, ds, gs = [], [], []
    for shape in shapes:
        g = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        d = torch.randn(shape, generator=gen, device=device, dtype=dtype).add_(g, alpha=-0.5)
        ps.append(torch.randn(shape, generator=gen, device=device, dtype=dtype))
        ds.append(d)
        gs.append(g)
    return ps, ds, gs


class ProGradRunner:
    """ProGradSGD on one backend, called as a training loop does; ``plan`` forces a CUDA
    launch plan (PROGRAD_FAST_CUDA_PLAN) for the duration of each step."""

    def __init__(self, backend, ps, ds, gs, granularity, plan=None):
        self.opt = prograd_fast.ProGradSGD(ps, granularity=granularity, backend=backend, **HYPER)
        self.gs, self.plan = gs, plan
        for p, d in zip(ps, ds):
            p.grad = d

    def __call__(self):
        saved = os.environ.get("PROGRAD_FAST_CUDA_PLAN")
        if self.plan:
            os.environ["PROGRAD_FAST_CUDA_PLAN"] = self.plan
        try:
            self.opt.store_general_grads(self.gs)
            self.opt.step()
        finally:
            if self.plan:
                if saved is None:
                    os.environ.pop("PROGRAD_FAST_CUDA_PLAN", None)
                else:
                    os.environ["PROGRAD_FAST_CUDA_PLAN"] = saved


class ForeachRunner:
    """A no-sync torch._foreach ProGrad step (per-tensor dots, device-side mask), foreach SGD."""

    def __init__(self, ps, ds, gs, granularity):
        self.ps, self.ds, self.gs, self.gran = ps, ds, gs, granularity
        self.opt = torch.optim.SGD(ps, lr=HYPER["lr"], momentum=HYPER["momentum"],
                                   weight_decay=HYPER["weight_decay"], foreach=True)

    def __call__(self):
        ds, gs = self.ds, self.gs
        dots = torch.stack([torch.dot(d.reshape(-1), g.reshape(-1)) for d, g in zip(ds, gs)])
        nns = torch.stack(torch._foreach_norm(gs)).square()
        if self.gran == "global":
            dots, nns = dots.sum(), nns.sum()
        conflict = (dots < 0) & (nns > 0)
        coef = torch.where(conflict, HYPER["lam"] * dots / torch.where(conflict, nns, 1.0), 0.0)
        scale = coef if self.gran == "global" else list(coef.unbind())
        us = torch._foreach_sub(ds, torch._foreach_mul(gs, scale))
        for p, u in zip(self.ps, us):
            p.grad = u
        self.opt.step()


class SGDRunner:
    """torch.optim.SGD alone on the domain gradient (fused on CUDA, foreach on a CPU)."""

    def __init__(self, ps, ds, fused):
        kw = {"fused": True} if fused else {"foreach": True}
        self.opt = torch.optim.SGD(ps, lr=HYPER["lr"], momentum=HYPER["momentum"],
                                   weight_decay=HYPER["weight_decay"], **kw)
        for p, d in zip(ps, ds):
            p.grad = d

    def __call__(self):
        self.opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runner(fn, device, budget_s, quick, warmup=3, rounds=5):
    """(median wall us per step, median device us per step or None, iterations per round).

    Iterations per round follow the measured cost of one step, so slow peers stay cheap."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = time.perf_counter() - t0
    iters = 3 if quick else int(max(3, min(500, budget_s / max(one, 1e-6))))
    walls, devs = [], []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            end.record()
        sync(device)
        walls.append((time.perf_counter() - t0) / iters * 1e6)
        if device.type == "cuda":
            devs.append(start.elapsed_time(end) / iters * 1e3)
    return statistics.median(walls), (statistics.median(devs) if devs else None), iters


def paired_ratios(shapes, device, granularity, rounds=15):
    """Median over rounds of (reference step time / cpp step time) and (foreach / cpp), the
    three steps timed back to back in each round."""
    if available_backends().get("cpp"):
        return None
    ref = ProGradRunner("torch", *make_group(shapes, device), granularity)
    cpp = ProGradRunner("cpp", *make_group(shapes, device), granularity)
    fe = ForeachRunner(*make_group(shapes, device), granularity)
    for fn in (ref, cpp, fe):
        fn()
        fn()
    r_ref, r_fe = [], []
    for _ in range(rounds):
        times = []
        for fn in (ref, cpp, fe):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        r_ref.append(times[0] / times[1])
        r_fe.append(times[2] / times[1])
    return dict(reference_over_cpp=statistics.median(r_ref),
                foreach_over_cpp=statistics.median(r_fe), rounds=rounds)


def copy_bandwidth(device, elements=64 * 2**20):
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(elements, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    n = 20 if device.type == "cuda" else 3
    for _ in range(n):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 4 * n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    ap.add_argument("--granularity", default="tensor", choices=("tensor", "global"))
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scenarios = GPU_SCENARIOS if device.type == "cuda" else CPU_SCENARIOS
    reasons = available_backends()
    backends = [b for b in (("torch", "triton", "cuda") if device.type == "cuda" else ("torch", "cpp"))]
    bw = copy_bandwidth(device)
    rows, results = [], []
    for scen, shapes in scenarios.items():
        elements = sum(math.prod(s) for s in shapes)
        floor_us = 32 * elements / bw * 1e6
        impls = {}
        for b in backends:
            impls[f"prograd_fast-{b}"] = (lambda b=b: ProGradRunner(b, *make_group(shapes, device), args.granularity))
            if b == "cuda":  # each launch plan on its own (a refused plan shows as n/a)
                for plan in ("small", "coop", "two_pass"):
                    if plan == "small" and elements > 16384:  # kSmallMax
                        continue
                    impls[f"prograd_fast-cuda[{plan}]"] = (lambda plan=plan: ProGradRunner(
                        "cuda", *make_group(shapes, device), args.granularity, plan=plan))
        if device.type == "cpu":
            impls["foreach (torch, no sync)"] = lambda: ForeachRunner(*make_group(shapes, device), args.granularity)
            impls["torch SGD foreach alone"] = (
                lambda: SGDRunner(*make_group(shapes, device)[:2], fused=False))
        else:
            for peer in peers.PEERS:  # paper_style, foreach, compile, torch_sgd
                impls[peer] = (lambda peer=peer: peers.build(peer, peers.make_problem(
                    shapes, device, granularity=args.granularity, hyper=HYPER)).step)
        for name, make in impls.items():
            backend = name.split("-", 1)[1].split("[")[0] if name.startswith("prograd_fast-") else None
            if backend and reasons.get(backend):
                results.append(dict(scenario=scen, impl=name, skipped=reasons[backend]))
                continue
            try:
                runner = make()
                wall, dev, iters = time_runner(
                    runner, device, budget_s=0.02 if device.type == "cuda" else 0.1,
                    quick=args.quick, rounds=5 if device.type == "cuda" else 3)
            except Exception as exc:  # report, keep going
                results.append(dict(scenario=scen, impl=name, error=f"{type(exc).__name__}: {exc}"))
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if isinstance(runner, ProGradRunner) and backend == "cuda":
                plan = runner.opt._backend_cache[0].get("cuda", {}).get("plan")
                name = f"{name} plan={PLAN_NAMES.get(plan, plan)}" if "[" not in name else name
            results.append(dict(scenario=scen, impl=name, tensors=len(shapes), elements=elements,
                                wall_us=wall, device_us=dev, floor_us=floor_us, iters=iters))
    print(f"\n## ProGrad-SGD step, {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}),"
          f" fp32, granularity={args.granularity}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s (read+write); floor = 32 B/elem at that rate\n")
    print("| scenario | implementation | wall us/step | device us/step | floor us | wall/floor |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "wall_us" in r:
            dev = f"{r['device_us']:.1f}" if r["device_us"] is not None else "-"
            print(f"| {r['scenario']} | {r['impl']} | {r['wall_us']:.1f} | {dev} | {r['floor_us']:.1f} | {r['wall_us'] / r['floor_us']:.2f} |")
        else:
            why = r.get("skipped") or r.get("error")
            print(f"| {r['scenario']} | {r['impl']} | n/a: {why[:80]} | | | |")
    if device.type == "cpu":
        print("\npaired (one step of each, alternating; median of per-round ratios: robust to load"
              " drift on a shared machine):")
        threads = torch.get_num_threads()
        # Also with one thread everywhere: torch.dot (MKL) on a busy machine with several
        # threads can take milliseconds, which flatters the kernel; one thread removes that.
        for n_threads in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n_threads)
            try:
                for scen in ("dense 1M", "dense 16M"):
                    ratios = paired_ratios(scenarios[scen], device, args.granularity,
                                           rounds=5 if args.quick else 15)
                    if ratios is None:
                        continue
                    results.append(dict(scenario=scen, impl=f"paired ratios, {n_threads} threads",
                                        **ratios))
                    print(f"{scen}, {n_threads} thread(s): reference / cpp ="
                          f" {ratios['reference_over_cpp']:.2f}x, foreach / cpp ="
                          f" {ratios['foreach_over_cpp']:.2f}x")
            finally:
                torch.set_num_threads(threads)
        print("\nfrom the table:")
        for scen in scenarios:
            ref = next((r for r in results if r["scenario"] == scen and r["impl"] == "prograd_fast-torch" and "wall_us" in r), None)
            fe = next((r for r in results if r["scenario"] == scen and r["impl"].startswith("foreach") and "wall_us" in r), None)
            cpp = next((r for r in results if r["scenario"] == scen and r["impl"] == "prograd_fast-cpp" and "wall_us" in r), None)
            if ref and cpp:
                extra = f", foreach / cpp = {fe['wall_us'] / cpp['wall_us']:.2f}x" if fe else ""
                print(f"{scen}: reference / cpp = {ref['wall_us'] / cpp['wall_us']:.2f}x{extra}")
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_kernels_bench.json"
        try:
            import triton
            triton_version = triton.__version__
        except Exception:  # noqa: BLE001 - optional
            triton_version = None
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        path.write_text(json.dumps(dict(device=str(device), device_name=name,
                                        torch=torch.__version__, triton=triton_version,
                                        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        bandwidth_Bps=bw, granularity=args.granularity,
                                        results=results), indent=1))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
