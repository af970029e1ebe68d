"""GPU hardening checks for ProGradSGD (issue 6); run by benchmarks/device_check.sh.

Each check prints ``PASS``/``FAIL``/``SKIP`` with its numbers; the exit status is 1 when any
check failed.  Without a CUDA device it prints "no CUDA device: skipped" and exits 0
(``--cpu-dry-run`` runs the device-agnostic checks on the CPU, small, to test this script).

Checks, over every backend that runs CUDA tensors here (cuda, triton, torch):
  graph     a whole training step (forward, both backwards, step) captured in a CUDA graph
            and replayed == the eager run
  compile   torch.compile of the model with this optimizer == eager; graph breaks of a
            compiled ``opt.step`` counted (reported, not failed)
  amp       fp16 autocast + ProGradGradScaler == the unscaled run; an overflow in the
            general gradient alone skips the step and lowers the scale
  resume    a CPU state dict loaded into a CUDA optimizer (map_location) resumes identically
  memory    memory_allocated after the first step does not grow; allocations per step;
            optimizer extra memory <= momentum + one general-gradient buffer
  big       a group of more than 2**31 elements (fp32, ~35 GB) gives the analytic result at
            both sides of the 2**31 boundary (``--skip-big`` to leave it out)
  sanitizer compute-sanitizer memcheck over a small CUDA-backend step (when installed)
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import prograd_fast as pf  # noqa: E402
from prograd_fast.amp import ProGradGradScaler, pending_general_grads  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []
START = time.perf_counter()
BUDGET_S = float(os.environ.get("GPU_HARDENING_BUDGET_S", "55"))  # device_check.sh gives 60 s


def report(name: str, status: str, detail: str = "") -> None:
    RESULTS.append((name, status, detail))
    print(f"{status:4s}  {name}  {detail}", flush=True)


def remaining() -> float:
    return BUDGET_S - (time.perf_counter() - START)


def check(name, min_s: float = 0.0):
    """A check runs only with ``min_s`` seconds of the budget left (else SKIP)."""
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            if remaining() < max(min_s, 1.0):
                report(name, "SKIP", f"{args} needs ~{min_s:.0f}s, {max(remaining(), 0):.0f}s of the "
                       f"{BUDGET_S:.0f}s budget left (GPU_HARDENING_BUDGET_S raises it)")
                return
            try:
                detail = fn(*args, **kwargs) or ""
                report(name, "PASS", f"{detail} ({time.perf_counter() - t0:.1f}s)")
            except SkipCheck as exc:
                report(name, "SKIP", str(exc))
            except Exception as exc:  # every check runs; failures are collected
                traceback.print_exc()
                report(name, "FAIL", f"{type(exc).__name__}: {exc}")
        return run
    return wrap


class SkipCheck(Exception):
    pass


def cuda_backends() -> list[str]:
    reasons = pf.available_backends()
    return [b for b in ("cuda", "triton", "torch") if reasons.get(b) is None and b != "cpp"]


# ---------------------------------------------------------------- a small prompt-tuning-like model
class Model(torch.nn.Module):
    """A learned context (CoOp-like) feeding a frozen linear head; teacher logits fixed."""

    def __init__(self, dim=64, ctx=16, classes=10):
        super().__init__()
        self.ctx = torch.nn.Parameter(0.02 * torch.randn(ctx, dim))
        self.proj = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, classes)
        for p in list(self.proj.parameters()) + list(self.head.parameters()):
            p.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.proj(x + self.ctx.mean(0)))
        return self.head(h + h @ self.ctx.t() @ self.ctx / self.ctx.shape[0])


def make(device, backend, seed=0, **hyper):
    torch.manual_seed(seed)
    model = Model().to(device)
    opt = pf.ProGradSGD([model.ctx], lr=0.05, momentum=0.9, weight_decay=5e-4, backend=backend,
                        **hyper)
    return model, opt


def data(device, steps, seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 64, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device),
             3 * torch.randn(n, 10, generator=g).to(device)) for _ in range(steps)]


def train_step(model, opt, x, y, zs, scaler=None, autocast=None):
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast else torch.autocast(x.device.type, enabled=False)
    with ctx:
        logits = model(x)
    ce, kl = pf.prograd_losses(logits.float(), zs, y)
    s = scaler.scale if scaler is not None else (lambda t: t)
    pf.backward(opt, s(ce), s(kl))
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return ce


def eager(device, backend, batches, **kw):
    model, opt = make(device, backend)
    for x, y, zs in batches:
        opt.zero_grad(set_to_none=True)
        train_step(model, opt, x, y, zs, **kw)
    return model, opt


def max_diff(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# ---------------------------------------------------------------- checks
@check("graph")
def check_graph(backend):
    device = "cuda"
    batches = data(device, 8)
    ref_model, ref_opt = eager(device, backend, batches)
    model, opt = make(device, backend)
    sx, sy, sz = (t.clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps (they are real steps: batches 0..2)
        for x, y, zs in batches[:3]:
            sx.copy_(x), sy.copy_(y), sz.copy_(zs)
            opt.zero_grad(set_to_none=True)
            train_step(model, opt, sx, sy, sz)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        train_step(model, opt, sx, sy, sz)
    for x, y, zs in batches[3:]:
        sx.copy_(x), sy.copy_(y), sz.copy_(zs)
        graph.replay()
    torch.cuda.synchronize()
    diff = max_diff(model.ctx, ref_model.ctx)
    bdiff = max_diff(opt.state[model.ctx]["momentum_buffer"], ref_opt.state[ref_model.ctx]["momentum_buffer"])
    conflicts = int(ref_opt.stats()[0]["conflict"])
    assert diff <= 1e-6 and bdiff <= 1e-6, f"graph replay differs from eager: {diff:.3g} / {bdiff:.3g}"
    return f"backend={backend} max|diff| param {diff:.2g} momentum {bdiff:.2g} (last step conflict={conflicts})"


@check("compile", min_s=30)
def check_compile(backend, device="cuda"):
    import torch._dynamo as dynamo
    batches = data(device, 4)
    ref_model, _ = eager(device, backend, batches)
    model, opt = make(device, backend)
    compiled = torch.compile(model)
    for x, y, zs in batches:
        opt.zero_grad(set_to_none=True)
        ce, kl = pf.prograd_losses(compiled(x).float(), zs, y)
        pf.backward(opt, ce, kl)
        opt.step()
    diff = max_diff(model.ctx, ref_model.ctx)
    assert diff <= 1e-5, f"compiled model differs from eager by {diff:.3g}"
    # graph breaks in the optimizer step itself (reported; the fused backends call extensions)
    x, y, zs = batches[0]
    opt.zero_grad(set_to_none=True)
    ce, kl = pf.prograd_losses(model(x).float(), zs, y)
    pf.backward(opt, ce, kl)
    dynamo.reset()
    explain = dynamo.explain(opt.step)()
    return (f"backend={backend} max|diff| {diff:.2g}; opt.step under dynamo: "
            f"{explain.graph_count} graphs, {explain.graph_break_count} breaks")


@check("amp")
def check_amp(backend, device="cuda"):
    batches = data(device, 4)
    ref_model, ref_opt = eager(device, backend, batches, autocast=torch.float16)
    scaler = ProGradGradScaler(device, init_scale=2.0 ** 12, growth_interval=1000)
    model, opt = eager(device, backend, batches, autocast=torch.float16, scaler=scaler)
    diff = max_diff(model.ctx, ref_model.ctx)
    assert diff <= 1e-5, f"scaled fp16 run differs from unscaled by {diff:.3g}"
    # overflow in the general gradient only
    before = model.ctx.detach().clone()
    x, y, zs = batches[0]
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.float16):
        logits = model(x)
    ce, kl = pf.prograd_losses(logits.float(), zs, y)
    pf.backward(opt, scaler.scale(ce), scaler.scale(kl))
    pending_general_grads(opt)[0].view(-1)[5] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert bool(opt.stats()[0]["skipped"]), "general-gradient overflow did not skip the step"
    assert torch.equal(model.ctx.detach(), before), "skipped step changed the parameters"
    assert scaler.get_scale() == scale / 2, "scale not lowered after a general-only overflow"
    return f"backend={backend} max|diff| {diff:.2g}; general-only overflow: skipped, scale {scale:g} -> {scaler.get_scale():g}"


@check("resume")
def check_resume(backend):
    batches = data("cpu", 6)
    model, opt = make("cpu", "torch")
    for x, y, zs in batches[:3]:
        opt.zero_grad()
        train_step(model, opt, x, y, zs)
    import io
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    for x, y, zs in batches[3:]:
        opt.zero_grad()
        train_step(model, opt, x, y, zs)
    buf.seek(0)
    ck = torch.load(buf, map_location="cuda", weights_only=True)
    m2, o2 = make("cuda", backend)
    m2.load_state_dict(ck["m"])
    o2.load_state_dict(ck["o"])
    assert o2.state[m2.ctx]["momentum_buffer"].is_cuda
    for x, y, zs in batches[3:]:
        o2.zero_grad()
        train_step(m2, o2, x.cuda(), y.cuda(), zs.cuda())
    diff = max_diff(m2.ctx.cpu(), model.ctx)
    assert diff <= 1e-5, f"resumed CUDA run differs from the CPU run by {diff:.3g}"
    return f"backend={backend} max|diff| vs CPU run {diff:.2g}"


@check("memory")
def check_memory(backend, numel=1 << 24):
    p = torch.nn.Parameter(torch.randn(numel, device="cuda"))
    grad = torch.randn(numel, device="cuda")
    general = -grad + 0.5 * torch.randn(numel, device="cuda")
    opt = pf.ProGradSGD([p], lr=0.01, momentum=0.9, backend=backend)
    p.grad = grad
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    allocated, allocs, peaks = [], [], []
    for _ in range(6):
        g = general.clone()
        opt.store_general_grads([g])
        del g
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        stats0 = torch.cuda.memory_stats()
        opt.step()
        torch.cuda.synchronize()
        stats1 = torch.cuda.memory_stats()
        allocs.append((stats1["allocation.all.allocated"] - stats0["allocation.all.allocated"],
                       stats1["allocated_bytes.all.allocated"] - stats0["allocated_bytes.all.allocated"]))
        allocated.append(torch.cuda.memory_allocated() - base)
        peaks.append(torch.cuda.max_memory_allocated() - base)
    nbytes = numel * 4
    held = allocated[-1]
    assert len(set(allocated[1:])) == 1, f"memory grows per step: {allocated}"
    assert held <= nbytes + (1 << 16), f"optimizer holds {held} B > momentum {nbytes} B + 64 KiB"
    # the general gradient handed to the step is the one extra buffer while it is pending
    assert max(peaks[1:]) <= 2 * nbytes + (1 << 20) or backend == "torch", \
        f"peak during step {max(peaks[1:])} B > momentum + general buffer"
    fused = backend in ("cuda", "triton")
    if fused and max(b for _, b in allocs[1:]) > 4096:
        raise AssertionError(f"{backend} allocates (blocks, bytes) {allocs[1:]} per step after "
                             "the first: more than its statistics")
    return (f"backend={backend} params {nbytes} B; held after steps {allocated} B; "
            f"(allocations, bytes) per step {allocs}; peak above base {max(peaks[1:])} B")


@check("big", min_s=15)
def check_big(backend):
    free, _ = torch.cuda.mem_get_info()
    extra = 1_000_003
    n = (1 << 31) + extra
    need = 4 * n * 4 * (3 if backend == "torch" else 1)
    if free < need:
        raise SkipCheck(f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
    half = 1 << 31
    p = torch.nn.Parameter(torch.zeros(n, device="cuda"))
    d = torch.ones(n, device="cuda")
    d[1:half:2] = 3.0                      # head: d = 1, 3, 1, 3, ... ; tail: d = 1
    g = torch.full((n,), -1.0, device="cuda")
    g[half:] = -2.0                        # head: g = -1 ; tail: g = -2
    p.grad = d
    opt = pf.ProGradSGD([p], lr=0.5, backend=backend)
    opt.store_general_grads([g])
    del g
    opt.step()
    a, m = float(half), float(extra)
    dot, nn = -(2 * a + 2 * m), a + 4 * m  # dot < 0: projected
    coef = dot / nn
    want = [-0.5 * (1 + coef), -0.5 * (3 + coef), -0.5 * (3 + coef), -0.5 * (1 + 2 * coef),
            -0.5 * (1 + 2 * coef)]
    idx = torch.tensor([0, 1, half - 1, half, n - 1], device="cuda")
    got = p.detach()[idx].tolist()
    stats = opt.stats()[0]
    ok = all(abs(x - y) <= 1e-4 * abs(y) for x, y in zip(got, want))
    pd = p.detach()
    head_ok = bool((pd[0:half:2] == pd[0]).all()) and bool((pd[1:half:2] == pd[1]).all())
    tail_ok = bool((pd[half:] == pd[n - 1]).all())
    del p, d, opt, pd
    torch.cuda.empty_cache()
    assert ok and tail_ok and head_ok, f"2**31+ group: got {got}, want {want} (tail uniform {tail_ok})"
    return f"backend={backend} n={n} coef {float(stats['coef']):.6f} (analytic {coef:.6f})"


SANITIZER_SNIPPET = r"""
import torch, prograd_fast as pf
for shapes in ([(16, 512)], [(7,), (1025,), (33, 5), (1 << 16,)], [(1 << 22,)]):
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    for gran in ("global", "tensor"):
        opt = pf.ProGradSGD(ps, lr=0.01, momentum=0.9, backend="cuda", granularity=gran)
        for _ in range(2):
            opt.store_general_grads([-p.grad + torch.randn_like(p) for p in ps])
            opt.step()
