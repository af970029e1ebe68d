"""Backend registry and the one place where a group's step is dispatched (:func:`run_step`).

A backend is an instance of a :class:`Backend` subclass (``BACKEND`` in its own module of
this package, listed in ``_MODULES``, ``BACKENDS`` and ``AUTO_ORDER``): it sets ``name`` and
``fused`` and implements ``step(step: GroupStep) -> ProGradStats``, and may override
``available()``, ``unsupported(step)`` and ``try_step(step)`` (see :class:`Backend`).
:func:`run_step` calls ``available()`` and then ``try_step(step)`` only.  ``"auto"`` runs
the first backend in ``AUTO_ORDER[device type]`` that is available and supports the group
(the one that ran the group last time is tried first); a backend named explicitly
(argument or ``PROGRAD_FAST_BACKEND``) that cannot run raises
:class:`BackendUnavailableError` -- never a silent fallback.

A fused backend that fails on this machine when it runs (its extension does not build, a
Triton compile error, a launch refused for this GPU's architecture) does not end training
under ``"auto"``: one warning names the backend and the cause, and ``"auto"`` uses the next
backend for the rest of the process; on a GPU, a fused backend that cannot be built or
loaded at all is named once the same way.  Named explicitly, the same failure raises
:class:`BackendUnavailableError`.  Never taken for a fallback: a step that cannot be
captured (:class:`~prograd_fast.backends._common.CaptureError`), out of memory, and sticky
CUDA errors (an illegal address, a device-side assert: the CUDA context is lost and every
later call would fail).
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..functional import ProGradStats
from ._common import COUNTERS, Backend, CaptureError

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "Backend",
    "BackendUnavailableError",
    "GroupStep",
    "available_backends",
    "cache_stats",
    "get_backend",
    "ran_fused",
    "run_step",
]

ENV_VAR = "PROGRAD_FAST_BACKEND"
_ENV_KEY = os.fsencode(ENV_VAR)
BACKENDS = ("torch", "triton", "cuda", "cpp")
# Fastest first, per device type; "torch" always closes the list.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),  # triton first until the CUDA kernels have run on a GPU
    "cpu": ("cpp", "torch"),
}
_MODULES = {
    "torch": ".torch_backend",
    "triton": ".triton_backend",
    "cuda": ".cuda_backend",
    "cpp": ".cpp_backend",
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here (or on these tensors)."""


@dataclass
class GroupStep:
    """Everything a backend needs for one parameter group's step (lists are aligned)."""

    params: list[Tensor]
    grads: list[Tensor]
    general_grads: list[Tensor | None]
    momentum_buffers: list[Tensor | None]  # updated in place: None -> new buffer
    lr: float | Tensor
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    lam: float = 1.0
    granularity: str = "global"
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    extra: dict = field(default_factory=dict)  # per-group cache a backend may keep

    def hyper(self) -> dict:
        return dict(
            lr=self.lr, momentum=self.momentum, dampening=self.dampening,
            weight_decay=self.weight_decay, nesterov=self.nesterov, maximize=self.maximize,
            lam=self.lam, granularity=self.granularity,
            grad_scale=self.grad_scale, found_inf=self.found_inf,
        )


def cache_stats(cache: dict) -> dict[str, int]:
    """What one group's backend cache (``GroupStep.extra``) has done so far, as plain
    counters: ``plans_built``, ``rebinds`` (a plan pointed at new tensors after the full
    check), ``address_rebinds`` (only addresses changed: re-bound without the full check),
    ``table_uploads`` (offset tables / slot starts copied to the device), ``full_checks``;
    and ``launches_per_step`` of the group's current Triton plan (0: none).  A steady step
    adds nothing.  :meth:`prograd_fast.ProGradSGD.cache_stats` sums them over groups."""
    out = dict.fromkeys(COUNTERS, 0)
    out.update(cache.get("counts", ()))
    plan = cache.get("triton_plan")
    out["launches_per_step"] = len(plan.launchers) if plan is not None else 0
    return out


_loaded: dict = {}


def get_backend(name: str):
    """Import and return the backend object called ``name``."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    if name not in _loaded:
        module = importlib.import_module(_MODULES[name], __name__)
        _loaded[name] = module.BACKEND
    return _loaded[name]


def available_backends() -> dict[str, str | None]:
    """``{name: None if usable here else the reason}`` for every backend."""
    out = {}
    for name in BACKENDS:
        try:
            out[name] = get_backend(name).available()
        except Exception as exc:  # an import failure is a reason, not a crash
            out[name] = f"import failed: {exc}"
    return out


def _env_backend() -> str:
    """``PROGRAD_FAST_BACKEND`` (read every step; a plain dict look-up where the platform's
    ``os.environ`` keeps one, as CPython does on POSIX)."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and os.name == "posix":
        value = data.get(_ENV_KEY)
        return "" if value is None else os.fsdecode(value).strip()
    return os.environ.get(ENV_VAR, "").strip()


