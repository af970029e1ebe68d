"""Getting both ProGrad gradients from one forward pass with the least work."""

from __future__ import annotations

import torch
from torch import Tensor

from .optim import GENERAL_KEY, ProGradSGD

__all__ = ["backward"]


def backward(optimizer: ProGradSGD, task_loss: Tensor, general_loss: Tensor) -> None:
    """Fill ``p.grad`` with the domain gradient and ``optimizer``'s buffer with the general one.

    Runs ``general_loss``'s backward first, restricted to the optimizer's parameters
    (``inputs=``), with ``.grad`` temporarily detached so autograd hands its result over
    without a copy; then ``task_loss``'s backward accumulates into ``.grad`` as usual
    (gradient accumulation keeps working for both gradients).  The graph is retained
    only for the first call and freed by the second.  Scale both losses with the same
    ``GradScaler`` when using AMP.
    """
    if not isinstance(optimizer, ProGradSGD):
        raise TypeError("prograd_fast.backward needs a ProGradSGD optimizer")
    for name, loss in (("task_loss", task_loss), ("general_loss", general_loss)):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"{name} must be a scalar tensor")
        if not loss.requires_grad:
            raise ValueError(f"{name} does not require grad: it does not depend on the parameters")
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if not params:
        raise ValueError("the optimizer has no parameter that requires grad")
    saved = [p.grad for p in params]
    try:
        for p in params:
            # A pending general gradient (gradient accumulation) receives the new one in place.
            p.grad = optimizer.state[p].pop(GENERAL_KEY, None) if p in optimizer.state else None
        torch.autograd.backward(general_loss, inputs=params, retain_graph=True)
        general = [p.grad for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    with torch.no_grad():
        for p, g in zip(params, general):
            if g is not None:
                optimizer.state[p][GENERAL_KEY] = g
    torch.autograd.backward(task_loss, inputs=params)
