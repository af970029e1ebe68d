"""Pure-PyTorch reference of ProGrad-SGD: the source of truth every fast backend must match.

For one parameter group with domain gradients ``d_i`` (``p.grad``) and general gradients
``g_i`` (from the KL loss toward the zero-shot teacher)::

    global:  dot = sum_i <d_i, g_i>,  nn = sum_i ||g_i||^2       (one flattened vector)
    tensor:  dot_i = <d_i, g_i>,      nn_i = ||g_i||^2           (each tensor on its own)
    coef = lam * dot / nn   if dot < 0 and nn > 0 and both finite, else 0
    u_i  = d_i - coef * g_i

followed by exactly ``torch.optim.SGD`` on ``u_i`` (weight decay after the projection,
momentum, dampening, nesterov, maximize, lr).  Reductions and the update run in float32
(float64 for float64 parameters); results are written back in the parameter's dtype.
Nothing here synchronises with the host: the conflict decision is a device-side mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "GRANULARITIES",
    "ProGradStats",
    "compute_dtype",
    "prograd_coefficient",
    "reduce_dot_norms",
    "project",
    "prograd_sgd",
]

GRANULARITIES = ("global", "tensor")


@dataclass
class ProGradStats:
    """Device tensors describing one group's projection (0-d for "global", 1-d for "tensor").

    ``cos``: cosine between the domain and general gradients (0 where either is zero);
    ``conflict``: ``dot < 0`` with a finite, non-zero general gradient;
    ``coef``: the coefficient applied, ``u = d - coef * g``;
    ``dot``, ``general_norm_sq``, ``domain_norm_sq``: the raw reductions (unscaled);
    ``skipped``: 0-d, True when the whole update was skipped (AMP found an inf/NaN).
    """

    dot: Tensor
    general_norm_sq: Tensor
    domain_norm_sq: Tensor
    cos: Tensor
    conflict: Tensor
    coef: Tensor
    skipped: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return dict(self.__dict__)


def compute_dtype(dtypes) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (fp16/bf16 math runs in fp32)."""
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32


