"""One optimizer step per scenario (DESIGN.md section 2) for every implementation in ``peers``.

Run: ``pytest benchmarks/test_bench_optim.py --benchmark-only`` (``--benchmark-json=FILE``
for the report).  Ids read ``test_optimizer_step[<scenario>-<implementation>]``; the
pytest-benchmark group is the scenario.  Wall time is the whole step as a training loop
calls it (on CUDA followed by ``torch.cuda.synchronize()``, so the GPU work is inside the
timing); ``extra_info`` adds elements, tensors, the fused design's bytes per step, achieved
GB/s, the fraction of the measured copy bandwidth and, on CUDA, ``device_us`` (CUDA events
over a loop of steps without synchronisation).  Unavailable implementations skip with why.
Before it is timed, every implementation's parameters and momentum buffers after its warm-up
steps are compared with the pure-PyTorch reference at the same size: a number is only
reported for an implementation that computes the same thing.
"""

from __future__ import annotations

import pytest
import torch

import peers
import scenarios
from measure import copy_bandwidth_gbs, cuda_loop_time_us

DEVICE = scenarios.bench_device()
SCALE = scenarios.active_scale(DEVICE)
WARMUP_STEPS = 2  # the first step creates momentum buffers; the second warms caches
_REFERENCE_CACHE: dict = {}  # reference results of the current scenario


def _problem(scenario: scenarios.Scenario) -> peers.Problem:
    """The scenario's data; deterministic (fixed seed), so it can be made again."""
    return peers.make_problem(scenario.shapes, DEVICE, scenarios.bench_dtype(),
                              scenarios.bench_granularity(), hyper=scenarios.HYPER)


def _expected(scenario: scenarios.Scenario, steps: int, granularity: str, project: bool):
    """The float64 reference's parameters and buffers after ``steps`` on fresh data, kept
    (as float32) for the implementations of the same scenario."""
    key = (scenario.name, steps, granularity, project)
    if any(k[0] != scenario.name for k in _REFERENCE_CACHE):
        _REFERENCE_CACHE.clear()
    if key not in _REFERENCE_CACHE:
        params, bufs = peers.reference_state(_problem(scenario), steps, granularity, project)
        _REFERENCE_CACHE[key] = ([p.float() for p in params],
                                 [None if b is None else b.float() for b in bufs])
        del params, bufs
    return _REFERENCE_CACHE[key]


_TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _check_against_reference(implementation: peers.Implementation, expected, steps: int) -> None:
    """Every timed implementation is first checked at this very size: a fast path that
    computes something else (an overflowing index, a missed tail) fails here, untimed."""
    tol = _TOLERANCE[implementation.problem.params[0].dtype]
    why = peers.disagreement(implementation, expected, rtol=tol, atol=tol)
    if why is not None:
        pytest.fail(f"{implementation.name} disagrees with the float64 reference after "
                    f"{steps} steps (not benchmarked): {why}")


@pytest.mark.parametrize("impl", peers.implementation_names())
@pytest.mark.parametrize("scenario", scenarios.scenarios(SCALE), ids=str)
def test_optimizer_step(benchmark, scenario: scenarios.Scenario, impl: str) -> None:
    dtype = scenarios.bench_dtype()
    problem = _problem(scenario)
    try:
        implementation = peers.build(impl, problem)
        for _ in range(WARMUP_STEPS):
            implementation.step()
        peers.synchronize(DEVICE)
    except peers.Unavailable as exc:
        pytest.skip(str(exc))
    steps = implementation.setup_steps + WARMUP_STEPS
    _check_against_reference(implementation, _expected(
        scenario, steps, implementation.granularity, implementation.projects), steps)

    if DEVICE.type == "cuda":
        def run() -> None:
            implementation.step()
            torch.cuda.synchronize(DEVICE)
    else:
        run = implementation.step

    nbytes = scenarios.bytes_per_step(scenario.elements, dtype)
    copy_gbs = copy_bandwidth_gbs(str(DEVICE), SCALE)
    benchmark.group = scenario.name
    benchmark.extra_info.update(
        kind="optimizer_step", scenario=scenario.name, implementation=impl,
        elements=scenario.elements, tensors=scenario.tensors, scale=SCALE,
        dtype=str(dtype).removeprefix("torch."), granularity=implementation.granularity,
        device=str(DEVICE), bytes_per_step=nbytes, copy_gbs=round(copy_gbs, 2),
        floor_us=nbytes / (copy_gbs * 1e9) * 1e6, **implementation.info)
    benchmark(run)

    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        gbs = nbytes / median / 1e9
        benchmark.extra_info.update(gbs=gbs, copy_fraction=gbs / copy_gbs)
        if DEVICE.type == "cuda":
            benchmark.extra_info["device_us"] = cuda_loop_time_us(implementation.step, DEVICE,
                                                                  median)
