"""Timing helpers shared by the benchmark suites: copy bandwidth, CUDA loop time, machine facts."""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from typing import Callable

import torch

__all__ = ["copy_bandwidth_gbs", "cuda_loop_time_us", "machine_facts"]


def _copy_bytes(device: torch.device, scale: str) -> int:
    if scale == "tiny":
        return 16 * 2**20
    # Well past the last-level cache: 32 MiB L3 on small CPUs, 60 MB L2 on an H200.
    return 2**30 if device.type == "cuda" else 256 * 2**20


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs(device_name: str, scale: str = "full") -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written, 1e9 B) from the
    best of 7 timings of ``dst.copy_(src)`` (the best: a busy machine only ever slows a
    copy down); measured once per process and device."""
    device = torch.device(device_name)
    nbytes = _copy_bytes(device, scale)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    reps = 10 if device.type == "cuda" else 3
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(7):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(reps):
                dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                dst.copy_(src)
            times.append((time.perf_counter() - t0) / reps)
    del src, dst
    return 2 * nbytes / min(times) / 1e9


def cuda_loop_time_us(step: Callable[[], None], device: torch.device, guess_s: float,
                      budget_s: float = 0.05, max_iters: int = 2000) -> float:
    """Microseconds per ``step`` on the GPU timeline over a loop of back-to-back steps with no
    synchronisation between them (CUDA events): device time when the GPU is the bottleneck,
    launch throughput when the host is."""
    iters = int(min(max_iters, max(3, budget_s / max(guess_s, 1e-7))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _command() -> str:
    """The command line that ran, with the ``PROGRAD_BENCH_*`` settings in force."""
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("PROGRAD_BENCH_")]
    argv = ["pytest"] + sys.argv[1:] if "pytest" in sys.argv[0] else sys.argv
    return " ".join(env + argv)


def machine_facts(device: torch.device) -> dict:
    """What a reader needs to interpret the numbers: device, versions, threads."""
    facts = {
        "bench_device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command": _command(),
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except Exception:  # triton is optional
        facts["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["device_name"] = props.name
        facts["cuda"] = torch.version.cuda
        facts["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        facts["device_name"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        facts["device_name"] = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return facts
