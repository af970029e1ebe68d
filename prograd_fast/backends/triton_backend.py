"""The Triton backend: one parameter group's ProGrad-SGD step in one or two kernel launches.

Groups of at most ``kernels.prograd_sgd.SMALL_MAX`` elements in a few chunks run in ONE
single-program launch (CoOp's 16x512 context); larger groups, or many small tensors, run a
reduce launch (its last program finalizes the statistics on the device) and an update
launch, whatever the number of tensors.  Many tensors are addressed through a per-group
offset table (see the kernel module's docstring for why, rather than a flat copy).

Validate once, re-check only what can change.  Each group keeps a :class:`_Plan` in
``GroupStep.extra``: the launchers with their arguments packed, the offset table, the
statistics, partials and ticket buffers.  A step compares what it is given with what the
plan was checked for: with the C host helper (:mod:`prograd_fast._host`), one
*fingerprint* of every tensor the kernels touch (addresses, element counts, every tensor's
sizes, dtype and device against its parameter's, contiguity) plus the *options* that
select kernel code or were checked (granularity, momentum, nesterov, maximize, weight decay
on/off, AMP tensors and a tensor lr with their dtype, device, alignment and size); without
it, two keys from a few C-level passes: the *addresses* (with every tensor's sizes) and
the *structure* (the parameters' element counts, every tensor's dtype against p0's,
contiguity and negation bit, p0's device, the options).  Equal: launch.  A fingerprint
whose only change is addresses (a fresh general gradient from ``autograd.grad`` every
step, ``.grad`` blocks alternating): the pointers are re-bound and, for a table, only its
address rows are rewritten (one C pass, ``_rebase``), without the full validation.  Any
other difference runs the full validation.  New addresses with the same structure on the
Python keys (fresh ``.grad`` after ``zero_grad(set_to_none=True)`` where the allocator did
not hand back the same blocks): the full validation runs, then the addresses are re-bound
(pointer arguments; for a table, one upload into the same device tensor) and the compiled
kernels are kept.  A different structure: full validation and a new plan.  Scalar values
(lr, lam, momentum, dampening, weight decay, the AMP and lr tensors themselves) are
written into the launchers every step.

CUDA graphs: after the first step nothing is allocated and nothing is copied from the host
unless the key changes; when it changes inside a capture (``zero_grad(set_to_none=True)``
gives ``.grad`` new addresses from the graph's pool), the table is copied from pinned
memory at once, outside the graph (``_common.upload``): replays copy nothing.  Whatever a
captured step reads or writes (the table, statistics, partials, counter, momentum
buffers) stays alive as long as the group, also when the capture reused the eager plan;
such a table is never rewritten in place.  A first step with momentum is refused under
capture (its replays would restart momentum).  A tensor ``lr`` on the device is read by
the kernels, so a scheduler that writes it in place (as torch's schedulers do) steers the
replays; a float lr is baked into the graph, and a CPU tensor lr is refused under
capture.  Buffers used on a stream other than the last one get ``record_stream``.

The returned :class:`ProGradStats` are views of preallocated buffers: the next step
overwrites them (clone to keep).  Float64 parameters are refused (Triton passes float
scalars as fp32): use "torch"/"cpp".
"""

from __future__ import annotations

import operator
import os
import struct

import torch
from torch import Tensor

from .. import _host
from ..functional import GRANULARITIES, ProGradStats
from . import _common
from ._common import (CaptureError, capturing, count, keep_for_graphs, note_stream,
                      refuse_first_step_under_capture, stats_buffers, upload)

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_dp = Tensor.data_ptr
_numel = Tensor.numel
_contig = Tensor.is_contiguous
_size = Tensor.size
_is_neg = Tensor.is_neg
_dtype = operator.attrgetter("dtype")
_NO_KEY = object()  # a key that equals nothing (tensors the key cannot describe)
_NONE_TYPE = type(None)
_unpack_addresses = struct.Struct("4q").unpack_from  # a fingerprint's first four words
# Kernel arguments written every step (in this order; see TritonBackend._launch).
_STEP_ARGS = ("grad_scale", "lam", "found_inf", "lr", "lr_ptr", "momentum",
              "one_minus_dampening", "weight_decay")