torch.cuda.synchronize()
print("sanitizer snippet done")
"""


@check("sanitizer", min_s=40)
def check_sanitizer():
    timeout_s = max(10.0, remaining() - 2)
    if pf.available_backends().get("cuda") is not None:
        raise SkipCheck("cuda backend not available: " + str(pf.available_backends()["cuda"]))
    tool = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if tool is None:
        raise SkipCheck("compute-sanitizer not found")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    out = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20",
                          sys.executable, "-c", SANITIZER_SNIPPET], capture_output=True, text=True,
                         timeout=timeout_s, env=env)
    tail = (out.stdout + out.stderr)[-2000:]
    assert out.returncode == 0 and "sanitizer snippet done" in out.stdout, tail
    summary = [line for line in tail.splitlines() if "ERROR SUMMARY" in line]
    return summary[-1] if summary else "no errors"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-big", action="store_true", help="leave out the 2**31-element group")
    ap.add_argument("--skip-sanitizer", action="store_true")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the device-agnostic checks on the CPU (tests this script)")
    args = ap.parse_args()
    if args.cpu_dry_run:
        for backend in ("torch", "cpp"):
            check_compile(backend, device="cpu")
            check_amp(backend, device="cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    else:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"backends {pf.available_backends()}", flush=True)
        # Cheapest and most important first: the budget may cut the tail (reported as SKIP).
        backends = cuda_backends()
        for backend in backends:
            check_graph(backend)
            check_amp(backend)
            check_resume(backend)
            check_memory(backend)
        if not args.skip_big:
            for backend in [b for b in ("cuda", "triton") if b in backends]:
                check_big(backend)
        for backend in backends:
            check_compile(backend)
        if not args.skip_sanitizer:
            check_sanitizer()
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"\n{len(RESULTS)} checks: {len(failed)} failed, "
          f"{sum(r[1] == 'SKIP' for r in RESULTS)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
