"""The two ProGrad losses, as in the official ProGrad code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["prograd_losses"]


def prograd_losses(
    logits: Tensor, zeroshot_logits: Tensor, labels: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``(ce, kl)``: cross-entropy on the labels, and ``T^2 * KL(p_zs || p_student)`` with
    ``p = softmax(logits / T)``, averaged over the batch.  The teacher is detached.

    ``kl`` has the same gradient as the official soft-target cross-entropy
    ``-(softmax(zs/T) * log_softmax(student/T)).sum(1).mean() * T*T`` (they differ by the
    teacher's entropy, a constant) and is zero when student and teacher agree.
    """
    if logits.shape != zeroshot_logits.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and zeroshot_logits "
                         f"{tuple(zeroshot_logits.shape)} must both be (batch, classes)")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match batch {logits.shape[0]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ce = F.cross_entropy(logits, labels)
    t = float(temperature)
    # fp16/bf16 logits get fp32 math; fp64 stays fp64
    student = logits.to(torch.promote_types(logits.dtype, torch.float32))
    teacher = zeroshot_logits.detach().to(torch.promote_types(zeroshot_logits.dtype, torch.float32))
    student = F.log_softmax(student / t, dim=-1)
    teacher = F.log_softmax(teacher / t, dim=-1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)
    return ce, kl
