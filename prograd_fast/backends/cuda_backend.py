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

from ._common import cached_problem
from .. import _ext
from ..functional import ProGradStats

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PLAN_ENV = "PROGRAD_FAST_CUDA_PLAN"
PLANS = {"auto": 0, "small": 1, "coop": 2, "two_pass": 3}


def _tensor_problem(t, name: str, i: int, ref) -> str | None:
    if t.device.type != "cuda":
        return f"{name} {i} is on {t.device}, the cuda backend runs on CUDA tensors only"
    if t.layout != torch.strided:
        return f"{name} {i} is not a strided (dense) tensor"
    if t.dtype not in _DTYPES:
        return f"{name} {i} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64"
    if ref is not None and (t.dtype != ref.dtype or t.shape != ref.shape or t.device != ref.device):
        return f"{name} {i} does not match its parameter's dtype, shape and device"
    return None


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
        device = step.params[0].device
        for i, p in enumerate(step.params):
            problem = _tensor_problem(p, "parameter", i, None)
            if problem:
                return problem
            if p.device != device:
                return f"parameter {i} is on {p.device}, parameter 0 on {device}: one device per group"
        for name, tensors in (("grad", step.grads), ("general grad", step.general_grads),
                              ("momentum buffer", step.momentum_buffers)):
            for i, (t, p) in enumerate(zip(tensors, step.params)):
                if t is not None:
                    problem = _tensor_problem(t, name, i, p)
                    if problem:
                        return problem
        return None

    def step(self, step) -> ProGradStats:
        module = _ext.load("cuda")
        cache = step.extra.setdefault("cuda", {})
        layout = tuple(p.numel() for p in step.params)
        if cache.get("layout") != layout:
            cache.clear()
            cache["layout"] = layout
        lr = step.lr
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        stats, bufs, workspace, slots, plan = module.prograd_sgd(
            step.params, step.grads, step.general_grads, step.momentum_buffers,
            0.0 if lr_tensor is not None else float(lr), lr_tensor,
            float(step.momentum), float(step.dampening), float(step.weight_decay),
            bool(step.nesterov), bool(step.maximize), float(step.lam),
            step.granularity == "global", step.grad_scale, step.found_inf,
            cache.get("workspace"), cache.get("slots"), requested_plan())
        cache["workspace"], cache["slots"], cache["plan"] = workspace, slots, plan
        if step.momentum != 0:
            step.momentum_buffers[:] = bufs
        dot, nn, dd, cos, conflict, coef, skipped = stats
        return ProGradStats(dot=dot, general_norm_sq=nn, domain_norm_sq=dd, cos=cos,
                            conflict=conflict, coef=coef, skipped=skipped)


BACKEND = CudaBackend()
