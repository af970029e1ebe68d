"""ProGradSGD: SGD on the ProGrad (prompt-aligned) gradient, as a ``torch.optim.Optimizer``.

The class is thin: it validates options, gathers each group's tensors and hands them to
one backend (``prograd_fast.backends``); the math lives in ``prograd_fast.functional``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.compiler import is_compiling  # bound once: the eager step checks it twice
from torch.optim import Optimizer

from . import _host, _ops
from ._step import checked_general, gather_group, hooked_step, refill, release, store_buffers
from .backends import BACKENDS, cache_stats, ran_fused, run_step
from .distributed import sharded_group_step
from .functional import GRANULARITIES, ProGradStats

__all__ = ["ProGradSGD"]


# Older versions kept pending general gradients in each parameter's state under this key.
_LEGACY_GENERAL_KEY = "general_grad"


def _without_legacy_generals(state: dict, param_keys) -> dict:
    """A loaded state dict's ``state`` less general gradients an older version saved (and
    parameter entries left empty without them).  Only entries keyed by a parameter (an
    index in ``param_keys``) holding such a key are changed; new dicts, the caller's are
    not touched."""
    out = {}
    for key, entry in state.items():
        if key in param_keys and isinstance(entry, dict) and _LEGACY_GENERAL_KEY in entry:
            entry = {name: v for name, v in entry.items() if name != _LEGACY_GENERAL_KEY}
            if not entry:
                continue
        out[key] = entry
    return out


def _param_indices(state_dict: dict) -> set:
    """The keys a packed state dict uses for its parameters (torch numbers them)."""
    return {i for group in state_dict.get("param_groups", ()) for i in group.get("params", ())}


class ProGradSGD(Optimizer):
    r"""SGD (momentum, dampening, weight decay, nesterov, maximize) on the ProGrad gradient.

    Each step projects the domain gradient ``G_d`` (``p.grad``) against the general gradient
    ``G_g`` (stored with :meth:`store_general_grads` or :func:`prograd_fast.backward`)::

        u = G_d - lam * <G_d, G_g> / ||G_g||^2 * G_g   if <G_d, G_g> < 0   else G_d

    over the whole group (``granularity="global"``, the paper) or tensor by tensor
    (``"tensor"``, the official ProGrad code), then applies ``torch.optim.SGD``'s update to
    ``u``.  General gradients are consumed by the step: a step without fresh ones is a
    plain SGD step (a warning says so once when ``lam > 0``); a parameter with a domain
    gradient but no general gradient gets the plain SGD update; a parameter without a
    domain gradient is skipped.  ``backend`` is ``"auto"`` or one of
    ``prograd_fast.backends.BACKENDS``; the step never synchronises with the host.
    AMP (``GradScaler``; prefer :class:`prograd_fast.amp.ProGradGradScaler`), DDP and FSDP2
    (DTensor parameters) are supported: see docs/hardening.md.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        lam: float = 1.0,
        granularity: str = "global",
        backend: str = "auto",
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1] (1 is ProGrad), got {lam}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, lam=lam, granularity=granularity,
                        backend=backend)
        super().__init__(params, defaults)
        self._stats: list[ProGradStats | None] = [None] * len(self.param_groups)
        # Per-group scratch a backend may keep between steps (launch metadata, chosen backend).
        self._backend_cache: list[dict] = [{} for _ in self.param_groups]
        self._warned_no_general = False
        # Pending general gradients, per group: None, or a list aligned with its "params".
        self._general_grads: list[list | None] = [None] * len(self.param_groups)
        self._state_dicts = _host.StateDicts()  # each parameter's state dict, looked up once
        self._use_host = False  # True once a fused backend ran a group: see prograd_fast._host
        self._host_steps = [0, 0]  # group steps gathered by the Python path, by the helper
        # GradScaler hands grad_scale / found_inf to step() (see torch.amp.GradScaler.step).
        self._step_supports_amp_scaling = True

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("lam", 1.0)
            group.setdefault("granularity", "global")
            group.setdefault("backend", "auto")
        self.__dict__.setdefault("_stats", [None] * len(self.param_groups))
        self.__dict__.setdefault("_warned_no_general", False)
        self.__dict__.setdefault("_general_grads", [None] * len(self.param_groups))
        self.__dict__.setdefault("_backend_cache", [{} for _ in self.param_groups])
        self.__dict__.setdefault("_step_supports_amp_scaling", True)
        self.__dict__.setdefault("_state_dicts", _host.StateDicts()).clear()  # a new state
        self.__dict__.setdefault("_use_host", False)
        self.__dict__.setdefault("_host_steps", [0, 0])

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that options the loaded groups lack keep this optimizer's values
        (a ``torch.optim.SGD`` checkpoint, e.g. CoOp's, warm-starts ``ProGradSGD(lam=0.3,
        granularity="tensor")`` without resetting them), each group keeps this optimizer's
        ``backend`` (a property of the machine: a CPU checkpoint's ``"cpp"`` cannot run CUDA
        tensors) and general gradients saved by older versions are dropped, as are pending
        ones (they belong to the iteration before the load)."""
        own = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        saved = [set(group) for group in state_dict["param_groups"]]
        kept = _without_legacy_generals(state_dict["state"], _param_indices(state_dict))
        super().load_state_dict({**state_dict, "state": kept})
        self._general_grads = [None] * len(self.param_groups)
        for group, options, keys in zip(self.param_groups, own, saved):
            for key, value in options.items():
                if key not in keys or key == "backend":
                    group[key] = value

    def add_param_group(self, param_group: dict) -> None:
        """As torch's; a group's own ``lam`` and ``granularity`` are checked as the
        defaults are (a group may differ: e.g. ``lam=0`` for a part never projected)."""
        name = param_group.get("name", len(getattr(self, "param_groups", ())))
        lam = param_group.get("lam")
        if lam is not None and not 0.0 <= lam <= 1.0:
            raise ValueError(f"parameter group {name}: lam must be in [0, 1] (1 is ProGrad), "
                             f"got {lam}")
        granularity = param_group.get("granularity")
        if granularity is not None and granularity not in GRANULARITIES:
            raise ValueError(f"parameter group {name}: granularity must be one of "
                             f"{GRANULARITIES}, got {granularity!r}")
        super().add_param_group(param_group)
        if hasattr(self, "_stats"):
            self._stats.append(None)
            self._backend_cache.append({})
            self._general_grads.append(None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the domain gradients (as torch does) AND drop pending general gradients,
        so a general gradient can never leak into a later iteration."""
        super().zero_grad(set_to_none)
        self._general_grads = [None] * len(self.param_groups)

    # ---------------------------------------------------------------- general gradients
    def _params_in_order(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def has_general_grads(self) -> bool:
        """True when general gradients are stored and waiting for the next step."""
        return any(g is not None for pending in self._general_grads if pending for g in pending)

    def _pending_general_grads(self, take: bool = False) -> list[Tensor | None]:
        """The pending general gradients, aligned with the optimizer's parameters (None for
        none); ``take``: consume them (:func:`prograd_fast.distributed.all_reduce_general_grads`
        stores back what it reduced).  For this package's modules, which never write them
        but through :meth:`store_general_grads`."""
        out = []
        for group, pending in zip(self.param_groups, self._general_grads):
            out.extend(pending if pending is not None else [None] * len(group["params"]))
        if take:
            self._general_grads = [None] * len(self.param_groups)
        return out

    def store_general_grads(self, grads: list[Tensor | None] | None = None) -> None:
        """Store the general (zero-shot KL) gradients for the next :meth:`step`.

        ``grads=None`` moves every parameter's ``.grad`` into the optimizer (no copy) and
        sets ``.grad`` to ``None``: call it after ``general_loss.backward(retain_graph=True)``
        and before ``task_loss.backward()`` (with ``.grad`` zeroed/None before the first).
        Otherwise ``grads`` is a list aligned with the optimizer's parameters (groups in
        order; ``None`` for no gradient).  Tensors are kept by reference, not copied: do not
        modify them before the step.  Storing twice before a step accumulates.  The step
        consumes them and :meth:`zero_grad` drops them (call it before computing gradients,
        not between storing and stepping).  Under DDP, see
        :func:`prograd_fast.distributed.all_reduce_general_grads`.
        """
        params = self._params_in_order()
        if grads is None:
            taken = []
            for p in params:
                taken.append(p.grad)
                p.grad = None
            grads = taken
        else:
            grads = list(grads)
            if len(grads) != len(params):
                raise ValueError(f"store_general_grads got {len(grads)} gradients for "
                                 f"{len(params)} parameters")
        if is_compiling():  # torch.compile: see prograd_fast._ops
            grads = _ops.traced_checked_general(params, grads)
        else:
            grads = checked_general(params, grads, self._host_helper())
        self._add_general(grads)

    def _add_general(self, grads: list) -> None:
        """Keep checked general gradients (aligned with the parameters), group by group,
        adding them to pending ones."""
        pending, start = self._general_grads, 0
        if len(pending) == 1 and pending[0] is None:  # one group, nothing pending: keep them
            pending[0] = grads
            return
        for index, group in enumerate(self.param_groups):
            n = len(group["params"])
            if pending[index] is not None and len(pending[index]) != n:
                raise RuntimeError(f"parameter group {index} changed since general gradients "
                                   "were stored; call zero_grad() first")
        for index, group in enumerate(self.param_groups):
            n = len(group["params"])
            mine = grads if n == len(grads) else grads[start:start + n]
            start += n
            old = pending[index]
            if old is None:
                pending[index] = mine
                continue
            for i, g in enumerate(mine):
                if g is not None:
                    old[i] = g if old[i] is None else old[i].add_(g)

    def _host_helper(self):
        """The C host helper once a fused backend ran (built then), else None.  (Never
        reached while Dynamo traces, which cannot trace it: see :mod:`prograd_fast._ops`.)"""
        return _host.module() if self._use_host else None

    def stats(self) -> list[dict[str, Tensor] | None]:
        """Per group, the last step's device tensors: ``cos``, ``conflict``, ``coef``,
        ``dot``, ``general_norm_sq``, ``domain_norm_sq``, ``skipped`` (0-d for
        ``granularity="global"``, one entry per stepped tensor for ``"tensor"``).
        ``None`` for a group that has not stepped.  Reading them is the caller's sync.  The
        fused backends write them into buffers they reuse: the next step overwrites them
        (``clone()`` to keep a step's values)."""
        return [s.as_dict() if s is not None else None for s in self._stats]

    def cache_stats(self) -> dict[str, int]:
        """What the step's caches have done so far, as plain counters summed over groups
        (see :func:`prograd_fast.backends.cache_stats`: plans built, re-binds, address-only
        re-binds, table uploads, full checks, launches per step), plus
        ``host_helper_steps`` and ``python_host_steps``: group steps whose tensors the C
        host helper gathered, and those the Python path gathered (:mod:`prograd_fast._host`).
        For tests and profiling; a steady step adds to the host-path counts only."""
        out = dict.fromkeys(cache_stats({}), 0)
        for cache in self._backend_cache:
            for name, value in cache_stats(cache).items():
                out[name] = out.get(name, 0) + value
        out["python_host_steps"], out["host_helper_steps"] = self._host_steps
        return out

    # ---------------------------------------------------------------- the step
    @hooked_step
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one ProGrad-SGD step (``closure`` re-evaluates the loss, as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if is_compiling():  # torch.compile: custom ops, no host caches
            _ops.traced_step(self, grad_scale, found_inf)
            return loss
        any_general = any_stepped = False
        state = self.state
        host, dicts = self._host_helper(), self._state_dicts
        host_steps = self._host_steps
        pending = self._general_grads
        for index, group in enumerate(self.param_groups):
            momentum = group["momentum"] != 0
            generals = pending[index]
            if generals is not None:
                pending[index] = None  # consumed, whatever happens next
            picked, sharded, by_helper = gather_group(state, group["params"], generals,
                                                      momentum, host, dicts, index)
            if picked is None:
                continue
            host_steps[by_helper] += 1
            params, grads, generals, bufs, has_general = picked
            any_stepped = True
            any_general |= has_general
            before = list(bufs)
            step = refill(self._backend_cache[index], group, params, grads, generals, bufs,
                          grad_scale, found_inf)
            try:
                if sharded:
                    self._stats[index] = sharded_group_step(step)  # FSDP2: see distributed.py
                else:
                    self._stats[index] = run_step(group["backend"], step)
            finally:
                release(step)
            if not self._use_host:
                self._use_host = ran_fused(group["backend"], self._backend_cache[index])
            if momentum:
                store_buffers(state, params, before, bufs)
        if any_stepped and not any_general:
            self._warn_once_if_plain_sgd(any_stepped, any_general, stacklevel=4)
        return loss

    def _warn_once_if_plain_sgd(self, any_stepped: bool, any_general: bool,
                                stacklevel: int) -> None:
        """Warn once when a step with ``lam > 0`` got no general gradient at all: a plain
        SGD step, most likely a forgotten ``store_general_grads``."""
        if any_stepped and not any_general and not self._warned_no_general and any(
                g["lam"] > 0 for g in self.param_groups):
            self._warned_no_general = True
            warnings.warn("ProGradSGD.step() ran without general gradients: this was a plain "
                          "SGD step. Call store_general_grads() or prograd_fast.backward() "
                          "before step() to get ProGrad.", stacklevel=stacklevel)
