"""Data-parallel prompt tuning over torch.distributed (``torchrun --nproc_per_node N``).

Every process holds the whole (small) prompt and the frozen CLIP.  Each step, all
processes draw the same global batch (one seeded permutation per epoch, shared through the
trainer's generator) and each takes its share (``batch[rank::world]``).  The losses are
weighted by ``share / global batch * world`` and both gradients are averaged over the
processes, so the update is the single-process update on the global batch whatever the
split (an empty share contributes a zero-weighted dummy item).  ``train_step`` takes its
gradients with ``torch.autograd.grad`` (one batched backward), which DDP's reducer hooks
do not see, so the domain gradient is all-reduced here, once per step, as one flat
buffer, and the general gradient by :func:`prograd_fast.distributed.all_reduce_general_grads`
-- what ``DistributedDataParallel`` does for ``.grad``, without a module wrapper.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import distributed_world

__all__ = ["init_from_env", "world_size", "rank", "is_main", "global_batches", "local_share",
           "all_reduce_grads", "all_reduce_sum", "broadcast_object", "barrier"]


def init_from_env(device: str | torch.device | None = None,
                  timeout: timedelta = timedelta(minutes=30)) -> torch.device:
    """This process's device; under torchrun (``WORLD_SIZE`` > 1) also initialise the default
    process group once (NCCL on CUDA, gloo otherwise) and pick ``cuda:LOCAL_RANK``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return device


def world_size() -> int:
    return distributed_world()


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """True on the process that writes files (rank 0, or the only process)."""
    return rank() == 0


def global_batches(n: int, batch_size: int, drop_last: bool,
                   generator: torch.Generator) -> list[list[int]]:
    """One epoch of shuffled global batches of ``range(n)`` (identical on every process)."""
    perm = torch.randperm(n, generator=generator).tolist()
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def local_share(batch: Sequence[int], rank: int, world: int) -> tuple[list[int], float]:
    """This process's items of a global batch and the weight of its mean loss
    (``len(share) * world / len(batch)``; averaged over processes that is the global mean)."""
    mine = list(batch[rank::world])
    if not mine:  # fewer items than processes: take part in the collectives with weight 0
        return [batch[0]], 0.0
    return mine, len(mine) * world / len(batch)


@torch.no_grad()
def all_reduce_grads(params: Sequence[Tensor]) -> None:
    """Average ``p.grad`` over the processes: one flat buffer per (device, dtype); a missing
    gradient counts as zeros so that every process issues the same collectives."""
    world = world_size()
    if world == 1:
        return
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    for bucket in buckets.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p in bucket:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


def all_reduce_sum(t: Tensor) -> Tensor:
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (a decision all processes must share)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