def requested_backend(name: str = "auto") -> str:
    """The backend name in force: the environment variable overrides ``"auto"`` only."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
        return name
    env = _env_backend()
    if name == "auto" and env:
        name = env
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return name


# Backends that failed when run under "auto" in this process: name -> the cause.
_failed: dict[str, str] = {}
# CUDA errors that leave the context unusable (never a reason to try another backend) ...
_STICKY = ("illegal memory access", "illegal address", "illegal instruction",
           "misaligned address", "unspecified launch failure", "device-side assert",
           "hardware stack error", "launch timed out", "uncorrectable ecc",
           "invalid program counter", "cuda error: unknown error")
# ... and launch errors that only say this kernel cannot run on this device
_NOT_STICKY = ("no kernel image is available", "invalid device function",
               "unsupported toolchain", "too many resources requested",
               "named symbol not found", "invalid ptx")
# (A TypeError or ValueError inside a fused backend is most likely a toolchain of another
# version, e.g. a Triton launcher with another signature: a failure, not the caller's
# error -- those are checked when the optimizer is made, and the next backend checks them.)
_NEVER_FALLBACK = (CaptureError, torch.OutOfMemoryError, BackendUnavailableError)
# Device types where "auto" also warns (once) when a fused backend it reaches cannot be
# built or loaded: on a GPU that is a missing speed-up worth saying (on the CPU, a machine
# without a compiler is common and the torch backend is the expected fallback).
_WARN_UNAVAILABLE_ON = frozenset({"cuda"})


def is_backend_failure(exc: BaseException) -> bool:
    """True when ``exc`` says the backend cannot run on this machine (build, compile or
    launch failure), so another backend may; False for the caller's errors, out of memory
    and sticky CUDA errors, which must reach the caller as they are."""
    if not isinstance(exc, Exception) or isinstance(exc, _NEVER_FALLBACK):
        return False
    text = str(exc).lower()
    if any(s in text for s in _STICKY):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return any(s in text for s in _NOT_STICKY)
    return True


def _cause(exc: BaseException) -> str:
    """``Type: message`` on one line: the first line of the message and, for a longer one
    (a Triton compile error quotes the source first), its last line too."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ... ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else "".join(lines)
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def _give_up(name: str, cause: str, step: GroupStep, buffers: list | None = None) -> None:
    """Record that ``name`` cannot run here, warn once, and undo what it did to the step."""
    if buffers is not None:
        step.momentum_buffers[:] = buffers  # new buffers it made before failing: not valid
    _failed[name] = cause
    if step.extra.get("auto_backend") == name:
        del step.extra["auto_backend"]
    warnings.warn(f"prograd_fast: the {name!r} backend failed on this machine ({cause}); "
                  f"backend='auto' uses the next backend from now on (name a backend to get "
                  f"the error instead)", RuntimeWarning, stacklevel=4)


def run_step(name: str, step: GroupStep) -> ProGradStats:
    """Run one group's step on the backend ``name`` (``"auto"`` or one of :data:`BACKENDS`;
    the rules are in the module docstring).  Each backend checks the group and launches
    in one ``try_step`` call; ``"auto"`` records its choice in ``step.extra``."""
    backend = _loaded.get(name)  # an explicit name, already imported: the common case
    if backend is None:
        name = requested_backend(name)
        if name == "auto":
            return _run_auto(step)
        backend = get_backend(name)
    reason = backend.available()
    if reason is None:
        try:
            out = backend.try_step(step)
        except Exception as exc:
            if name == "torch" or not is_backend_failure(exc):
                raise
            raise BackendUnavailableError(
                f"backend {name!r} failed on this machine: {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, str):
            return out
        reason = out
    raise BackendUnavailableError(f"backend {name!r} cannot run this step: {reason}")


def _run_auto(step: GroupStep) -> ProGradStats:
    """``"auto"``: the backend that ran the group last time first, then ``AUTO_ORDER``;
    a fused backend that fails is dropped for the process (see the module docstring)."""
    extra = step.extra
    last_name = extra.get("auto_backend")  # a name: the cache stays picklable
    last = _loaded.get(last_name)
    tried = None
    if last is not None and last_name not in _failed:
        out = _try_fused(last_name, last, step)
        if out is not None and not isinstance(out, str):
            return out
        tried = last
    for candidate in AUTO_ORDER.get(step.params[0].device.type, ("torch",)):
        if candidate in _failed:
            continue
        try:
            backend = get_backend(candidate)
        except Exception:
            continue
        if backend is tried:
            continue
        reason = backend.available()
        if reason is not None:
            if candidate != "torch" and step.params[0].device.type in _WARN_UNAVAILABLE_ON:
                _give_up(candidate, reason, step)
            continue
        out = _try_fused(candidate, backend, step)
        if out is not None and not isinstance(out, str):
            extra["auto_backend"] = candidate
            return out
    raise BackendUnavailableError("no backend can run this step")  # torch always can


def _try_fused(name: str, backend, step: GroupStep) -> ProGradStats | str | None:
    """``backend.try_step(step)``, or None when the backend failed here (warned once, see
    _give_up)."""
    if name == "torch":
        return backend.try_step(step)
    buffers = list(step.momentum_buffers)
    try:
        return backend.try_step(step)
    except Exception as exc:
        if not is_backend_failure(exc):
            raise
        _give_up(name, _cause(exc), step, buffers)
        return None


def ran_fused(name: str, cache: dict) -> bool:
    """Whether the group's last step ran on a fused backend (``name`` as the group gives
    it; ``"auto"`` records its choice in the group's ``cache``)."""
    name = requested_backend(name)
    if name == "auto":
        name = cache.get("auto_backend")
    backend = _loaded.get(name)
    return backend is not None and backend.fused
