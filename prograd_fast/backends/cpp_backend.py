"""The C++ CPU backend: one fused call per parameter group (``csrc/prograd_cpu.cpp``).

Vectorised and multi-threaded two-pass kernel (reduce, then projected SGD update), built
just in time on first use (see :mod:`prograd_fast._ext`).  It is the ``"auto"`` choice for
CPU tensors of dtype float32/float16/bfloat16/float64 whenever the build succeeds.
"""

from __future__ import annotations

import torch

from ._common import cached_problem
from .. import _ext
from ..functional import ProGradStats

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tensor_problem(t, name: str, i: int, ref) -> str | None:
    if t.device.type != "cpu":
        return f"{name} {i} is on {t.device}, the cpp backend runs on CPU tensors only"
    if t.layout != torch.strided:
        return f"{name} {i} is not a strided (dense) tensor"
    if t.dtype not in _DTYPES:
        return f"{name} {i} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64"
    if ref is not None and (t.dtype != ref.dtype or t.shape != ref.shape):
        return f"{name} {i} does not match its parameter's dtype and shape"
    return None


class CppBackend:
    name = "cpp"

    def available(self) -> str | None:
        return _ext.unavailable_reason("cpu")

    def unsupported(self, step) -> str | None:
        return cached_problem(step, "cpp_checked", self._check)

    def _check(self, step) -> str | None:
        for i, p in enumerate(step.params):
            problem = _tensor_problem(p, "parameter", i, None)
            if problem:
                return problem
        for name, tensors in (("grad", step.grads), ("general grad", step.general_grads),
                              ("momentum buffer", step.momentum_buffers)):
            for i, (t, p) in enumerate(zip(tensors, step.params)):
                if t is not None:
                    problem = _tensor_problem(t, name, i, p)
                    if problem:
                        return problem
        return None

    def step(self, step) -> ProGradStats:
        module = _ext.load("cpu")
        lr = step.lr
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        stats, bufs = module.prograd_sgd(
            step.params, step.grads, step.general_grads, step.momentum_buffers,
            0.0 if lr_tensor is not None else float(lr), lr_tensor,
            float(step.momentum), float(step.dampening), float(step.weight_decay),
            bool(step.nesterov), bool(step.maximize), float(step.lam),
            step.granularity == "global", step.grad_scale, step.found_inf)
        if step.momentum != 0:
            step.momentum_buffers[:] = bufs
        dot, nn, dd, cos, conflict, coef, skipped = stats
        return ProGradStats(dot=dot, general_norm_sq=nn, domain_norm_sq=dd, cos=cos,
                            conflict=conflict, coef=coef, skipped=skipped)


BACKEND = CppBackend()
