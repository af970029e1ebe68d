"""pytest configuration for the benchmark suites (``pytest benchmarks/ --benchmark-only``).

Adds what a reader needs to interpret the numbers to pytest-benchmark's ``machine_info``
(device, versions, scale, measured copy bandwidth, the command), applies
``PROGRAD_BENCH_THREADS`` and frees memory between benchmarks so the large scenarios do not
stack up.  Environment variables: see ``benchmarks/README.md``.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

if not torch.cuda.is_available():
    # test_bench_host.py times the Triton backend's host path with CPU tensors, which select
    # the interpreter mode (set before any Triton kernel is made; peers.py never times it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import scenarios  # noqa: E402
from measure import copy_bandwidth_gbs, machine_facts  # noqa: E402

# PROGRAD_BENCH_THREADS pins torch's intra-op threads (e.g. 1 on a shared, busy machine,
# where OpenMP barriers waiting on descheduled threads add whole scheduler quanta).
if os.environ.get("PROGRAD_BENCH_THREADS", "").strip():
    torch.set_num_threads(int(os.environ["PROGRAD_BENCH_THREADS"]))


def pytest_benchmark_update_machine_info(config, machine_info):
    device = scenarios.bench_device()
    scale = scenarios.active_scale(device)
    facts = machine_facts(device)
    facts.update(scale=scale, dtype=str(scenarios.bench_dtype()).removeprefix("torch."),
                 granularity=scenarios.bench_granularity(),
                 copy_gbs=copy_bandwidth_gbs(str(device), scale))
    machine_info["prograd_bench"] = facts


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """The device benchmarks run on (``PROGRAD_BENCH_DEVICE``, else CUDA if present)."""
    return scenarios.bench_device()


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
