"""``ProGradSGD.step`` under ``torch.compile``: the C++ kernel as a torch custom op.

Eager steps call the compiled extensions directly and keep a C host helper's caches
(:mod:`prograd_fast._host`); neither is something Dynamo can trace (pybind functions), so
a compiled step would break its graph there.  While Dynamo traces (``torch.compiler.
is_compiling()``), :meth:`ProGradSGD.step` runs :func:`traced_step` instead: plain Python
over the optimizer's state (which Dynamo follows and guards), and per group one call of

- ``prograd_fast::sgd_step_cpu`` for CPU groups (backend ``"auto"`` or ``"cpp"``): the C++
  kernel (``csrc/prograd_cpu.cpp``) registered with ``torch.library``, which also runs the
  reference math where eager ``"auto"`` would (the kernel does not build here); its fake
  implementation only mutates, as shapes never change;
- the reference math of :mod:`prograd_fast.functional` otherwise (``backend="torch"``, other
  devices): pure tensor ops, which Inductor compiles itself.

The update is the eager one (same kernel, or the same math), so a compiled step matches an
eager one to rounding.  Momentum buffers a first step needs are made in the graph and
filled by the kernel as its own first step would.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext
from ._step import BUFFER_KEY, check_grad
from .functional import ProGradStats, prograd_sgd
from .backends import BackendUnavailableError, requested_backend

__all__ = ["sgd_step_cpu", "traced_checked_general", "traced_step"]



@torch.library.custom_op("prograd_fast::sgd_step_cpu",
                         mutates_args=("params", "momentum_buffers", "stats_f", "stats_b"),
                         device_types="cpu")
def sgd_step_cpu(params: list[Tensor], grads: list[Tensor],
                 general_grads: list[Optional[Tensor]], momentum_buffers: list[Tensor],
                 fresh_buffers: list[bool], lr: float, lr_tensor: Optional[Tensor],
                 momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                 maximize: bool, lam: float, global_: bool, grad_scale: Optional[Tensor],
                 found_inf: Optional[Tensor], stats_f: Tensor, stats_b: Tensor,
                 backend: str) -> None:
    """One ProGrad-SGD step of a CPU group, in place: on the C++ kernel, or -- where the
    group's ``backend`` (``PROGRAD_FAST_BACKEND`` applies to ``"auto"``) is ``"torch"``, or
    is ``"auto"`` and the kernel does not build -- on the reference math (a backend named
    explicitly that cannot run raises, as in eager).  With momentum, ``momentum_buffers``
    holds one buffer per parameter; those flagged in ``fresh_buffers`` are new (contents
    ignored) and get a first step's value.  Without momentum it is empty.  Statistics are
    written into ``stats_f`` / ``stats_b`` (the layout of
    :func:`prograd_fast.backends._common.stats_buffers`)."""
    bufs = ([None if fresh else b for b, fresh in zip(momentum_buffers, fresh_buffers)]
            if momentum != 0 else [None] * len(params))
    name = requested_backend(backend)
    reason = _ext.unavailable_reason("cpu") if name in ("auto", "cpp") else None
    if name == "cpp" and reason is not None:
        raise BackendUnavailableError(f"backend 'cpp' cannot run this step: {reason}")
    if name not in ("auto", "cpp", "torch"):
        raise BackendUnavailableError(f"backend {name!r} cannot run a CPU group")
    if name == "torch" or reason is not None:
        stats = prograd_sgd(params, grads, general_grads, bufs, lr=lr_tensor if lr_tensor
                            is not None else lr, momentum=momentum, dampening=dampening,
                            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                            lam=lam, granularity="global" if global_ else "tensor",
                            grad_scale=grad_scale, found_inf=found_inf)
        S = 1 if global_ else len(params)
        views = _stats_views(stats_f, stats_b, S, global_)
        for key, value in stats.as_dict().items():
            getattr(views, key).copy_(value)
        out = bufs
    else:
        _, out = _ext.load("cpu").prograd_sgd(
            params, grads, general_grads, bufs, lr, lr_tensor, momentum, dampening,
            weight_decay, nesterov, maximize, lam, global_, grad_scale, found_inf, stats_f,
            stats_b)
    if momentum != 0:
        for b, new, fresh in zip(momentum_buffers, out, fresh_buffers):
            if fresh:
                b.copy_(new)


@sgd_step_cpu.register_fake
def _(params, grads, general_grads, momentum_buffers, fresh_buffers, lr, lr_tensor, momentum,
      dampening, weight_decay, nesterov, maximize, lam, global_, grad_scale, found_inf,
      stats_f, stats_b, backend) -> None:
    return None  # everything it writes is an input, shapes unchanged


def _stats_views(stats_f: Tensor, stats_b: Tensor, S: int, glob: bool) -> ProGradStats:
    if glob:
        dot, nn, dd, cos, coef, conflict = [stats_f[k] for k in range(5)] + [stats_b[0]]
    else:
        dot, nn, dd, cos, coef, conflict = [stats_f[k * S:(k + 1) * S] for k in range(5)] + [
            stats_b[:S]]
    return ProGradStats(dot=dot, general_norm_sq=nn, domain_norm_sq=dd, cos=cos,
                        conflict=conflict, coef=coef, skipped=stats_b[S])


def _cpu_group(group: dict, params, grads, generals, bufs, grad_scale, found_inf
               ) -> ProGradStats:
    """The group's step on the custom op; ``bufs`` gets the buffers it made."""
    momentum = group["momentum"] != 0
    fresh = [b is None for b in bufs] if momentum else []
    if momentum:
        for i, p in enumerate(params):
            if bufs[i] is None:
                bufs[i] = torch.empty_like(p, memory_format=torch.contiguous_format)
    glob = group["granularity"] == "global"
    S = 1 if glob else len(params)
    acc = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    stats_f = torch.empty(5 * S, dtype=acc)
    stats_b = torch.zeros(S + 1, dtype=torch.bool)
    lr = group["lr"]
    lr_tensor = lr if isinstance(lr, Tensor) else None
    sgd_step_cpu(params, grads, generals, list(bufs) if momentum else [], fresh,
                 0.0 if lr_tensor is not None else float(lr), lr_tensor,
                 float(group["momentum"]), float(group["dampening"]),
                 float(group["weight_decay"]), bool(group["nesterov"]),
                 bool(group["maximize"]), float(group["lam"]), glob, grad_scale, found_inf,
                 stats_f, stats_b, group["backend"])
    return _stats_views(stats_f, stats_b, S, glob)


