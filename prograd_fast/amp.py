"""Mixed precision: a ``torch.amp.GradScaler`` that also sees ProGrad's general gradients.

:class:`prograd_fast.ProGradSGD` declares ``_step_supports_amp_scaling``: ``scaler.step``
hands it ``grad_scale`` and ``found_inf`` and the step unscales BOTH gradients on the
device and skips the whole update when either holds an inf/NaN.  The stock
``GradScaler`` however inspects only ``p.grad`` when it decides whether to lower the scale
(``update()``), and ``scaler.unscale_(optimizer)`` unscales only ``p.grad``.
:class:`ProGradGradScaler` closes both gaps: its inf check and ``unscale_`` cover the
pending general gradients too (unscaled in place), so a step skipped because only the
general gradient overflowed also lowers the scale.  With the stock scaler the update is
still right (see docs/hardening.md): skips are never missed, the projection does not
depend on the general gradient's scale, but the scale is not lowered for a general-only
overflow and, after ``unscale_``, ``stats()`` report ``dot``/``general_norm_sq``/``coef``
in scaled units.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ProGradGradScaler", "pending_general_grads"]


def pending_general_grads(optimizer) -> list[Tensor]:
    """The general gradients stored in ``optimizer`` and not yet consumed by a step."""
    return [g for g in optimizer._pending_general_grads() if g is not None]


class ProGradGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose inf check and ``unscale_`` include the general gradients.

    Use it exactly like ``torch.amp.GradScaler``; scale both losses with it::

        scaler = ProGradGradScaler("cuda")
        prograd_fast.backward(opt, scaler.scale(task_loss), scaler.scale(general_loss))
        scaler.step(opt)
        scaler.update()
    """

    def _unscale_grads_(self, optimizer, inv_scale: Tensor, found_inf: Tensor,
                        allow_fp16: bool) -> dict[torch.device, Tensor]:
        per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        buckets: dict[torch.device, dict[torch.dtype, list[Tensor]]] = {}
        for g in pending_general_grads(optimizer):
            if hasattr(g, "to_local"):  # DTensor: each process checks its own shard
                g = g.to_local()
            if not allow_fp16 and g.dtype == torch.float16:
                raise ValueError("Attempting to unscale FP16 general gradients.")
            buckets.setdefault(g.device, {}).setdefault(g.dtype, []).append(g)
        with torch.no_grad():
            for device, per_dtype in buckets.items():
                if device not in per_device:
                    per_device[device] = found_inf.to(device=device, copy=True)
                device_inv_scale = inv_scale.to(device=device)
                for grads in per_dtype.values():
                    torch._amp_foreach_non_finite_check_and_unscale_(
                        grads, per_device[device], device_inv_scale)
        return per_device
