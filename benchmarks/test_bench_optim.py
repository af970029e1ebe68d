"""One optimizer step per scenario (DESIGN.md section 2) for every implementation in ``peers``.

Run: ``pytest benchmarks/test_bench_optim.py --benchmark-only`` (``--benchmark-json=FILE``
for the report).  Ids read ``test_optimizer_step[<scenario>-<implementation>]``; the
pytest-benchmark group is the scenario.  Wall time is the whole step as a training loop
calls it (on CUDA followed by ``torch.cuda.synchronize()``, so the GPU work is inside the
timing); ``extra_info`` adds elements, tensors, the fused design's bytes per step, achieved
GB/s, the fraction of the measured copy bandwidth and, on CUDA, ``device_us`` (CUDA events
over a loop of steps without synchronisation).  Unavailable implementations skip with why.
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


@pytest.mark.parametrize("impl", peers.implementation_names())
@pytest.mark.parametrize("scenario", scenarios.scenarios(SCALE), ids=str)
def test_optimizer_step(benchmark, scenario: scenarios.Scenario, impl: str) -> None:
    dtype = scenarios.bench_dtype()
    problem = peers.make_problem(scenario.shapes, DEVICE, dtype, scenarios.bench_granularity(),
                                 hyper=scenarios.HYPER)
    try:
        implementation = peers.build(impl, problem)
        for _ in range(WARMUP_STEPS):
            implementation.step()
        peers.synchronize(DEVICE)
    except peers.Unavailable as exc:
        pytest.skip(str(exc))

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
        dtype=str(dtype).removeprefix("torch."), granularity=problem.granularity,
        device=str(DEVICE), bytes_per_step=nbytes, copy_gbs=round(copy_gbs, 2),
        floor_us=nbytes / (copy_gbs * 1e9) * 1e6, **implementation.info)
    benchmark(run)

    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median = stats.stats.median
        gbs = nbytes / median / 1e9
        benchmark.extra_info.update(gbs=gbs, copy_fraction=gbs / copy_gbs)
        if DEVICE.type == "cuda":
            benchmark.extra_info["device_us"] = cuda_loop_time_us(implementation.step, DEVICE, median)