def traced_step(opt, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """:meth:`ProGradSGD.step` (after the closure) as Dynamo can trace it: the same
    consumption of general gradients, the same update, statistics and warning."""
    state = opt.state
    any_general = any_stepped = False
    for index, group in enumerate(opt.param_groups):
        params, grads, generals, bufs = [], [], [], []
        momentum = group["momentum"] != 0
        pending = opt._general_grads[index]
        opt._general_grads[index] = None  # consumed
        if pending is not None and len(pending) != len(group["params"]):
            raise RuntimeError(f"{len(pending)} general gradients are pending for a group of "
                               f"{len(group['params'])} parameters: the group changed between "
                               "store_general_grads() and step()")
        for i, p in enumerate(group["params"]):
            entry = state[p] if p in state else None
            general = pending[i] if pending is not None else None
            if p.grad is None:
                continue
            check_grad(p, p.grad, "domain")  # made at trace time: layouts are static
            params.append(p)
            grads.append(p.grad)
            generals.append(general)
            bufs.append(entry.get(BUFFER_KEY) if momentum and entry is not None else None)
            any_general |= general is not None
        if not params:
            continue
        any_stepped = True
        before = list(bufs)
        if params[0].device.type == "cpu" and group["backend"] != "torch":
            stats = _cpu_group(group, params, grads, generals, bufs, grad_scale, found_inf)
        else:
            stats = prograd_sgd(params, grads, generals, bufs, lr=group["lr"],
                                momentum=group["momentum"], dampening=group["dampening"],
                                weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                                maximize=group["maximize"], lam=group["lam"],
                                granularity=group["granularity"], grad_scale=grad_scale,
                                found_inf=found_inf)
        opt._stats[index] = stats
        if momentum:
            for p, old, new in zip(params, before, bufs):
                if new is not old:
                    state[p][BUFFER_KEY] = new
    opt._warn_once_if_plain_sgd(any_stepped, any_general, stacklevel=4)


def traced_checked_general(params: list, grads: list) -> list:
    """:func:`prograd_fast._step.checked_general` as Dynamo can trace it: the same checks
    (made at trace time: shapes, dtypes and devices are static), detached gradients."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        if not isinstance(g, Tensor):
            raise TypeError(f"general gradients must be tensors or None, got {type(g).__name__}")
        check_grad(p, g, "general")
    return [None if g is None else g.detach() for g in grads]
