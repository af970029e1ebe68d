"""One CoOp / ProGrad training step with the least work, and CoOp's optimiser schedule.

Both ProGrad gradients flow from the same forward.  The losses depend on the learned
context only through the class text features ``T`` (C, D), so the step first takes the two
cheap head gradients ``dce/dT`` and ``dkl/dT`` and then runs ONE backward through the text
encoder with both as a batched grad output (``is_grads_batched``): every layer's backward
is one matrix product with twice the rows instead of two Python-driven passes with a
retained graph.  ``grad_mode="two_pass"`` uses :func:`prograd_fast.backward` instead;
``"auto"`` (the default) probes the batched backward once per device and dtype and falls
back to two passes for good if PyTorch reports a missing batching rule (which would turn
the batched backward into a slow loop) or raises.  With every group's ``lam == 0`` (plain CoOp)
the general gradient is not computed at all.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..distributed import all_reduce_general_grads, distributed_world
from ..grads import backward as prograd_backward
from ..losses import prograd_losses
from ..optim import ProGradSGD
from .model import PromptedCLIP

__all__ = ["StepOutput", "train_step", "compute_grads", "build_optimizer", "coop_lr_lambda",
           "GRAD_MODES"]

GRAD_MODES = ("auto", "batched", "two_pass")
_AUTO: dict[tuple, str] = {}  # (device type, dtype[, "image"]) -> the mode "auto" settled on


@dataclass
class StepOutput:
    """Detached device tensors of one step (reading them is the caller's sync)."""

    ce: Tensor
    kl: Tensor
    logits: Tensor


def _trainable(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def _accumulate(p: Tensor, g: Tensor) -> None:
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


def compute_grads(optimizer: ProGradSGD, text_features: Tensor | Sequence[Tensor], ce: Tensor,
                  kl: Tensor | None, grad_mode: str = "auto", all_reduce: bool | None = None) -> None:
    """Fill ``p.grad`` with d(ce)/dp and store d(kl)/dp in ``optimizer`` (``kl=None``: CoOp).

    ``text_features`` is the tensor (or tensors: the text and the prompted image features
    of a vision-prompted learner) through which both losses reach the parameters; pass
    the already scaled losses when using a ``GradScaler``.  ``all_reduce`` (default: when
    torch.distributed runs more than one process) averages the general gradients over the
    processes in both grad modes, as :func:`prograd_fast.backward` does; ``p.grad`` is left
    to the caller (DDP, or the trainer's own all-reduce).
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    params = _trainable(optimizer)
    if kl is None:
        grads = torch.autograd.grad(ce, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                _accumulate(p, g)
        return
    junction = [text_features] if isinstance(text_features, Tensor) else list(text_features)
    # the prompted image tower's batched backward is probed on its own (other layers)
    key = (junction[0].device.type, junction[0].dtype) + (("image",) if len(junction) > 1 else ())
    junction = [t for t in junction if t.requires_grad]  # fixed text features (VPT) do not join
    probe = grad_mode == "auto" and key not in _AUTO
    if grad_mode == "auto" and not probe:
        grad_mode = _AUTO[key]
    if grad_mode == "two_pass":
        prograd_backward(optimizer, ce, kl, all_reduce=all_reduce)
        return
    g_ce = torch.autograd.grad(ce, junction, retain_graph=True, allow_unused=True,
                               materialize_grads=True)
    g_kl = torch.autograd.grad(kl, junction, retain_graph=True, allow_unused=True,
                               materialize_grads=True)
    text_features = junction  # one batched backward from every junction tensor
    grad_outputs = [torch.stack([a, b]) for a, b in zip(g_ce, g_kl)]
    if probe:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                both = torch.autograd.grad(text_features, params, grad_outputs=grad_outputs,
                                           is_grads_batched=True, allow_unused=True,
                                           retain_graph=True)
        except RuntimeError:
            _AUTO[key] = "two_pass"
            prograd_backward(optimizer, ce, kl, all_reduce=all_reduce)
            return
        slow = any("batching rule" in str(w.message) for w in caught)
        _AUTO[key] = "two_pass" if slow else "batched"
    else:
        both = torch.autograd.grad(text_features, params, grad_outputs=grad_outputs,
                                   is_grads_batched=True, allow_unused=True)
    general = {}
    for p, g in zip(params, both):
        if g is not None:
            _accumulate(p, g[0])
            general[p] = g[1]
    optimizer.store_general_grads(  # a group never projected (lam 0) needs none
        [general.get(p) if grp["lam"] > 0 else None
         for grp in optimizer.param_groups for p in grp["params"]])
    if all_reduce is None:
        all_reduce = distributed_world() > 1
    if all_reduce:
        all_reduce_general_grads(optimizer)


def train_step(model: PromptedCLIP, optimizer: torch.optim.Optimizer, images: Tensor,
               labels: Tensor, *, temperature: float = 1.0, scaler=None,
               autocast_dtype: torch.dtype | None = None, grad_mode: str = "auto",
               zero_grad: bool = True, step: bool = True, loss_weight: float | Tensor = 1.0,
               inputs_are_features: bool = False) -> StepOutput:
    """Forward once, get both gradients, step (``optimizer.step`` or ``scaler.step``).

    ``autocast_dtype`` (``torch.bfloat16`` / ``torch.float16``) runs the forward under
    autocast on the images' device; ``scaler`` (``torch.amp.GradScaler``) scales both
    losses with the same scale.  A ``ProGradSGD`` with every ``lam == 0`` is plain CoOp;
    another optimiser (e.g. ``torch.optim.SGD``) also gets plain CoOp.  No host sync.
    ``loss_weight`` multiplies both losses before the gradients (data-parallel training
    weighs each process's share of a global batch); ``inputs_are_features``: ``images``
    are already normalised image features (cached training features; refused for a
    learner that prompts the image tower).  An image-conditioned learner (CoCoOp) gets the
    image features for its prompts; a vision-prompted one (MaPLe) is scored on its prompted
    image tower, and the teacher on one more no-grad pass of the frozen tower.  A learner's own
    loss (:meth:`PromptedCLIP.extra_loss`, e.g. KgCoOp's) is added to the cross-entropy:
    ``p.grad`` is the gradient of that sum (ProGrad's domain gradient); ``ce`` stays the
    cross-entropy alone.
    """
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    ctx = (torch.autocast(images.device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else nullcontext())
    with ctx:
        vision = model.vision_prompted
        if inputs_are_features:
            if vision:
                raise ValueError(f"{type(model.prompt_learner).__name__} prompts the image "
                                 f"tower: train on images, not on cached image features")
            image_features = teacher_features = images
        else:
            image_features, teacher_features = model.student_and_teacher_features(images)
        text_features = model.text_features(image_features)
        logits = model.logits(image_features, text_features)
        zs = model.zeroshot_logits(teacher_features)
    loss_dtype = torch.promote_types(logits.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
    ce, kl = prograd_losses(logits.to(loss_dtype), zs.to(loss_dtype), labels, temperature)
    extra = model.extra_loss(text_features)  # the learner's own term: part of the domain loss
    domain = ce if extra is None else ce + extra.to(loss_dtype)
    prograd = isinstance(optimizer, ProGradSGD) and any(g["lam"] > 0 for g in optimizer.param_groups)
    scale = scaler.scale if scaler is not None else (lambda x: x)
    weighted = (lambda x: x) if isinstance(loss_weight, (int, float)) and loss_weight == 1 else (
        lambda x: x * loss_weight)
    junction = (text_features, image_features) if vision else text_features
    compute_grads(optimizer, junction, scale(weighted(domain)),
                  scale(weighted(kl)) if prograd else None, grad_mode)
    if step:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return StepOutput(ce.detach(), kl.detach(), logits.detach())


def build_optimizer(model: PromptedCLIP, lr: float = 0.002, momentum: float = 0.9,
                    weight_decay: float = 5e-4, lam: float = 1.0, split_groups: bool = False,
                    **kwargs) -> ProGradSGD:
    """CoOp's SGD (lr 0.002, momentum 0.9, weight decay 5e-4) on the prompt learner, with
    ProGrad's projection (``lam=1``) or plain CoOp (``lam=0``).

    The parameter groups are the learner's ``param_groups(split_groups)``: by default one
    group, projected as one vector (ProGrad's paper); ``split_groups=True`` lets a learner
    with prompts in both towers give one group per tower, each projected on its own.  A
    group's own ``"lam"`` (0 for a part the teacher's loss does not reach) or
    ``"granularity"`` overrides ``lam`` / ``granularity`` for it; ``lam=0`` is plain CoOp
    for every group.  Groups left without a parameter that requires grad are dropped."""
    learner = model.prompt_learner
    hook = getattr(learner, "param_groups", None)
    groups = hook(split_groups) if hook is not None else [
        {"params": [p for p in learner.parameters() if p.requires_grad]}]
    built = []
    for group in groups:
        group = {**group, "params": [p for p in group["params"] if p.requires_grad]}
        if lam == 0:
            group["lam"] = 0.0
        if group["params"]:
            built.append(group)
    return ProGradSGD(built, lr=lr, momentum=momentum, weight_decay=weight_decay, lam=lam,
                      **kwargs)


def coop_lr_lambda(max_epoch: int, warmup_epochs: int = 1, base_lr: float = 0.002,
                   warmup_lr: float = 1e-5):
    """Per-epoch lr factor for ``LambdaLR``, equal to Dassl's ConstantWarmupScheduler around
    CosineAnnealingLR(T_max=max_epoch) as CoOp configures it: ``warmup_lr`` for the first
    ``warmup_epochs`` epochs, then the cosine restarts from ``base_lr`` (epoch ``e`` uses the
    cosine's epoch ``e - warmup_epochs``: the first epoch after warm-up runs at the full
    rate, and the last of ``max_epoch`` epochs at cos(pi (max_epoch - 1 - warmup) / T))."""
    if max_epoch < 1:
        raise ValueError(f"max_epoch must be >= 1, got {max_epoch}")

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_lr / base_lr if base_lr > 0 else 0.0  # lr 0: any factor gives 0
        t = min(epoch - warmup_epochs, max_epoch)
        return 0.5 * (1.0 + math.cos(math.pi * t / max_epoch))

    return factor