def _import_kernels():
    from prograd_fast.kernels import prograd_sgd  # noqa: WPS433 (lazy: triton is optional)
    return prograd_sgd


def _new_buffer(p: Tensor) -> Tensor:
    """A first-step momentum buffer; the kernel writes every element (tests poison it)."""
    return torch.empty_like(p, memory_format=torch.contiguous_format)


def _ptrs(tensors: list) -> tuple:
    """Addresses (0 for None)."""
    if _NONE_TYPE in map(type, tensors):
        return tuple([0 if t is None else t.data_ptr() for t in tensors])
    return tuple(map(_dp, tensors))


def _present(tensors: list) -> list:
    return [t for t in tensors if t is not None] if _NONE_TYPE in map(type, tensors) else tensors


def _tensor_key(t) -> tuple | None:
    """What a compiled kernel is specialised on for an AMP / lr tensor (dtype, alignment),
    and what the full check accepted (device, one element)."""
    if t is None:
        return None
    return (t.dtype, t.data_ptr() % 16 == 0, t.device, t.numel())


class _Plan:
    """One group's prepared step: valid for ``key`` (structure), bound to ``addrs``.  (No
    ``__slots__``: memory accounting that walks the optimizer's objects sees its tensors.)"""

    def __init__(self) -> None:
        self.key = _NO_KEY
        self.addrs = _NO_KEY
        self.align = None       # what the compiled kernels were specialised on (addresses)
        self.fp = None          # the host helper's fingerprint of the tensors bound (or None)
        self.options = _NO_KEY  # the options part of ``key``
        self.layout: dict = {}
        self.launchers: tuple = ()
        self.slots: tuple = ()  # per launcher: argument positions of the per-step values
        self.stats: ProGradStats | None = None
        self.owned: list[Tensor] = []
        self.lr_ptr = False
        self.cpu_lr = False
        self.device = None
        self.meta: Tensor | None = None  # the offset table (groups of several tensors)
        self.rows_host: Tensor | None = None  # its tensor rows on the host (CUDA only)
        self.meta_stream = None          # stream that last wrote/used it; None: do not reuse

    def __reduce__(self):
        # Copies (deepcopy, pickle) start from an empty plan, rebuilt by their first step.
        return (_Plan, ())


