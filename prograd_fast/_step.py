"""The optimizer's per-step host path, kept cheap (a few C-level passes per group).

``ProGradSGD.step`` runs every iteration: for CoOp's single 16x512 context the Python
around the kernel launch is the whole cost, so this module does it without per-step
objects: :func:`gather` collects one group's tensors, :func:`refill` reuses the group's
:class:`GroupStep`, :func:`hooked_step` replaces torch's per-call ``record_function``
wrapper (about 5 us) by one that profiles, runs hooks and compiles exactly as torch's does
whenever any of those is active.  With the C host helper (:mod:`prograd_fast._host`) the
per-tensor reads of :func:`gather` and :func:`checked_general` run in one C pass each, on
state dicts looked up once (:class:`~prograd_fast._host.StateDicts`); anything unusual
(tensor subclasses such as DTensor, sparse or complex tensors, a missing state entry)
goes to the Python path below, which raises the clear errors.  Pending general gradients
are not in ``state``: the optimizer keeps them per group, aligned with the group's
parameters (:meth:`ProGradSGD.store_general_grads`), and hands them to :func:`gather`.
"""

from __future__ import annotations

import functools
import operator
from itertools import repeat

import torch
from torch.autograd import profiler as _profiler
from torch.optim import Optimizer
from torch.optim import optimizer as _optimizer_module

from .backends import GroupStep
from .distributed import any_sharded

BUFFER_KEY = "momentum_buffer"
_GRAD = operator.attrgetter("grad")
_LAYOUT = operator.attrgetter("layout")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_SIZE = torch.Tensor.size
_NONE_TYPE = type(None)
_GET_BUFFER = operator.methodcaller("get", BUFFER_KEY)
_STRIDED = frozenset([torch.strided])
_COMPLEX = frozenset([torch.complex32, torch.complex64, torch.complex128])


def hooked_step(func):
    """Wrap an optimizer's ``step`` like torch's ``Optimizer.profile_hook_step`` (grad mode
    off during the step, then ``_optimizer_step_code``), but enter ``record_function`` and
    walk the hook dictionaries only when a profiler runs or a hook is registered; then
    torch's own wrapper runs, unchanged.  (Dynamo traces the short path too: inside a
    compiled graph ``record_function`` would only be dropped, with a warning.)"""
    slow = Optimizer.profile_hook_step(torch.no_grad()(func))
    hooks = _optimizer_module
    grad_enabled = torch.is_grad_enabled
    set_grad = torch._C._set_grad_enabled

    # torch keeps a Python flag of the profiler state for such checks (no flag: always profile)
    has_flag = hasattr(_profiler, "_is_profiler_enabled")

    @functools.wraps(func)
    def step(self, *args, **kwargs):
        if ((not has_flag or _profiler._is_profiler_enabled)
                or hooks._global_optimizer_pre_hooks or hooks._global_optimizer_post_hooks
                or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks):
            return slow(self, *args, **kwargs)
        prev = grad_enabled()
        set_grad(False)
        try:
            out = func(self, *args, **kwargs)
        finally:
            set_grad(prev)
        self._optimizer_step_code()
        return out

    step.hooked = True  # torch's Optimizer.__init__ must not wrap it again
    return step


def check_grad(p, grad, what: str) -> None:
    """The clear errors for gradients a ProGrad step cannot take."""
    if grad.is_sparse or grad.layout != torch.strided:
        raise RuntimeError(f"ProGradSGD does not support sparse {what} gradients")
    if grad.is_complex() or p.is_complex():
        raise RuntimeError(f"ProGradSGD does not support complex {what} gradients or parameters")
    if grad.shape != p.shape:
        raise RuntimeError(f"{what} gradient of shape {tuple(grad.shape)} does not match "
                           f"its parameter's shape {tuple(p.shape)}")
    if grad.device != p.device:
        raise RuntimeError(f"{what} gradient on {grad.device} but its parameter is on {p.device}")
    if grad.dtype != p.dtype:
        raise RuntimeError(f"{what} gradient of dtype {grad.dtype} but its parameter is {p.dtype}")


def checked_general(params: list, grads: list, host=None) -> list:
    """General gradients (aligned with ``params``; None for none) checked against their
    parameters and detached, ready to keep: ``grads`` itself when the C helper ``host``
    finds every one a plain tensor matching its parameter.  Batched checks; on a failure
    the per-tensor check names the problem (nothing is kept)."""
    if host is not None and host.matching(params, grads):
        return grads
    if _NONE_TYPE in map(type, grads):
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        present = [g for _, g in pairs]
        params = [p for p, _ in pairs]
    else:
        present = grads
    try:
        p_dtypes = list(map(_DTYPE, params))
        ok = (list(map(_SIZE, present)) == list(map(_SIZE, params))
              and list(map(_DTYPE, present)) == p_dtypes
              and list(map(_DEVICE, present)) == list(map(_DEVICE, params))
              and set(map(_LAYOUT, present)) <= _STRIDED and _COMPLEX.isdisjoint(p_dtypes))
    except (TypeError, AttributeError, RuntimeError):
        ok = False
    if not ok:
        for p, g in zip(params, present):
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"general gradients must be tensors or None, got {type(g).__name__}")
            check_grad(p, g, "general")
    if any(map(_REQUIRES_GRAD, present)):
        grads = [None if g is None else g.detach() for g in grads]
    return grads


