"""Getting both ProGrad gradients from one forward pass with the least work."""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed import all_reduce_general_grads, distributed_world, is_sharded
from .optim import ProGradSGD

__all__ = ["backward"]


def backward(optimizer: ProGradSGD, task_loss: Tensor, general_loss: Tensor, *,
             all_reduce: bool | None = None, process_group=None) -> None:
    """Fill ``p.grad`` with the domain gradient and ``optimizer``'s buffer with the general one.

    The general gradient comes from ``torch.autograd.grad`` on the optimizer's parameters
    (graph retained), which hands the result over without a copy and runs no gradient
    accumulator hooks -- so DDP's reducer does not see it; then ``task_loss``'s backward
    fills ``.grad`` as usual (through DDP's hooks) and frees the graph.  Pending general
    gradients (gradient accumulation) are added to.  Scale both losses with the same
    ``GradScaler`` when using AMP.

    ``all_reduce`` (default: when torch.distributed is initialised with more than one
    process in ``process_group``): average the general gradients over the processes, as
    DDP averages ``.grad`` (:func:`prograd_fast.distributed.all_reduce_general_grads`).
    For FSDP2 (DTensor) parameters, the general gradient runs a full ``backward`` so that
    FSDP2 reduce-scatters it into the sharded gradient; other parameters that require grad
    but are not in the optimizer then receive it in ``.grad`` as well.
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
    sharded = any(is_sharded(p) for p in params)
    if sharded:
        _sharded_general_backward(optimizer, params, general_loss)
    else:
        general = iter(torch.autograd.grad(general_loss, params, retain_graph=True,
                                           allow_unused=True))
        with torch.no_grad():
            aligned = []
            for p in optimizer._params_in_order():
                g = next(general) if p.requires_grad else None
                if g is not None and g.stride() != p.stride():
                    g = torch.empty_like(p).copy_(g)  # e.g. an expanded gradient of a sum
                aligned.append(g)
            optimizer.store_general_grads(aligned)  # added to pending ones
        if all_reduce is None:
            all_reduce = distributed_world(process_group) > 1
        if all_reduce:
            all_reduce_general_grads(optimizer, process_group)
    if sharded:
        task_loss.backward()
    else:
        torch.autograd.backward(task_loss, inputs=params)


def _sharded_general_backward(optimizer: ProGradSGD, params: list[Tensor], general_loss: Tensor) -> None:
    """FSDP2: ``.grad`` is swapped for the pending general gradient during a full backward."""
    everything = optimizer._params_in_order()
    general = optimizer._pending_general_grads(take=True)
    saved = [p.grad for p in params]
    try:
        for p, g in zip(everything, general):
            if p.requires_grad:
                p.grad = g
        general_loss.backward(retain_graph=True)
        general = [p.grad if p.requires_grad else g for p, g in zip(everything, general)]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    optimizer.store_general_grads(general)