class TritonBackend(_common.Backend):
    """``small_max``, ``fused_max_chunks`` and ``block`` override the kernel module's
    ``SMALL_MAX`` (largest group run by one program), ``FUSED_MAX_CHUNKS`` (most chunks
    that program walks) and ``BLOCK`` (elements per vector step, a power of two): small
    sizes make every launch path reachable with small tensors (tests)."""

    name = "triton"

    def __init__(self, *, small_max: int | None = None, fused_max_chunks: int | None = None,
                 block: int | None = None) -> None:
        if block is not None and (block < 1 or block & (block - 1)):
            raise ValueError(f"block must be a power of two, got {block}")
        self._available: str | None | bool = False  # False: not computed yet
        self._k = None
        self._sizes = (small_max, fused_max_chunks, block)

    def _size(self, index: int, default: int) -> int:
        value = self._sizes[index]
        return default if value is None else value

    # ------------------------------------------------------------------ availability
    def available(self) -> str | None:
        if self._available is False:
            self._available = self._probe()
        return self._available

    def _probe(self) -> str | None:
        try:
            import triton  # noqa: F401
            self._k = _import_kernels()
        except Exception as exc:  # ImportError or a broken triton install
            return f"triton cannot be imported ({exc})"
        if self._k.INTERPRET:
            return None
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return ("TRITON_INTERPRET was set after the kernels were imported; set it before "
                    "importing prograd_fast")
        if not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
        return None

    # ------------------------------------------------------------------ the keys
    @staticmethod
    def _options(step) -> tuple:
        """The options that select kernel code or were checked with the tensors: granularity,
        momentum, nesterov, maximize, weight decay on/off, and the lr / AMP tensors' dtype,
        alignment, device and size (None for a float lr and for no AMP)."""
        lr, gs, fi = step.lr, step.grad_scale, step.found_inf
        return (step.granularity, step.momentum != 0, bool(step.nesterov), bool(step.maximize),
                step.weight_decay != 0,
                _tensor_key(lr) if isinstance(lr, Tensor) else None,
                None if gs is None else _tensor_key(gs),
                None if fi is None else _tensor_key(fi))

    @staticmethod
    def _fingerprint(step) -> bytes | None:
        """The host helper's one-pass description of every tensor the kernels touch
        (addresses, sizes, dtypes, devices, contiguity; see csrc/prograd_host.cpp), or None
        without the helper or for tensors it does not read (then :meth:`_keys` decides)."""
        host = _host.module()
        if host is None:
            return None
        bufs = step.momentum_buffers if step.momentum != 0 else ()
        return host.fingerprint(step.params, step.grads, step.general_grads, bufs)

    @classmethod
    def _keys(cls, step) -> tuple:
        """``(addresses, structure)`` of the group (see the module docstring) in Python: a
        few C-level passes over the tensor lists, for steps the fingerprint cannot
        describe or does not match."""
        params, grads, generals = step.params, step.grads, step.general_grads
        bufs = step.momentum_buffers if step.momentum != 0 else ()
        try:
            p0 = params[0]
            dtype = p0.dtype
            options = cls._options(step)
            # every tensor's sizes, dtype, contiguity and negation bit (a view of the same
            # memory keeps the address); devices need no pass: under unified addressing two
            # devices never share an address.  The sizes go with the addresses (a change is
            # checked in full and re-bound): the structure must not change when a first
            # step's new momentum buffers appear.
            tensors = [*params, *grads, *_present(generals), *_present(bufs)]
            dtypes = list(map(_dtype, tensors))
            addrs = (_ptrs(params), tuple(map(_dp, grads)), _ptrs(generals), _ptrs(bufs),
                     tuple(map(_size, tensors)))
            return addrs, (
                tuple(map(_numel, params)), dtype, p0.device, all(map(_contig, tensors)),
                dtypes.count(dtype) == len(dtypes), not any(map(_is_neg, tensors)), options)
        except (RuntimeError, TypeError, AttributeError, IndexError):
            return _NO_KEY, _NO_KEY  # sparse tensors, wrong types, an empty group

    # ------------------------------------------------------------------ validation
    def _full_check(self, step) -> str | None:
        params = step.params
        if not params:
            return "empty group"
        if not (len(params) == len(step.grads) == len(step.general_grads)
                == len(step.momentum_buffers)):
            return "params, grads, general_grads and momentum_buffers differ in length"
        if step.granularity not in GRANULARITIES:
            return f"unknown granularity {step.granularity!r}"
        device, dtype = params[0].device, params[0].dtype
        if device.type == "cpu" and not self._k.INTERPRET:
            return "CPU tensors need TRITON_INTERPRET=1 (set before import)"
        if device.type != "cpu" and self._k.INTERPRET:
            return "the Triton interpreter (TRITON_INTERPRET=1) only runs CPU tensors"
        if device.type not in ("cpu", "cuda"):
            return f"{device.type} tensors are not supported"
        if dtype not in _SUPPORTED_DTYPES:
            return (f"{dtype} parameters are not supported (fp32/fp16/bf16 only; Triton float "
                    "scalars are fp32); use the torch backend")
        momentum = step.momentum != 0
        for i, p in enumerate(params):
            if not isinstance(p, Tensor) or not isinstance(step.grads[i], Tensor):
                return f"parameter {i} or its domain gradient is not a tensor"
            others = [step.grads[i], step.general_grads[i]]
            if momentum:
                others.append(step.momentum_buffers[i])
            for t in [p] + others:
                if t is None:
                    continue
                if not isinstance(t, Tensor):
                    return f"expected tensors, got {type(t).__name__}"
                if t.layout != torch.strided or t.is_sparse:
                    return "sparse tensors are not supported"
                if t.device != device:
                    return f"tensors on several devices ({t.device} and {device})"
                if t.dtype != dtype:
                    return f"mixed dtypes in one group ({t.dtype} and {dtype})"
                if t.shape != p.shape:
                    return f"shape {tuple(t.shape)} does not match its parameter {tuple(p.shape)}"
                if not t.is_contiguous():
                    return "non-contiguous tensors are not supported"
                if t.is_neg() or t.is_conj():  # the kernels read memory as it is
                    return "tensors with a lazy negation or conjugation bit are not supported"
                if t.data_ptr() % t.element_size():
                    return "a tensor's address is not a multiple of its element size"
        for name in ("grad_scale", "found_inf"):
            t = getattr(step, name)
            if t is not None and (not isinstance(t, Tensor) or t.device != device
                                  or t.numel() != 1):
                return f"{name} must be a one-element tensor on {device}"
        lr = step.lr
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                return "a tensor lr must be a one-element floating-point tensor"
            if lr.device != device and lr.device.type != "cpu":
                return f"lr tensor on {lr.device} but parameters on {device}"
        return None

    def _plan_or_reason(self, step, prepare: bool = True, keys: tuple | None = None,
                        fp: bytes | None = None) -> tuple[_Plan | None, str | None]:
        """The group's plan, bound to this step's tensors, or why the group cannot run.
        Nothing is allocated or launched for a group that fails the check, and nothing at
        all with ``prepare=False`` (``unsupported``: a question, not a step).  ``fp``: the
        step's fingerprint, recorded in the plan for the next steps' quick check."""
        reason = self.available()
        if reason is not None:
            return None, reason
        addrs, struct = self._keys(step) if keys is None else keys
        plan = step.extra.get("triton_plan")
        # Without a fingerprint, equal Python keys mean nothing changed.  A fingerprint that
        # did not match (try_step) is finer than those keys (every tensor's dtype, sizes and
        # device): check everything again.
        if fp is not None or not (plan is not None and plan.addrs == addrs
                                  and plan.key == struct and struct is not _NO_KEY):
            count(step.extra, "full_checks")
            reason = self._full_check(step)
            if reason is not None:
                return None, reason
            if struct is _NO_KEY:  # cannot happen for tensors that pass the check; be safe
                return None, "the group's tensors cannot be described for the launch cache"
            if not prepare:
                return None, None
            if plan is None or plan.key != struct or not self._bind(plan, step, addrs):
                plan = self._build(step, struct, addrs)
            else:
                count(step.extra, "rebinds")
        # Valid for these tensors as they are now, unless bound to new momentum buffers
        # (see _bind: then nothing matches, as with ``addrs``).
        plan.fp, plan.options = (None if plan.addrs is _NO_KEY else fp), struct[-1]
        return plan, None

    def unsupported(self, step) -> str | None:
        return self._plan_or_reason(step, prepare=False)[1]

    # ------------------------------------------------------------------ building a plan
    def _buffers(self, extra: dict, T: int, n_parts: int, device, granularity: str) -> dict:
        """Statistics, partials and the ticket counter, reused while their sizes hold."""
        key = (T, n_parts, device, granularity)
        bufs = extra.get("triton_bufs")
        if bufs is not None and bufs["key"] == key:
            return bufs
        stats_f, stats_b, stats = stats_buffers(T, torch.float32, device,
                                                granularity == "global")
        stats_b = stats_b.view(torch.uint8)  # the kernels store bytes
        bufs = dict(key=key, stats_f=stats_f, stats_b=stats_b, stats=stats,
                    partials=torch.empty(max(1, 3 * n_parts), device=device, dtype=torch.float32),
                    # monotonic int64 ticket (see the kernels): zero when made, never reset
                    counter=torch.zeros(1, device=device, dtype=torch.int64))
        extra["triton_bufs"] = bufs
        return bufs

    def _layout(self, numels: tuple) -> dict:
        """Chunking of the group (sizes only) and whether one program does the whole step."""
        k = self._k
        small_max = self._size(0, k.SMALL_MAX)
        total = sum(numels)
        fused_chunks = sum(1 for n in numels if n)  # one SMALL_MAX chunk per non-empty tensor
        fused = total <= small_max and fused_chunks <= self._size(1, k.FUSED_MAX_CHUNKS)
        chunk = small_max if fused else k.chunk_size(total, block=self._size(2, k.BLOCK))
        counts = [(n + chunk - 1) // chunk for n in numels]
        firsts, acc = [], 0
        for c in counts:
            firsts.append(acc)
            acc += c
        chunks = []
        for t, (n, c) in enumerate(zip(numels, counts)):
            for j in range(c):
                chunks.extend((t, j * chunk))
        return dict(fused=fused, chunk=chunk, n_parts=acc, counts=counts, firsts=firsts,
                    chunks=chunks)

    def _table_rows(self, step, layout: dict, firsts: list[bool]) -> list[int] | None:
        """The int64 offset table (element offsets from ``params[0]``), with per tensor an
        ``aligned`` bit when all four of its pointers are 16-byte aligned; None when an
        address is not a whole number of elements away from ``params[0]``."""
        k = self._k
        params = step.params
        size = params[0].element_size()
        base = params[0].data_ptr()
        momentum = step.momentum != 0
        offsets, bits = [], []
        for i, p in enumerate(params):
            g = step.general_grads[i]
            buf = step.momentum_buffers[i] if momentum else None
            addrs = [p.data_ptr(), step.grads[i].data_ptr()]
            addrs += [base if t is None else t.data_ptr() for t in (g, buf)]
            if any((a - base) % size for a in addrs):
                return None
            offsets.append(tuple((a - base) // size for a in addrs))
            bits.append((k.BIT_FIRST if firsts[i] else 0)
                        | (k.BIT_GENERAL if g is not None else 0)
                        | (k.BIT_ALIGNED if all(a % 16 == 0 for a in addrs) else 0))
        return k.table_rows(offsets, list(map(_numel, params)), layout["firsts"],
                            layout["counts"], bits, layout["chunks"])

    @staticmethod
    def _new_buffers(step) -> list[bool]:
        """Momentum buffers for the tensors that have none yet (the kernel writes ``buf = u``);
        which ones were made.  Refused while capturing (see ``_common``)."""
        firsts = [False] * len(step.params)
        if step.momentum != 0:
            refuse_first_step_under_capture(step, step.params[0].device)
            bufs = step.momentum_buffers
            for i, b in enumerate(bufs):
                if b is None:
                    bufs[i] = _new_buffer(step.params[i])
                    firsts[i] = True
        return firsts

    def _bind(self, plan: _Plan, step, addrs) -> bool:
        """Point ``plan`` at this step's tensors (False: the compiled kernels were specialised
        on another alignment, build a new plan).  Makes missing momentum buffers."""
        params = step.params
        p0 = params[0]
        device = plan.device
        momentum = step.momentum != 0
        table = len(params) > 1
        if table:
            align = p0.data_ptr() % 16 == 0
        else:
            d0, g0 = step.grads[0], step.general_grads[0]
            b0 = step.momentum_buffers[0] if momentum else None
            align = tuple(t is None or t.data_ptr() % 16 == 0 for t in (p0, d0, g0, b0))
        if plan.align is not None and align != plan.align:
            return False
        plan.align = align
        firsts = self._new_buffers(step)
        if table:
            rows = self._table_rows(step, plan.layout, firsts)
            if rows is None:
                return False
            stream = (torch._C._cuda_getCurrentRawStream(device.index)
                      if device.type == "cuda" else "cpu")
            now_capturing = capturing(device)
            # The table is rewritten in place (in stream order) unless a captured graph reads
            # it or another stream used it last; else a new one is uploaded.
            reuse = (plan.meta is not None and plan.meta.numel() == len(rows)
                     and plan.meta_stream == stream and not now_capturing)
            count(step.extra, "table_uploads")
            plan.meta = upload(rows, torch.int64, device, step.extra, "triton_table",
                               into=plan.meta if reuse else None)
            plan.meta_stream = None if now_capturing else stream
            # the rows as uploaded: what an address-only re-bind starts from (see _rebase)
            plan.rows_host = (torch.tensor(rows[:len(params) * self._k.ROW], dtype=torch.int64)
                              if device.type == "cuda" else None)
            meta = plan.meta
            for launcher in plan.launchers:
                launcher.bind(meta=meta, p_ref=p0, d_ref=p0, g_ref=p0, b_ref=p0)
        else:
            b0 = step.momentum_buffers[0] if momentum else p0
            for launcher in plan.launchers:
                launcher.bind(p_ref=p0, d_ref=d0, g_ref=d0 if g0 is None else g0, b_ref=b0)
                launcher.set("has_g0", int(g0 is not None))
                launcher.set("first0", int(firsts[0]))
        plan.owned = plan.owned[:4] + ([plan.meta] if table else []) \
            + (list(step.momentum_buffers) if momentum else [])
        if capturing(device):
            keep_for_graphs(step.extra, *plan.owned)
        # A plan bound to buffers it made (their first step: ``buf = update``) is never
        # launched again as it is: the next step re-binds with the first-step flags off, even
        # when its tensors look the same (the new buffers did not reach the state).
        plan.addrs = _NO_KEY if any(firsts) else addrs
        return True

    def _build(self, step, struct, addrs) -> _Plan:
        k = self._k
        extra = step.extra
        params = step.params
        p0 = params[0]
        device = p0.device
        n = len(params)
        momentum = step.momentum != 0
        layout = self._layout(tuple(map(_numel, params)))
        glob = step.granularity == "global"
        T = 1 if glob else n
        bufs = self._buffers(extra, T, layout["n_parts"], device, step.granularity)
        table = n > 1
        plan = _Plan()
        plan.device = device
        plan.key = struct
        plan.layout = layout
        common = dict(meta=None, chunk_base=n * k.ROW if table else 0, p_ref=p0, d_ref=p0,
                      g_ref=p0, b_ref=p0, numel0=0 if table else p0.numel(), has_g0=0,
                      first0=0, CHUNK=layout["chunk"], stats_f=bufs["stats_f"],
                      stats_b=bufs["stats_b"], T=T, grad_scale=None, GLOBAL=glob, TABLE=table,
                      AMP_SCALE=step.grad_scale is not None, ROW=k.ROW,
                      VEC=16 // p0.element_size(), BLOCK=self._size(2, k.BLOCK))
        lr = step.lr
        lr_ptr = isinstance(lr, Tensor) and lr.device == device
        plan.lr_ptr = lr_ptr
        plan.cpu_lr = isinstance(lr, Tensor) and not lr_ptr
        amp = dict(AMP=step.grad_scale is not None or step.found_inf is not None,
                   HAS_FOUND_INF=step.found_inf is not None, found_inf=None, lam=0.0)
        upd = dict(lr=0.0, lr_ptr=None, momentum=0.0, one_minus_dampening=1.0,
                   weight_decay=0.0, LR_PTR=lr_ptr, MOMENTUM=momentum,
                   NESTEROV=bool(step.nesterov), MAXIMIZE=bool(step.maximize),
                   WEIGHT_DECAY=step.weight_decay != 0)
        finalize = dict(partials=bufs["partials"], n_parts=layout["n_parts"],
                        BLOCK_F=k.BLOCK_F, TBLOCK=k.TBLOCK, CBLOCK=k.CBLOCK)
        if layout["fused"]:
            plan.launchers = (k.Launcher(k.KERNELS["fused"], 1,
                                         {**common, **amp, **upd, **finalize}, device),)
        else:
            grid = layout["n_parts"]
            plan.launchers = (
                k.Launcher(k.KERNELS["reduce"], grid,
                           {**common, **amp, **finalize, "counter": bufs["counter"]}, device),
                k.Launcher(k.KERNELS["update"], grid, {**common, **upd}, device))
        plan.slots = tuple(tuple(launcher.index.get(name, -1) for name in _STEP_ARGS)
                           for launcher in plan.launchers)
        plan.stats = bufs["stats"]
        plan.owned = [bufs["stats_f"], bufs["stats_b"], bufs["partials"], bufs["counter"]]
        if not self._bind(plan, step, addrs):  # cannot happen: the full check passed
            raise RuntimeError("triton backend: a tensor address is not a whole number of "
                               "elements away from the first parameter's")
        extra["triton_plan"] = plan
        count(extra, "plans_built")
        return plan

    # ------------------------------------------------------------------ the step
    def step(self, step) -> ProGradStats:
        lam = step.lam
        if step.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got "
                             f"{step.granularity!r}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        plan, reason = self._ready(step)
        if reason is not None:
            raise RuntimeError(f"triton backend cannot run this step: {reason}")
        return self._launch(plan, step)

    def try_step(self, step) -> ProGradStats | str:
        """``step`` when the group can run here, else the reason (nothing launched)."""
        plan, reason = self._ready(step)
        if reason is not None:
            return reason
        return self._launch(plan, step)

    def _ready(self, step) -> tuple[_Plan | None, str | None]:
        """The group's plan ready to launch, or why the group cannot run.  The common case,
        nothing changed since the last step, costs one fingerprint (or the Python keys) and
        one comparison; anything else goes through :meth:`_plan_or_reason`."""
        if self._available is not None:
            reason = self.available()
            if reason is not None:
                return None, reason
        plan = step.extra.get("triton_plan")
        fp = self._fingerprint(step)
        keys = None
        if plan is not None:
            if fp is not None:
                if fp == plan.fp and self._quiet_options(step) == plan.options:
                    return plan, None
                if plan.fp is not None and self._rebase(plan, step, fp):
                    return plan, None
            else:
                keys = self._keys(step)
                addrs, struct = keys
                if plan.addrs == addrs and plan.key == struct and struct is not _NO_KEY:
                    return plan, None
        return self._plan_or_reason(step, keys=keys, fp=fp)

    def _rebase(self, plan: _Plan, step, fp: bytes) -> bool:
        """Only addresses changed (a fresh general gradient every step, alternating
        ``.grad`` blocks): re-bind the pointers and rewrite only the table's address rows,
        without the full check.  True when done; False (nothing changed) sends the step
        through the full check.  The fingerprint's other words -- element counts, every
        tensor's dtype, sizes and device against its parameter's, contiguity, which general
        gradients and buffers are present -- equal those the plan was checked with, and so
        do the options; the addresses are checked here (whole elements from the first
        parameter, the alignment the kernels were compiled for)."""
        old = plan.fp
        if len(fp) != len(old) or self._quiet_options(step) != plan.options:
            return False
        params = step.params
        p0 = params[0]
        device = plan.device
        momentum = step.momentum != 0
        k = self._k
        if len(params) > 1:
            address_rows = getattr(_host.module(), "address_rows", None)
            if address_rows is None:
                return False
            meta = plan.meta
            if (p0.data_ptr() % 16 == 0) != plan.align or meta is None:
                return False
            cuda = device.type == "cuda"
            stream = torch._C._cuda_getCurrentRawStream(device.index) if cuda else "cpu"
            if plan.meta_stream != stream or capturing(device):
                return False  # a graph reads this table, or another stream used it last
            if cuda:
                if plan.rows_host is None:
                    return False
                n_rows = plan.rows_host.numel()
                staging = _common._pinned_empty(n_rows, torch.int64)  # the last copy may run
                staging.copy_(plan.rows_host)
                if not address_rows(fp, old, p0.element_size(), staging.data_ptr(), k.ROW,
                                    k.BIT_GENERAL, k.BIT_ALIGNED):
                    return False
                meta[:n_rows].copy_(staging, non_blocking=True)
            elif not address_rows(fp, old, p0.element_size(), meta.data_ptr(), k.ROW,
                                  k.BIT_GENERAL, k.BIT_ALIGNED):
                return False
            for launcher in plan.launchers:
                launcher.bind(meta=meta, p_ref=p0, d_ref=p0, g_ref=p0, b_ref=p0)
        else:  # one tensor: words 4 and 5 are its structure, 0 to 3 its addresses
            if fp[32:] != old[32:]:
                return False
            a_p, a_d, a_g, a_b = _unpack_addresses(fp)  # 0 for a missing one: aligned
            if (a_p % 16 == 0, a_d % 16 == 0, a_g % 16 == 0, a_b % 16 == 0) != plan.align:
                return False
            size = p0.element_size()
            if a_p % size or a_d % size or a_g % size or a_b % size:
                return False
            d0, g0 = step.grads[0], step.general_grads[0]
            b0 = step.momentum_buffers[0] if momentum else None
            for launcher in plan.launchers:
                launcher.bind(p_ref=p0, d_ref=d0, g_ref=d0 if g0 is None else g0,
                              b_ref=p0 if b0 is None else b0)
        plan.owned = plan.owned[:4] + ([plan.meta] if len(params) > 1 else []) \
            + (list(step.momentum_buffers) if momentum else [])
        plan.fp, plan.addrs = fp, _NO_KEY  # the Python keys no longer describe the binding
        count(step.extra, "address_rebinds")
        return True

    @classmethod
    def _quiet_options(cls, step):
        try:
            return cls._options(step)
        except (RuntimeError, TypeError, AttributeError):
            return _NO_KEY

    def _launch(self, plan: _Plan, step) -> ProGradStats:
        device = plan.device
        lr = step.lr
        if plan.lr_ptr:
            lr_value, lr_tensor = 0.0, lr
        else:
            if plan.cpu_lr and capturing(device):
                raise CaptureError(
                    "a CPU tensor lr would be baked into the CUDA graph (a scheduler's later "
                    f"values ignored on replay): pass lr as a 0-d tensor on {device}")
            lr_value, lr_tensor = float(lr), None
        lam = float(step.lam)
        mom = float(step.momentum)
        omd = 1.0 - float(step.dampening)
        wd = float(step.weight_decay)
        gs, fi = step.grad_scale, step.found_inf
        for launcher, (i_gs, i_lam, i_fi, i_lr, i_lrp, i_mom, i_omd, i_wd) in zip(
                plan.launchers, plan.slots):
            args = launcher.args
            args[i_gs] = gs
            if i_lam >= 0:
                args[i_lam] = lam
                args[i_fi] = fi
            if i_lr >= 0:
                args[i_lr] = lr_value
                args[i_lrp] = lr_tensor
                args[i_mom] = mom
                args[i_omd] = omd
                args[i_wd] = wd
        if capturing(device):
            self._own_for_graph(plan, step.extra)
        if device.type == "cuda":
            self._streams(plan, step.extra, device)
            if device.index != torch.cuda.current_device():
                with torch.cuda.device(device):  # Triton launches on the current device
                    for launcher in plan.launchers:
                        launcher()
                return plan.stats
        for launcher in plan.launchers:
            launcher()
        return plan.stats

    @staticmethod
    def _own_for_graph(plan: _Plan, extra: dict) -> None:
        """A graph captures these launches (bound now or earlier, eagerly): what they read
        and write -- the table, statistics, partials, ticket counter, momentum buffers --
        lives as long as the group, and the table is never rewritten in place again (a
        later re-bind uploads a new one)."""
        plan.meta_stream = None
        keep_for_graphs(extra, *plan.owned)

    @staticmethod
    def _streams(plan: _Plan, extra: dict, device) -> None:
        """``record_stream`` on a stream switch (see ``_common.note_stream``)."""
        note_stream(extra, device, plan.owned, "triton_stream")


BACKEND = TritonBackend()
