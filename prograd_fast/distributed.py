"""ProGrad on torch.distributed: DDP (general gradients all-reduced) and FSDP2 (sharded params).

DDP reduces ``p.grad`` through hooks on the parameters' gradient accumulators.  The general
gradient, taken with ``torch.autograd.grad`` by :func:`prograd_fast.backward`, never passes
those hooks (which is what we want: a second backward through DDP's hooks in the same
iteration is ignored by DDP's reducer, see docs/hardening.md), so it is averaged here, once,
as one flat buffer per (device, dtype), before the step.  :func:`prograd_fast.backward` does
it automatically when a process group of more than one process is initialised.

FSDP2 (``torch.distributed.fsdp.fully_shard``) leaves DTensor parameters sharded along
dim 0.  :class:`prograd_fast.ProGradSGD` runs such a group on the local shards with the
reference math, completing the per-tensor partial ``<d,g>``, ``||g||^2`` and ``||d||^2``
with one all-reduce of ``3 x T`` numbers (no host synchronisation), so every process makes
the same projection decision as an unsharded run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .functional import ProGradStats, prograd_sgd

__all__ = ["all_reduce_general_grads", "any_sharded", "distributed_world", "is_sharded",
           "sharded_group_step"]


_DTENSOR: list = []  # the DTensor class (or None), imported on first use


def _dtensor_type():
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_sharded(t: Tensor | None) -> bool:
    """True for a DTensor (an FSDP2 / tensor-parallel parameter or gradient)."""
    cls = _DTENSOR[0] if _DTENSOR else _dtensor_type()
    return cls is not None and isinstance(t, cls)


def any_sharded(tensors) -> bool:
    """True when any of ``tensors`` is a DTensor (one cheap pass, called every step)."""
    cls = _DTENSOR[0] if _DTENSOR else _dtensor_type()
    return cls is not None and any(issubclass(kind, cls) for kind in set(map(type, tensors)))


def distributed_world(process_group=None) -> int:
    """Number of processes in ``process_group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


@torch.no_grad()
def all_reduce_general_grads(optimizer, process_group=None, average: bool = True) -> None:
    """Average (or sum) the pending general gradients of ``optimizer`` over the processes.

    One flat buffer per (device, dtype), one ``all_reduce`` each, as DDP does for ``p.grad``.
    Every trainable parameter takes part on every process (a missing general gradient is
    zeros, the same as in a single-process run on the concatenated batch), so all processes
    issue identical collectives.  A no-op for a single process.
    """
    world = distributed_world(process_group)
    if world == 1:
        return
    params = optimizer._params_in_order()
    if any(is_sharded(p) for p in params if p.requires_grad):
        raise RuntimeError("all_reduce_general_grads is for replicated (DDP) parameters; FSDP2 "
                           "already reduce-scatters the general gradient into sharded .grad")
    generals = optimizer._pending_general_grads(take=True)
    buckets: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p.requires_grad:
            buckets.setdefault((p.device, p.dtype), []).append(i)
    for bucket in buckets.values():
        grads = [generals[i] if generals[i] is not None else torch.zeros_like(params[i])
                 for i in bucket]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=process_group)
        if average:
            flat.div_(world)
        offset = 0
        for i in bucket:
            n = params[i].numel()
            generals[i] = flat[offset:offset + n].view_as(params[i])
            offset += n
    optimizer.store_general_grads(generals)


def _local(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to_local()


def _placement_weights(params, mesh) -> Tensor:
    """Per tensor: 1 for a sharded tensor (partials sum over processes), 1/n for a replicated
    one (every process holds the whole tensor)."""
    from torch.distributed.tensor import Replicate, Shard

    n = mesh.size()
    weights = []
    for i, p in enumerate(params):
        (placement,) = p.placements
        if isinstance(placement, Shard):
            weights.append(1.0)
        elif isinstance(placement, Replicate):
            weights.append(1.0 / n)
        else:
            raise NotImplementedError(f"parameter {i} has placement {placement}; ProGradSGD "
                                      "supports Shard and Replicate DTensor parameters")
    return torch.tensor(weights, dtype=torch.float64)


def _check_sharded(step) -> None:
    params = step.params
    mesh = params[0].device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError("ProGradSGD supports DTensor parameters on a 1-D device mesh "
                                  f"(FSDP2), got a {mesh.ndim}-D mesh")
    for name, tensors in (("parameter", params), ("gradient", step.grads),
                          ("general gradient", step.general_grads),
                          ("momentum buffer", step.momentum_buffers)):
        for i, t in enumerate(tensors):
            if t is None:
                continue
            if not is_sharded(t):
                raise RuntimeError(f"{name} {i} is a plain tensor in a group of DTensor "
                                   "parameters: mixing sharded and unsharded tensors is not supported")
            if t.device_mesh != mesh or t.placements != params[i].placements:
                raise RuntimeError(f"{name} {i} is laid out differently from its parameter "
                                   f"({t.placements} on {t.device_mesh} vs {params[i].placements})")


@torch.no_grad()
def sharded_group_step(step) -> ProGradStats:
    """One group's step for DTensor (FSDP2) parameters: the reference math on the local
    shards, with the dot/norm partials all-reduced over the mesh (one small collective)."""
    from torch.distributed.tensor import DTensor

    _check_sharded(step)
    params = step.params
    mesh = params[0].device_mesh
    group = mesh.get_group()
    weights = _placement_weights(params, mesh)

    def complete(partials: Tensor) -> None:
        partials.mul_(weights.to(device=partials.device, dtype=partials.dtype))
        dist.all_reduce(partials, group=group)

    bufs = [_local(b) for b in step.momentum_buffers]
    hyper = step.hyper()
    if is_sharded(hyper["lr"]):
        hyper["lr"] = hyper["lr"].full_tensor()
    stats = prograd_sgd([_local(p) for p in params], [_local(d) for d in step.grads],
                        [_local(g) for g in step.general_grads], bufs, reduce_hook=complete,
                        **hyper)
    for i, (p, old, new) in enumerate(zip(params, step.momentum_buffers, bufs)):
        if old is None and new is not None:
            step.momentum_buffers[i] = DTensor.from_local(new, mesh, p.placements, run_check=False,
                                                          shape=p.shape, stride=p.stride())
    return stats