def _check_options(lam: float, granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")


def prograd_coefficient(dot: Tensor, general_norm_sq: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Return ``(coef, conflict)``: ``coef = lam*dot/nn`` where ``dot < 0``, ``nn > 0`` and both
    are finite, else 0.  Pure tensor ops (``where``), so no host synchronisation."""
    conflict = (dot < 0) & (general_norm_sq > 0) & torch.isfinite(dot) & torch.isfinite(general_norm_sq)
    safe_nn = torch.where(conflict, general_norm_sq, torch.ones_like(general_norm_sq))
    coef = torch.where(conflict, lam * dot / safe_nn, torch.zeros_like(dot))
    return coef, conflict


def _cosine(dot: Tensor, dd: Tensor, nn: Tensor) -> Tensor:
    denom = torch.sqrt(dd) * torch.sqrt(nn)
    positive = denom > 0
    return torch.where(positive, dot / torch.where(positive, denom, torch.ones_like(denom)), torch.zeros_like(dot))


def reduce_dot_norms(
    grads: list[Tensor],
    general_grads: list[Tensor | None],
    dtype: torch.dtype = torch.float32,
    inv_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-tensor ``(<d,g>, ||g||^2, ||d||^2)`` as 1-d tensors of length ``len(grads)``,
    accumulated in ``dtype``; a missing general gradient contributes zeros."""
    if not grads:
        raise ValueError("reduce_dot_norms needs at least one gradient")
    device = grads[0].device
    dots, nns, dds = [], [], []
    for d, g in zip(grads, general_grads):
        d = d.to(dtype).reshape(-1)
        if inv_scale is not None:
            d = d * inv_scale.to(dtype)
        dds.append(torch.dot(d, d))
        if g is None:
            zero = torch.zeros((), dtype=dtype, device=device)
            dots.append(zero)
            nns.append(zero)
            continue
        g = g.to(dtype).reshape(-1)
        if inv_scale is not None:
            g = g * inv_scale.to(dtype)
        dots.append(torch.dot(d, g))
        nns.append(torch.dot(g, g))
    return torch.stack(dots), torch.stack(nns), torch.stack(dds)


def _group_stats(
    grads, general_grads, lam, granularity, dtype, inv_scale, skipped, reduce_hook=None
) -> ProGradStats:
    dots, nns, dds = reduce_dot_norms(grads, general_grads, dtype, inv_scale)
    if reduce_hook is not None:
        # Sharded parameters: the per-tensor partial sums are completed across processes.
        partials = torch.stack([dots, nns, dds])
        reduce_hook(partials)
        dots, nns, dds = partials.unbind(0)
    if granularity == "global":
        dots, nns, dds = dots.sum(), nns.sum(), dds.sum()
    coef, conflict = prograd_coefficient(dots, nns, lam)
    return ProGradStats(
        dot=dots,
        general_norm_sq=nns,
        domain_norm_sq=dds,
        cos=_cosine(dots, dds, nns),
        conflict=conflict,
        coef=coef,
        skipped=skipped,
    )


def project(
    grads: list[Tensor],
    general_grads: list[Tensor | None],
    lam: float = 1.0,
    granularity: str = "global",
) -> tuple[list[Tensor], ProGradStats]:
    """The ProGrad gradients ``u_i`` (in the compute dtype) and the group's statistics."""
    _check_options(lam, granularity)
    dtype = compute_dtype(d.dtype for d in grads)
    device = grads[0].device
    stats = _group_stats(grads, general_grads, lam, granularity, dtype, None,
                         torch.zeros((), dtype=torch.bool, device=device))
    out = []
    for i, (d, g) in enumerate(zip(grads, general_grads)):
        d = d.to(dtype)
        if g is None:
            out.append(d.clone())
            continue
        coef = stats.coef if granularity == "global" else stats.coef[i]
        conflict = stats.conflict if granularity == "global" else stats.conflict[i]
        out.append(torch.where(conflict, d - coef * g.to(dtype), d))
    return out, stats


def prograd_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    general_grads: list[Tensor | None],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    lam: float = 1.0,
    granularity: str = "global",
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    reduce_hook: Callable[[Tensor], None] | None = None,
) -> ProGradStats:
    """One ProGrad-SGD step on one parameter group, in place; the readable reference.

    ``momentum_buffers`` is updated in place (``None`` entries get new buffers, in the
    parameter's dtype, as ``torch.optim.SGD`` keeps them).  ``grad_scale`` / ``found_inf``
    follow the ``torch.amp.GradScaler`` contract of fused optimizers: both gradients are
    divided by ``grad_scale``; the whole update is skipped (params and buffers unchanged)
    where ``found_inf`` is non-zero or the general gradient holds an inf/NaN.
    ``reduce_hook`` (used for sharded parameters, see :mod:`prograd_fast.distributed`)
    receives the ``(3, T)`` per-tensor partials ``<d,g>, ||g||^2, ||d||^2`` and must
    complete them in place (e.g. an all-reduce) before the coefficient is computed.
    """
    _check_options(lam, granularity)
    if not (len(params) == len(grads) == len(general_grads) == len(momentum_buffers)):
        raise ValueError("params, grads, general_grads and momentum_buffers must have equal lengths")
    if not params:
        raise ValueError("prograd_sgd needs at least one parameter")
    dtype = compute_dtype(p.dtype for p in params)
    device = params[0].device
    inv_scale = None
    skipped = torch.zeros((), dtype=torch.bool, device=device)
    amp = grad_scale is not None or found_inf is not None
    if grad_scale is not None:
        inv_scale = (1.0 / grad_scale.to(device=device, dtype=torch.float64)).to(dtype)
    if found_inf is not None:
        skipped = found_inf.to(device) != 0
    stats = _group_stats(grads, general_grads, lam, granularity, dtype, inv_scale, skipped,
                         reduce_hook)
    if amp:
        # An inf/NaN anywhere in either gradient skips the step, as GradScaler expects.
        bad = ~torch.isfinite(stats.general_norm_sq.sum()) | ~torch.isfinite(stats.domain_norm_sq.sum())
        stats.skipped = skipped | bad
        skipped = stats.skipped

    for i, param in enumerate(params):
        d = grads[i].to(dtype)
        if inv_scale is not None:
            d = d * inv_scale
        g = general_grads[i]
        if g is not None:
            coef = stats.coef if granularity == "global" else stats.coef[i]
            conflict = stats.conflict if granularity == "global" else stats.conflict[i]
            g = g.to(dtype)
            if inv_scale is not None:
                g = g * inv_scale
            d = torch.where(conflict, d - coef * g, d)
        u = -d if maximize else d
        p32 = param.to(dtype)
        if weight_decay != 0:
            u = u.add(p32, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                new_buf = u.clone()
                if amp:
                    new_buf = torch.where(skipped, torch.zeros_like(new_buf), new_buf)
                buf = new_buf.to(param.dtype)
                momentum_buffers[i] = buf
                buf32 = new_buf
            else:
                buf32 = buf.to(dtype).mul(momentum).add(u, alpha=1 - dampening)
                buf.copy_(torch.where(skipped, buf, buf32.to(buf.dtype)) if amp else buf32)
            u = u.add(buf32, alpha=momentum) if nesterov else buf32
        if isinstance(lr, Tensor):  # any 1-element shape ([1, 1] too), as SGD accepts
            new_p = p32 - lr.to(device=device, dtype=dtype).reshape(()) * u
        else:
            new_p = p32.add(u, alpha=-lr)
        if amp:
            new_p = torch.where(skipped, p32, new_p)
        param.copy_(new_p)
    return stats
