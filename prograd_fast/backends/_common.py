"""Helpers shared by the kernel backends."""

from __future__ import annotations

from typing import Callable

import torch

from ..functional import GRANULARITIES, ProGradStats


def cached_problem(step, tag: str, check: Callable) -> str | None:
    """``check(step)`` (why the group cannot run, or None), cached per group: the same tensor
    objects as last step give the same answer (the kernels re-check devices, dtypes and
    shapes anyway)."""
    if step.granularity not in GRANULARITIES:
        return f"unknown granularity {step.granularity!r}"
    key = tuple(map(id, step.params)) + tuple(map(id, step.grads)) + \
        tuple(map(id, step.general_grads)) + tuple(map(id, step.momentum_buffers))
    cached = step.extra.get(tag)
    if cached is not None and cached[0] == key:
        return cached[1]
    problem = check(step)
    step.extra[tag] = (key, problem)
    return problem


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tensor_problem(t, name: str, i: int, device_type: str, backend: str, ref) -> str | None:
    if t.device.type != device_type:
        return f"{name} {i} is on {t.device}, the {backend} backend runs on {device_type.upper()} tensors only"
    if t.layout != torch.strided:
        return f"{name} {i} is not a strided (dense) tensor"
    if t.dtype not in SUPPORTED_DTYPES:
        return f"{name} {i} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64"
    if ref is not None and (t.dtype != ref.dtype or t.shape != ref.shape or t.device != ref.device):
        return f"{name} {i} does not match its parameter's dtype, shape and device"
    return None


def group_tensor_problem(step, device_type: str, backend: str) -> str | None:
    """Why the C++/CUDA kernels cannot take this group's tensors (None when they can):
    dense tensors of a supported dtype on one device of ``device_type``, each gradient and
    buffer matching its parameter."""
    device = step.params[0].device
    for i, p in enumerate(step.params):
        problem = _tensor_problem(p, "parameter", i, device_type, backend, None)
        if problem:
            return problem
        if p.device != device:
            return f"parameter {i} is on {p.device}, parameter 0 on {device}: one device per group"
    for name, tensors in (("grad", step.grads), ("general grad", step.general_grads),
                          ("momentum buffer", step.momentum_buffers)):
        for i, (t, p) in enumerate(zip(tensors, step.params)):
            if t is not None:
                problem = _tensor_problem(t, name, i, device_type, backend, p)
                if problem:
                    return problem
    return None


def kernel_args(step) -> tuple:
    """The positional arguments the C++ and CUDA ``prograd_sgd`` entry points share."""
    lr = step.lr
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    return (step.params, step.grads, step.general_grads, step.momentum_buffers,
            0.0 if lr_tensor is not None else float(lr), lr_tensor,
            float(step.momentum), float(step.dampening), float(step.weight_decay),
            bool(step.nesterov), bool(step.maximize), float(step.lam),
            step.granularity == "global", step.grad_scale, step.found_inf)


def finish_step(step, stats, bufs) -> ProGradStats:
    """Store new momentum buffers in the group's list and wrap the kernel's stats tuple."""
    if step.momentum != 0:
        step.momentum_buffers[:] = bufs
    dot, nn, dd, cos, conflict, coef, skipped = stats
    return ProGradStats(dot=dot, general_norm_sq=nn, domain_norm_sq=dd, cos=cos,
                        conflict=conflict, coef=coef, skipped=skipped)
