"""Helpers shared by the kernel backends."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Callable, Iterator

import torch

from ..functional import GRANULARITIES, ProGradStats


class Backend:
    """The base of every backend: what :func:`prograd_fast.backends.run_step` calls.

    A subclass sets ``name`` and implements ``step(step: GroupStep) -> ProGradStats`` (the
    group's update, in place; new momentum buffers written into ``step.momentum_buffers``);
    it may override ``available()`` (``None`` when usable on this machine, else why not),
    ``unsupported(step)`` (why this group cannot run on it, else ``None``; nothing launched)
    and ``try_step(step)`` (the stats, or the reason as a string -- one call that checks and
    launches, for a backend whose check and launch share work).  ``fused``: it runs
    compiled kernels, whose users also get the optimizer's C host helper
    (:mod:`prograd_fast._host`; the reference ``"torch"`` backend sets it False)."""

    name = ""
    fused = True

    def available(self) -> str | None:
        return None

    def unsupported(self, step) -> str | None:
        return None

    def step(self, step) -> ProGradStats:
        raise NotImplementedError(f"backend {self.name!r} does not implement step()")

    def try_step(self, step) -> ProGradStats | str:
        """``step`` when the group can run here, else the reason (nothing launched)."""
        reason = self.unsupported(step)
        return reason if reason else self.step(step)


class ExtensionBackend(Backend):
    """What the C++ (``cpp``) and CUDA (``cuda``) backends share: the cached per-group check
    of the tensors (the C++ side re-checks devices, dtypes and shapes itself).  Subclasses
    set ``name`` and ``device_type`` and implement ``available`` and ``step``."""

    device_type = ""

    def unsupported(self, step) -> str | None:
        return cached_problem(step, f"{self.name}_checked", self._check)

    def _check(self, step) -> str | None:
        return group_tensor_problem(step, self.device_type, self.name)


# What a group's cache counts (read with prograd_fast.backends.cache_stats): plans built,
# plans re-bound to new tensors after the full check, address-only re-binds (no full
# check), offset tables or slot starts uploaded, full validations run.  Counted only off
# the steady path (a step that changes nothing counts nothing).
COUNTERS = ("plans_built", "rebinds", "address_rebinds", "table_uploads", "full_checks")


def count(extra: dict, name: str) -> None:
    """Add one to the group cache's counter ``name`` (one of :data:`COUNTERS`)."""
    counts = extra.get("counts")
    if counts is None:
        counts = extra["counts"] = dict.fromkeys(COUNTERS, 0)
    counts[name] += 1


def cached_problem(step, tag: str, check: Callable) -> str | None:
    """``check(step)`` (why the group cannot run, or None), cached per group: the same tensor
    objects as last step give the same answer (the kernels re-check devices, dtypes and
    shapes anyway)."""
    if step.granularity not in GRANULARITIES:
        return f"unknown granularity {step.granularity!r}"
    key = tuple(map(id, step.params)) + tuple(map(id, step.grads)) + \
        tuple(map(id, step.general_grads)) + tuple(map(id, step.momentum_buffers))
    cached = step.extra.get(tag)
    if cached is not None and cached[0] == key:
        return cached[1]
    problem = check(step)
    step.extra[tag] = (key, problem)
    return problem


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tensor_problem(t, name: str, i: int, device_type: str, backend: str, ref) -> str | None:
    if t.device.type != device_type:
        return f"{name} {i} is on {t.device}, the {backend} backend runs on {device_type.upper()} tensors only"
    if t.layout != torch.strided:
        return f"{name} {i} is not a strided (dense) tensor"
    if t.dtype not in SUPPORTED_DTYPES:
        return f"{name} {i} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64"
    if ref is not None and (t.dtype != ref.dtype or t.shape != ref.shape or t.device != ref.device):
        return f"{name} {i} does not match its parameter's dtype, shape and device"
    return None


def group_tensor_problem(step, device_type: str, backend: str) -> str | None:
    """Why the C++/CUDA kernels cannot take this group's tensors (None when they can):
    dense tensors of a supported dtype on one device of ``device_type``, each gradient and
    buffer matching its parameter."""
    device = step.params[0].device
    for i, p in enumerate(step.params):
        problem = _tensor_problem(p, "parameter", i, device_type, backend, None)
        if problem:
            return problem
        if p.device != device:
            return f"parameter {i} is on {p.device}, parameter 0 on {device}: one device per group"
    for name, tensors in (("grad", step.grads), ("general grad", step.general_grads),
                          ("momentum buffer", step.momentum_buffers)):
        for i, (t, p) in enumerate(zip(tensors, step.params)):
            if t is not None:
                problem = _tensor_problem(t, name, i, device_type, backend, p)
                if problem:
                    return problem
    return None


def kernel_args(step) -> tuple:
    """The positional arguments the C++ and CUDA ``prograd_sgd`` entry points share."""
    lr = step.lr
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    return (step.params, step.grads, step.general_grads, step.momentum_buffers,
            0.0 if lr_tensor is not None else float(lr), lr_tensor,
            float(step.momentum), float(step.dampening), float(step.weight_decay),
            bool(step.nesterov), bool(step.maximize), float(step.lam),
            step.granularity == "global", step.grad_scale, step.found_inf)


def stats_buffers(S: int, acc: torch.dtype, device, glob: bool) -> tuple:
    """``(stats_f, stats_b, ProGradStats views)`` a kernel writes every step: ``stats_f`` is
    ``[dot | nn | dd | cos | coef]`` (``S`` each, ``acc``), ``stats_b`` is ``[conflict (S) |
    skipped]`` (bool).  Made once per group layout; the views are what ``step`` returns."""
    stats_f = torch.empty(5 * S, dtype=acc, device=device)
    stats_b = torch.zeros(S + 1, dtype=torch.bool, device=device)
    if glob:
        views = [stats_f[k] for k in range(5)] + [stats_b[0]]
    else:
        views = [stats_f[k * S:(k + 1) * S] for k in range(5)] + [stats_b[:S]]
    dot, nn, dd, cos, coef, conflict = views
    return stats_f, stats_b, ProGradStats(dot=dot, general_norm_sq=nn, domain_norm_sq=dd,
                                          cos=cos, conflict=conflict, coef=coef,
                                          skipped=stats_b[S])


# ----------------------------------------------------------------- capture-safe uploads
class CaptureError(RuntimeError):
    """A step that cannot be captured in a CUDA graph as asked, on any backend (the
    caller's to fix: ``"auto"`` never falls back on it)."""


FIRST_STEP_UNDER_CAPTURE = (
    "ProGradSGD: the first step with momentum (no momentum buffers yet) is being captured in "
    "a CUDA graph, where every replay would start momentum again: take one eager step "
    "before capturing")
_NONE_TYPE = type(None)


def capturing(device: torch.device) -> bool:
    """True while the current CUDA stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def refuse_first_step_under_capture(step, device: torch.device) -> None:
    """Raise :class:`CaptureError` when ``step`` would make momentum buffers while a CUDA
    graph is captured: the graph would bake "new buffer: ``buf = u``" into every replay."""
    if (step.momentum != 0 and _NONE_TYPE in map(type, step.momentum_buffers)
            and capturing(device)):
        raise CaptureError(FIRST_STEP_UNDER_CAPTURE)


def _pinned_empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(n, dtype=dtype, pin_memory=True)


def _device_empty(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(n, dtype=dtype, device=device)


def note_stream(extra: dict, device: torch.device, tensors, key: str) -> None:
    """``record_stream`` the group's buffers on the current stream when it is not the one
    the group used last: buffers first made on a side stream (the warm-up before a capture)
    and then used on another must not be recycled by the first stream while the second still
    reads them.  Skipped while capturing: what a capture uses is kept alive instead
    (:func:`keep_for_graphs`).  One raw-stream query per step otherwise."""
    stream = torch._C._cuda_getCurrentRawStream(device.index)
    if extra.get(key) == stream:
        return
    if not capturing(device):
        current = torch.cuda.current_stream(device)
        for t in tensors:
            if t is not None:
                t.record_stream(current)
    extra[key] = stream


def keep_for_graphs(extra: dict, *tensors) -> None:
    """Keep tensors a captured CUDA graph reads or writes alive as long as the group's cache:
    every replay repeats the captured launches on the same addresses.  (Each tensor once.)"""
    keep = extra.setdefault("graph_keep", [])
    kept = set(map(id, keep))
    for t in tensors:
        if t is not None and id(t) not in kept:
            keep.append(t)
            kept.add(id(t))


_CU_STREAM_CAPTURE_MODE_RELAXED = 2
_exchange_mode = None  # the driver's cuThreadExchangeStreamCaptureMode; False: not found
_side_streams: dict = {}


def _exchange_capture_mode(mode: int) -> int | None:
    """Set this thread's CUDA stream-capture mode, returning the previous one (None when the
    driver library or the call is not available)."""
    global _exchange_mode
    if _exchange_mode is None:
        try:
            lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
            _exchange_mode = lib.cuThreadExchangeStreamCaptureMode
            _exchange_mode.restype = ctypes.c_int
            _exchange_mode.argtypes = [ctypes.POINTER(ctypes.c_int)]
        except (OSError, AttributeError):
            _exchange_mode = False
    if not _exchange_mode:
        return None
    value = ctypes.c_int(mode)
    return value.value if _exchange_mode(ctypes.byref(value)) == 0 else None


@contextlib.contextmanager
def outside_capture(device: torch.device) -> Iterator[bool]:
    """Run the CUDA work of the ``with`` block now, outside the graph being captured: on a
    side stream that is not capturing, with this thread's capture mode relaxed for the
    block (as torch's allocator does around its ``cudaMalloc``), then wait for it.  Yields
    False, and runs the block on the capturing stream, where the mode cannot be changed."""
    previous = _exchange_capture_mode(_CU_STREAM_CAPTURE_MODE_RELAXED)
    if previous is None:
        yield False
        return
    try:
        side = _side_streams.get(device.index)
        if side is None:
            side = _side_streams[device.index] = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            yield True
        side.synchronize()
    finally:
        _exchange_capture_mode(previous)


def upload(values: list[int], dtype: torch.dtype, device: torch.device, extra: dict,
           tag: str, into: torch.Tensor | None = None) -> torch.Tensor:
    """A device tensor holding ``values`` (``into`` when given, else a new one), copied from
    pinned host memory (never from pageable memory: recent torch refuses that under capture,
    older torch replays then read a freed host buffer).

    Eager: without a host sync, from a fresh pinned buffer per upload (torch's pinned
    allocator recycles it once the copy has run), plus a spare of the same size kept in
    ``extra``.  Under CUDA-graph capture: the spare is filled (nothing is allocated on the
    host while capturing) and copied now, outside the graph (:func:`outside_capture`), so
    the graph reads a table already on the device and no replay copies anything over PCIe;
    the device tensor is kept for as long as the group exists.  (Where the capture mode
    cannot be relaxed the copy is captured, and its pinned source kept too.)  ``into`` is
    written in stream order: only pass a tensor that no captured graph reads and that the
    current stream was the last to use.
    """
    if device.type != "cuda":
        out = torch.tensor(values, dtype=dtype, device=device)
        return out if into is None else into.copy_(out)
    n = len(values)
    spare_key = f"{tag}_spare"
    spare = extra.get(spare_key)
    fits = spare is not None and spare.numel() == n and spare.dtype == dtype
    now_capturing = capturing(device)
    if now_capturing:
        host = spare if fits else _pinned_empty(n, dtype)  # the latter: torch >= 2.10 only
        extra.pop(spare_key, None)
    else:
        host = _pinned_empty(n, dtype)
        if not fits:
            extra[spare_key] = _pinned_empty(n, dtype)
    host.copy_(torch.tensor(values, dtype=dtype))
    out = _device_empty(n, dtype, device) if into is None else into
    if not now_capturing:
        out.copy_(host, non_blocking=True)
        return out
    with outside_capture(device) as outside:
        out.copy_(host, non_blocking=True)
    if outside:
        extra[spare_key] = host  # done with: the graph holds no copy from it
        keep_for_graphs(extra, out)
    else:
        keep_for_graphs(extra, host, out)
    return out
