"""The CUDA backend: fused kernels from ``csrc/prograd_cuda.cu``, one call per group.

Plans (chosen in C++ from the group's layout, see the .cu file): one single-block launch
for small groups (CoOp), one cooperative single-pass launch when every chunk of the group
fits on chip at once, else reduce -> finalize -> update.  No host synchronisation; the
partial-sum workspace and the per-tensor slot table are cached in ``step.extra`` so steady
steps allocate only their statistics (from torch's caching allocator).
``PROGRAD_FAST_CUDA_PLAN`` = auto | small | coop | two_pass forces a plan (tests, benchmarks).
"""

from __future__ import annotations

import os

import torch

from ._common import cached_problem, finish_step, group_tensor_problem, kernel_args
from .. import _ext
from ..functional import ProGradStats

PLAN_ENV = "PROGRAD_FAST_CUDA_PLAN"
PLANS = {"auto": 0, "small": 1, "coop": 2, "two_pass": 3}


def requested_plan() -> int:
    name = os.environ.get(PLAN_ENV, "auto").strip() or "auto"
    if name not in PLANS:
        raise ValueError(f"{PLAN_ENV} must be one of {tuple(PLANS)}, got {name!r}")
    return PLANS[name]


class CudaBackend:
    name = "cuda"

    def available(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return _ext.unavailable_reason("cuda")

    def unsupported(self, step) -> str | None:
        return cached_problem(step, "cuda_checked", self._check)

    def _check(self, step) -> str | None:
        return group_tensor_problem(step, "cuda", self.name)

    def step(self, step) -> ProGradStats:
        module = _ext.load("cuda")
        cache = step.extra.setdefault("cuda", {})
        layout = tuple(p.numel() for p in step.params)
        if cache.get("layout") != layout:
            cache.clear()
            cache["layout"] = layout
        stats, bufs, workspace, slots, plan = module.prograd_sgd(
            *kernel_args(step), cache.get("workspace"), cache.get("slots"), requested_plan())
        cache["workspace"], cache["slots"], cache["plan"] = workspace, slots, plan
        return finish_step(step, stats, bufs)


BACKEND = CudaBackend()
