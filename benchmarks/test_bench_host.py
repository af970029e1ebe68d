"""The host side of one optimizer step (issue 10, item 7), on the CPU.

Run: ``PROGRAD_BENCH_THREADS=1 pytest benchmarks/test_bench_host.py --benchmark-only
--benchmark-timer time.process_time --benchmark-json=benchmarks/results/host.json``, then
``python benchmarks/host_report.py benchmarks/results/host.json --write BENCHMARKS.md
--strip-data`` for the BENCHMARKS.md section.

* ``test_host_path[<scenario>-<host>]``: ``store_general_grads`` + ``step`` of a ProGradSGD
  with the Triton backend, every kernel launch stubbed (``Launcher.__call__`` does nothing):
  what the Python around the kernels costs per step, the floor a GPU step cannot go under.
  ``host=c``: with the C host helper (``prograd_fast._host``, the default wherever it
  builds); targets (``extra_info["target_us"]``): CoOp (one 16x512 tensor) <= 8 us, 27
  tensors <= 20 us, and ``extra_info["paired_python_over_c"]``, the two paths alternated.
  ``host=python``: the Python fallback (no compiler), no target.  Without a GPU the
  tensors are CPU tensors of the real shapes (Triton's interpreter mode selects the
  backend; nothing runs in it); with one, CUDA tensors.
* ``test_host_path_alternating[<scenario>-<host>-<device>]``: the same step where the
  general gradients come from a fresh ``autograd.grad`` every step (two sets of tensors
  alternating: every step sees new addresses, nothing else changes).  With the helper
  only the addresses are re-bound (the offset table's address rows); target
  (``extra_info["target_ratio"]``): ``extra_info["paired_alternating_over_stable"]`` <= 1.5,
  the alternating step against the stable-address one, the two alternated.  ``cpu``: CPU
  tensors (Triton's interpreter selects the backend, launches stubbed); ``cuda``: CUDA
  tensors, launches stubbed too (skipped without CUDA).
* ``test_whole_step[coop-cpp]`` vs ``[coop-torch_fused_sgd]``: the cpp backend's whole CoOp
  step (store + step, kernel included) against ``torch.optim.SGD(fused=True).step()`` on
  the same shapes (no ProGrad).  Target: cpp no slower.  The cpp case also records a
  paired ratio (the two steps alternated, median of per-round ratios: robust to the load
  of a shared machine) as ``extra_info["paired_over_torch_fused"]``.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

import prograd_fast as pf

# Without a GPU, CPU tensors select the Triton backend in its interpreter mode
# (benchmarks/conftest.py sets TRITON_INTERPRET); with one, CUDA tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

COOP = [(16, 512)]
MAPLE27 = [(2, 512)] * 9 + [(768, 512), (768,)] * 9  # 27 tensors, 3.56M elements
SCENARIOS = {"coop": (COOP, 8.0), "maple27": (MAPLE27, 20.0)}
HYPER = dict(lr=0.002, momentum=0.9, weight_decay=5e-4)


def _group(shapes, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    generals = [-0.5 * p.grad for p in params]
    return params, generals


@pytest.fixture
def stubbed_launches(monkeypatch):
    from prograd_fast.backends import triton_backend

    if triton_backend.BACKEND.available() is not None:
        pytest.skip(f"triton backend: {triton_backend.BACKEND.available()}")
    kernels = triton_backend.BACKEND._k
    monkeypatch.setattr(kernels.Launcher, "__call__", lambda self: None)


def _host_path_step(shapes, device=DEVICE, alternate=False):
    params, generals = _group(shapes, device=device)
    opt = pf.ProGradSGD(params, backend="triton", **HYPER)
    # alternate: two sets of general gradients in turn, as a fresh autograd.grad gives
    sets = [generals, [g.clone() for g in generals]] if alternate else [generals, generals]
    turn = [0]

    def step():
        turn[0] ^= 1
        opt.store_general_grads(sets[turn[0]])
        opt.step()

    for _ in range(3):  # plan built, buffers made, addresses bound
        step()
    return step


def _with_host(step, module):
    """``step`` run with the host helper set to ``module`` (None: the Python path)."""
    from prograd_fast import _host

    def run():
        _host._module = module
        step()

    return run


@pytest.mark.parametrize("host", ["c", "python"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_host_path(benchmark, scenario, host, stubbed_launches, monkeypatch):
    from prograd_fast import _host

    shapes, target = SCENARIOS[scenario]
    helper = _host.module()
    if helper is None and host == "c":
        pytest.skip("the C host helper cannot be built here")
    monkeypatch.setattr(_host, "_module", helper if host == "c" else None)
    step = _host_path_step(shapes)
    benchmark.group = "host path, launches stubbed"
    benchmark.extra_info.update(kind="host_path", scenario=scenario, tensors=len(shapes),
                                host=host, backend="triton", device=DEVICE)
    if host == "c":
        benchmark.extra_info["target_us"] = target
        fallback = _with_host(_host_path_step(shapes), None)
        benchmark.extra_info["paired_python_over_c"] = _paired(fallback,
                                                               _with_host(step, helper))
        _host._module = helper
    benchmark(step)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("host", ["c", "python"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_host_path_alternating(benchmark, scenario, host, device, stubbed_launches,
                               monkeypatch):
    from prograd_fast import _host
    from prograd_fast.backends import triton_backend

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cpu" and not triton_backend.BACKEND._k.INTERPRET:
        pytest.skip("the triton backend runs CUDA tensors here (no interpreter)")
    shapes, _ = SCENARIOS[scenario]
    helper = _host.module()
    if helper is None and host == "c":
        pytest.skip("the C host helper cannot be built here")
    helper = helper if host == "c" else None
    monkeypatch.setattr(_host, "_module", helper)
    step = _host_path_step(shapes, device, alternate=True)
    stable = _host_path_step(shapes, device)
    benchmark.group = "host path, alternating general-gradient addresses, launches stubbed"
    benchmark.extra_info.update(kind="host_path_alternating", scenario=scenario,
                                tensors=len(shapes), host=host, backend="triton",
                                device=device)
    if host == "c":  # the target is the default path's; the Python path has none
        benchmark.extra_info["target_ratio"] = 1.5
    benchmark.extra_info["paired_alternating_over_stable"] = _paired(
        _with_host(step, helper), _with_host(stable, helper))
    _host._module = helper
    benchmark(step)


def _torch_fused(shapes):
    params, _ = _group(shapes, seed=1)
    opt = torch.optim.SGD(params, fused=True, **HYPER)
    opt.step()
    return opt.step


def _cpp(shapes):
    params, generals = _group(shapes, seed=1)
    opt = pf.ProGradSGD(params, backend="cpp", **HYPER)

    def step():
        opt.store_general_grads(generals)
        opt.step()

    step()
    return step


def _paired(a, b, rounds=15, per_round=200) -> float:
    """Median over rounds of (time of a) / (time of b), the two alternated."""
    clock = time.process_time
    ratios = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(per_round):
            a()
        t1 = clock()
        for _ in range(per_round):
            b()
        t2 = clock()
        ratios.append((t1 - t0) / max(t2 - t1, 1e-9))
    return statistics.median(ratios)


@pytest.mark.parametrize("impl", ["cpp", "torch_fused_sgd"])
def test_whole_step(benchmark, impl):
    if pf.available_backends()["cpp"] is not None:
        pytest.skip(f"cpp backend: {pf.available_backends()['cpp']}")
    step = _cpp(COOP) if impl == "cpp" else _torch_fused(COOP)
    for _ in range(3):
        step()
    benchmark.group = "whole CoOp step, CPU"
    benchmark.extra_info.update(kind="whole_step", scenario="coop", impl=impl,
                                threads=torch.get_num_threads())
    if impl == "cpp":
        benchmark.extra_info["paired_over_torch_fused"] = _paired(step, _torch_fused(COOP))
    benchmark(step)