def _check_domain(params: list, grads: list) -> None:
    """Domain gradients: torch's ``.grad`` setter already matched shape, dtype and device to
    the parameter; what it allows and we refuse is a sparse layout or complex numbers."""
    if set(map(_LAYOUT, grads)) != _STRIDED or not _COMPLEX.isdisjoint(map(_DTYPE, grads)):
        for p, g in zip(params, grads):
            check_grad(p, g, "domain")


def gather_group(state, params: list, generals: list | None, momentum: bool, host=None,
                 dicts=None, tag=None):
    """``(picked, sharded, by_helper)``: :func:`gather`'s answer, whether the group holds
    DTensors and whether the helper gathered it.  With the helper ``host``, one C pass
    (plain tensors only, so never sharded; the state dicts, from ``dicts``, only read with
    momentum); the Python path otherwise."""
    if host is not None:
        sds = dicts.get(host, state, params, tag) if momentum else None
        picked = host.gather(params, sds, generals, momentum, BUFFER_KEY)
        if picked is not NotImplemented:
            return picked or None, False, True
    picked = gather(state, params, generals, momentum)
    return picked, picked is not None and any_sharded(picked[0]), False


def gather(state, params: list, generals: list | None, momentum: bool):
    """``(params, grads, generals, bufs, any_general)`` of the group's parameters that have
    a domain gradient, or None when none has one.  ``generals``: the group's pending
    general gradients (aligned with ``params``, None for none), which the caller has
    consumed.  No state entry is created."""
    if not params:  # an empty group (torch allows them)
        return None
    n = len(params)
    if generals is None:
        generals = [None] * n
    elif len(generals) != n:
        raise RuntimeError(f"{len(generals)} general gradients are pending for a group of {n} "
                           "parameters: the group changed between store_general_grads() and "
                           "step()")
    grads = list(map(_GRAD, params))
    if momentum:
        sds = list(map(state.get, params))  # None: a parameter without state
        bufs = ([None if sd is None else sd.get(BUFFER_KEY) for sd in sds]
                if _NONE_TYPE in map(type, sds) else list(map(_GET_BUFFER, sds)))
    else:
        bufs = [None] * n
    any_general = any(map(operator.is_not, generals, repeat(None)))
    if _NONE_TYPE in map(type, grads):
        keep = [i for i, g in enumerate(grads) if g is not None]
        if not keep:
            return None
        params = [params[i] for i in keep]
        grads = [grads[i] for i in keep]
        generals = [generals[i] for i in keep]
        bufs = [bufs[i] for i in keep]
        any_general = any(map(operator.is_not, generals, repeat(None)))
    _check_domain(params, grads)
    return params, grads, generals, bufs, any_general


def refill(cache: dict, group: dict, params, grads, generals, bufs, grad_scale,
           found_inf) -> GroupStep:
    """The group's :class:`GroupStep`, made once and refilled every step."""
    step = cache.get("group_step")
    if step is None:
        step = GroupStep(params, grads, generals, bufs, lr=group["lr"], extra=cache)
        cache["group_step"] = step
    step.params = params
    step.grads = grads
    step.general_grads = generals
    step.momentum_buffers = bufs
    step.lr = group["lr"]
    step.momentum = group["momentum"]
    step.dampening = group["dampening"]
    step.weight_decay = group["weight_decay"]
    step.nesterov = group["nesterov"]
    step.maximize = group["maximize"]
    step.lam = group["lam"]
    step.granularity = group["granularity"]
    step.grad_scale = grad_scale
    step.found_inf = found_inf
    step.extra = cache
    return step


def release(step: GroupStep) -> None:
    """Drop the step's tensor lists: consumed general gradients must not outlive the step."""
    step.params = step.grads = step.general_grads = step.momentum_buffers = ()
    step.grad_scale = step.found_inf = step.extra = None  # no cycle through the cache


def store_buffers(state, params: list, before: list, after: list) -> None:
    """Write momentum buffers the backend made or replaced into the parameters' state."""
    if any(map(operator.is_not, before, after)):
        for p, old, new in zip(params, before, after):
            if new is not old:
                state[p][BUFFER_KEY] = new
