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

Order (a timeout keeps what came first): the fused backends and torch's fused SGD on every
scenario (each scenario's VERDICT line printed as soon as its rows exist), then the
reference, the forced plans and the peers, and last the ``compile`` peer (a cold Inductor
compile each), only while ``--budget-s`` leaves ``--compile-reserve-s``.  Each row is printed
(markdown) and appended to ``$OUT/gpu_kernels_bench.jsonl`` (flushed to disk) as soon as it is
measured; the whole run also goes to ``$OUT/gpu_kernels_bench.json`` at the end.
``--quick`` runs fewer iterations (smoke test); ``--plan`` prints the order and exits.
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
import device_verdicts  # noqa: E402  (the targets and the bytes each plan moves)
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


PHASES = ("fused", "others", "compile")  # the order rows are measured in


def implementations(shapes, device, granularity) -> dict:
    """name -> (phase, factory) for one scenario: the fused backends and torch's fused SGD
    (what the verdicts compare) first, then the reference, forced plans and peers, then the
    compile peer (cold Inductor compiles: only with the time left)."""
    elements = sum(math.prod(s) for s in shapes)
    impls = {}

    def progr(b, plan=None):
        return lambda: ProGradRunner(b, *make_group(shapes, device), granularity, plan=plan)

    def peer(name):
        return lambda: peers.build(name, peers.make_problem(
            shapes, device, granularity=granularity, hyper=HYPER)).step

    if device.type == "cuda":
        impls["prograd_fast-triton"] = ("fused", progr("triton"))
        impls["prograd_fast-cuda"] = ("fused", progr("cuda"))
        impls["torch_sgd"] = ("fused", peer("torch_sgd"))
        impls["prograd_fast-torch"] = ("others", progr("torch"))
        for plan in ("small", "coop", "two_pass"):  # each plan on its own (refused: n/a)
            if plan == "small" and elements > 16384:  # kSmallMax
                continue
            impls[f"prograd_fast-cuda[{plan}]"] = ("others", progr("cuda", plan))
        for name in peers.PEERS:
            if name not in impls:
                impls[name] = ("compile" if name == "compile" else "others", peer(name))
    else:
        impls["prograd_fast-cpp"] = ("fused", progr("cpp"))
        impls["prograd_fast-torch"] = ("others", progr("torch"))
        impls["foreach (torch, no sync)"] = ("others", lambda: ForeachRunner(
            *make_group(shapes, device), granularity))
        impls["torch SGD foreach alone"] = ("others", lambda: SGDRunner(
            *make_group(shapes, device)[:2], fused=False))
    return impls


def plan(scenarios, device, granularity) -> list[tuple[str, str, str, object]]:
    """(phase, scenario, implementation, factory) in the order they are measured."""
    rows = []
    for phase in PHASES:
        for scen, shapes in scenarios.items():
            for name, (p, make) in implementations(shapes, device, granularity).items():
                if p == phase:
                    rows.append((phase, scen, name, make))
    return rows


class RowWriter:
    """Each result as it is measured: a markdown row on stdout and a JSON line in
    ``$OUT/gpu_kernels_bench.jsonl``, flushed to disk, so a killed run keeps its numbers."""

    def __init__(self, out: str | None, meta: dict):
        self.rows: list[dict] = []
        self.path = Path(out) / "gpu_kernels_bench.jsonl" if out else None
        self._file = open(self.path, "w") if self.path else None
        self.meta(meta)

    def meta(self, facts: dict) -> None:
        """Facts about the run (several lines add up), written before what needs the GPU."""
        self._write(dict(meta=facts))

    def header(self) -> None:
        print("| scenario | implementation | wall us/step | device us/step | floor us "
              "| wall/floor |")
        print("|---|---|---|---|---|---|", flush=True)

    def _write(self, item: dict) -> None:
        if self._file:
            self._file.write(json.dumps(item) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._write(row)
        if "wall_us" in row:
            dev = f"{row['device_us']:.1f}" if row["device_us"] is not None else "-"
            print(f"| {row['scenario']} | {row['impl']} | {row['wall_us']:.1f} | {dev} | "
                  f"{row['floor_us']:.1f} | {row['wall_us'] / row['floor_us']:.2f} |", flush=True)
        else:
            why = row.get("skipped") or row.get("error")
            print(f"| {row['scenario']} | {row['impl']} | n/a: {why[:80]} | | | |", flush=True)

    def close(self) -> None:
        if self._file:
            self._file.close()


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def measure(make, name, scen, shapes, device, reasons, quick, bw) -> dict:
    """One implementation on one scenario: a result row (times, or why it did not run)."""
    elements = sum(math.prod(s) for s in shapes)
    backend = name.split("-", 1)[1].split("[")[0] if name.startswith("prograd_fast-") else None
    if backend and reasons.get(backend):
        return dict(scenario=scen, impl=name, skipped=reasons[backend])
    try:
        runner = make()
        wall, dev, iters = time_runner(
            runner, device, budget_s=0.02 if device.type == "cuda" else 0.1,
            quick=quick, rounds=5 if device.type == "cuda" else 3)
    except Exception as exc:  # report, keep going
        return dict(scenario=scen, impl=name, error=f"{type(exc).__name__}: {exc}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if isinstance(runner, ProGradRunner) and backend == "cuda" and "[" not in name:
        try:  # the plan the backend chose (internal state: never let it end the run)
            chosen = runner.opt._backend_cache[0].get("cuda", {}).get("plan")
        except Exception:  # noqa: BLE001
            chosen = "?"
        name = f"{name} plan={PLAN_NAMES.get(chosen, chosen)}"
    floor = device_verdicts.bytes_per_element(name) * elements / bw * 1e6
    return dict(scenario=scen, impl=name, tensors=len(shapes), elements=elements, wall_us=wall,
                device_us=dev, floor_us=floor, iters=iters)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    ap.add_argument("--granularity", default="tensor", choices=("tensor", "global"))
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--budget-s", type=float,
                    default=float(os.environ.get("GPU_BENCH_BUDGET_S", 0)),
                    help="stop starting measurements after this many seconds (0: no limit; "
                         "env GPU_BENCH_BUDGET_S); the compile peer runs only with "
                         "--compile-reserve-s left")
    ap.add_argument("--compile-reserve-s", type=float, default=25.0,
                    help="seconds one cold torch.compile of the reference may take")
    ap.add_argument("--plan", action="store_true",
                    help="print what would be measured, in order, and exit (no device needed)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scenarios = GPU_SCENARIOS if device.type == "cuda" else CPU_SCENARIOS
    order = plan(scenarios, device, args.granularity)
    if args.plan:
        for phase, scen, name, _ in order:
            print(f"{phase:8s}{scen} | {name}")
        return 0
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        triton_version = None
    meta = dict(device=str(device), torch=torch.__version__, triton=triton_version,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                granularity=args.granularity)
    writer = RowWriter(os.environ.get("OUT"), meta)  # on disk before the first CUDA call
    reasons = available_backends()
    gpu = dict(device_name=_device_name(device), bandwidth_Bps=copy_bandwidth(device))
    writer.meta(gpu)
    meta.update(gpu)
    bw = gpu["bandwidth_Bps"]
    print(f"\n## ProGrad-SGD step, {device.type} ({meta['device_name']}), fp32, granularity="
          f"{args.granularity}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s (read+write); floor = 32 B/elem at "
          f"that rate (24 B for a single-pass plan)\n", flush=True)
    writer.header()
    results = writer.rows
    def left() -> float:
        spent = time.perf_counter() - start
        return args.budget_s - spent if args.budget_s > 0 else math.inf

    try:
        for i, (phase, scen, name, make) in enumerate(order):
            need = args.compile_reserve_s if phase == "compile" else 1.0
            if left() < need:
                why = (f"time budget: {max(left(), 0):.0f} s left of {args.budget_s:.0f} s, "
                       f"{need:.0f} s needed")
                writer.add(dict(scenario=scen, impl=name, skipped=why))
            else:
                writer.add(measure(make, name, scen, scenarios[scen], device, reasons,
                                   args.quick, bw))
            last_of_scenario = i + 1 == len(order) or order[i + 1][:2] != (phase, scen)
            if device.type == "cuda" and phase == "fused" and last_of_scenario:
                target = next((t for t in device_verdicts.TARGETS if t[0] == scen), None)
                if target:  # the verdict as soon as its rows exist
                    print(device_verdicts.verdict_line(*target, results, bw, meta["device_name"]),
                          flush=True)
    finally:
        writer.close()
    if device.type == "cpu":
        cpu_ratios(results, scenarios, device, args)
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_kernels_bench.json"
        path.write_text(json.dumps(dict(meta, results=results), indent=1))
        print(f"\nwrote {path} (and each row as measured: {writer.path})")
    return 0


def cpu_ratios(results, scenarios, device, args) -> None:
    """On a CPU: the paired reference / cpp ratios, and the ratios from the table."""
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


if __name__ == "__main__":
    sys.exit(main())
