"""The Triton backend: one parameter group's ProGrad-SGD step in one or two kernel launches.

Groups of at most ``kernels.prograd_sgd.SMALL_MAX`` elements run in ONE single-program
launch (CoOp's 16x512 context); larger groups run a reduce launch (its last program
finalizes the statistics on the device) and an update launch, whatever the number of
tensors.  Many tensors are addressed through a per-group offset table (see the kernel
module's docstring for why, rather than a flat copy).

Per-group state lives in ``GroupStep.extra`` (kept by the optimizer between steps): the
validated tensor signature (addresses, sizes), the device pointer table, and preallocated
``stats``/``partials``/ticket buffers.  After the first step a step allocates nothing
(unless tensor addresses or sizes change) and never synchronises with the host, so it can
be captured in a CUDA graph after a warm-up step.  The returned :class:`ProGradStats`
are views of those preallocated buffers: the next step overwrites them (clone to keep).
Float64 parameters are refused (Triton passes float scalars as fp32): use "torch"/"cpp".
"""

from __future__ import annotations

import operator
import os
from itertools import repeat

import torch
from torch import Tensor

from ..functional import ProGradStats, _check_options

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_contig = Tensor.is_contiguous


def _import_kernels():
    from prograd_fast.kernels import prograd_sgd  # noqa: WPS433 (lazy: triton is optional)
    return prograd_sgd


def _new_buffer(p: Tensor) -> Tensor:
    """A first-step momentum buffer; the kernel writes every element (tests poison it)."""
    return torch.empty_like(p)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class TritonBackend:
    name = "triton"

    def __init__(self) -> None:
        self._available: str | None | bool = False  # False: not computed yet
        self._k = None

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

    # ------------------------------------------------------------------ validation
    def _signature(self, step) -> tuple:
        """Addresses, sizes and contiguity of everything the kernels touch (C-level maps:
        this runs every step; about 0.5 us per tensor on a slow CPU)."""
        params, grads = step.params, step.grads
        general = step.general_grads
        g_none = any(map(operator.is_, general, repeat(None)))
        if g_none:
            g_ptrs = tuple([0 if g is None else g.data_ptr() for g in general])
            g_ok = all([g is None or g.is_contiguous() for g in general])
        else:
            g_ptrs = tuple(map(_data_ptr, general))
            g_ok = all(map(_contig, general))
        b_ptrs = ()
        if step.momentum != 0:
            bufs = step.momentum_buffers
            if any(map(operator.is_, bufs, repeat(None))):
                b_ptrs = tuple([0 if b is None else b.data_ptr() for b in bufs])
            else:
                b_ptrs = tuple(map(_data_ptr, bufs))
        return (
            tuple(map(_data_ptr, params)), tuple(map(_data_ptr, grads)), g_ptrs, b_ptrs,
            tuple(map(_numel, params)), params[0].dtype,
            g_ok and all(map(_contig, params)) and all(map(_contig, grads)),
        )

    def _full_check(self, step) -> str | None:
        params = step.params
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
            others = [step.grads[i], step.general_grads[i]]
            if momentum:
                others.append(step.momentum_buffers[i])
            for t in [p] + others:
                if t is None:
                    continue
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
                if t.data_ptr() % t.element_size():
                    return "a tensor's address is not a multiple of its element size"
        return None

    @staticmethod
    def _scalars_check(step) -> str | None:
        """Checks that run every step (cheap): list lengths, AMP tensors, a tensor lr."""
        params = step.params
        if not params:
            return "empty group"
        if not (len(params) == len(step.grads) == len(step.general_grads)
                == len(step.momentum_buffers)):
            return "params, grads, general_grads and momentum_buffers differ in length"
        device = params[0].device
        for name in ("grad_scale", "found_inf"):
            t = getattr(step, name)
            if t is not None and (t.device != device or t.numel() != 1):
                return f"{name} must be a one-element tensor on {device}"
        lr = step.lr
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                return "a tensor lr must be a one-element floating-point tensor"
            if lr.device != device and lr.device.type != "cpu":
                return f"lr tensor on {lr.device} but parameters on {device}"
        return None

    def _check(self, step) -> tuple[str | None, tuple | None]:
        """(reason, signature), computed once per GroupStep object and remembered on it."""
        cached = step.__dict__.get("_triton_check")
        if cached is not None:
            return cached
        reason = self.available()
        sig = None
        if reason is None:
            reason = self._scalars_check(step)
            if reason is None:
                sig = self._signature(step)
                extra = step.extra
                if extra.get("triton_valid") != sig:
                    reason = self._full_check(step)
                    extra["triton_valid"] = sig if reason is None else None
        result = (reason, sig)
        step.__dict__["_triton_check"] = result
        return result

    def unsupported(self, step) -> str | None:
        return self._check(step)[0]

    # ------------------------------------------------------------------ per-group plan
    def _buffers(self, extra: dict, T: int, n_parts: int, device, granularity: str) -> dict:
        key = (T, n_parts, device, granularity)
        bufs = extra.get("triton_bufs")
        if bufs is not None and bufs["key"] == key:
            return bufs
        stats_f = torch.empty(5 * T, device=device, dtype=torch.float32)
        stats_b = torch.zeros(T + 1, device=device, dtype=torch.uint8)
        sb = stats_b.view(torch.bool)
        if granularity == "global":
            views = [stats_f[k] for k in range(5)] + [sb[0]]
        else:
            views = [stats_f[k * T:(k + 1) * T] for k in range(5)] + [sb[:T]]
        dot, nn, dd, cos, coef, conflict = views
        stats = ProGradStats(dot=dot, general_norm_sq=nn, domain_norm_sq=dd, cos=cos,
                             conflict=conflict, coef=coef, skipped=sb[T])
        bufs = dict(key=key, stats_f=stats_f, stats_b=stats_b, stats=stats,
                    partials=torch.empty(max(1, 3 * n_parts), device=device, dtype=torch.float32),
                    counter=torch.zeros(1, device=device, dtype=torch.int32))
        extra["triton_bufs"] = bufs
        return bufs

    def _layout(self, extra: dict, numels: tuple, fused: bool) -> dict:
        """Chunking of the group (depends on sizes only)."""
        layout = extra.get("triton_layout")
        if layout is not None and layout["numels"] == numels and layout["fused"] == fused:
            return layout
        k = self._k
        total = sum(numels)
        chunk = k.SMALL_MAX if fused else k.chunk_size(total)
        counts = [(n + chunk - 1) // chunk for n in numels]
        firsts, acc = [], 0
        for c in counts:
            firsts.append(acc)
            acc += c
        chunks = []
        for t, (n, c) in enumerate(zip(numels, counts)):
            for j in range(c):
                chunks.extend((t, j * chunk))
        layout = dict(numels=numels, fused=fused, chunk=chunk, n_parts=acc, counts=counts,
                      firsts=firsts, chunks=chunks)
        extra["triton_layout"] = layout
        return layout

    def _table(self, extra: dict, step, sig: tuple | None, layout: dict, device,
               firsts: list[bool]) -> tuple[Tensor, int]:
        """The int64 offset table (element offsets from ``params[0]``), rebuilt with one small
        async upload when addresses change, and the alignment hint ``ALIGN`` (elements per
        16 bytes when every tensor is 16-byte aligned and every size a multiple of 16, else 1).
        """
        table = extra.get("triton_table")
        if sig is not None and table is not None and table[0] == sig:
            return table[1], table[2]
        k = self._k
        params = step.params
        size = params[0].element_size()
        base = params[0].data_ptr()
        aligned = True
        rows = []
        momentum = step.momentum != 0
        for i, p in enumerate(params):
            g = step.general_grads[i]
            buf = step.momentum_buffers[i] if momentum else None
            addrs = [p.data_ptr(), step.grads[i].data_ptr()]
            addrs += [base if t is None else t.data_ptr() for t in (g, buf)]
            aligned = aligned and all(a % 16 == 0 for a in addrs) and layout["numels"][i] % 16 == 0
            rows.extend([(a - base) // size for a in addrs])
            rows.extend((layout["numels"][i], layout["firsts"][i], layout["counts"][i],
                         int(firsts[i]) | (2 if g is not None else 0)))
        meta = torch.tensor(rows + layout["chunks"], dtype=torch.int64)
        if device.type != "cpu":
            meta = meta.to(device, non_blocking=True)  # pageable source: staged, no sync
        align = 16 // size if aligned else 1
        if sig is not None:
            extra["triton_table"] = (sig, meta, align)
        return meta, align

    # ------------------------------------------------------------------ the step
    def step(self, step) -> ProGradStats:
        _check_options(step.lam, step.granularity)  # ValueError, as the reference
        reason, sig = self._check(step)
        if reason is not None:
            raise RuntimeError(f"triton backend cannot run this step: {reason}")
        k = self._k
        extra = step.extra
        params = step.params
        device = params[0].device
        n = len(params)
        momentum = step.momentum != 0
        first0 = 0
        firsts = None
        if momentum:
            bufs_list = step.momentum_buffers
            firsts = [b is None for b in bufs_list]
            if any(firsts):
                first0 = 1
                for i, b in enumerate(bufs_list):
                    if b is None:  # first step: the kernel writes buf = u
                        bufs_list[i] = _new_buffer(params[i])
        numels = sig[4]
        total = sum(numels)
        fused = total <= k.SMALL_MAX
        layout = self._layout(extra, numels, fused)
        glob = step.granularity == "global"
        T = 1 if glob else n
        bufs = self._buffers(extra, T, layout["n_parts"], device, step.granularity)
        table = n > 1
        align = 1
        args = dict(chunk=layout["chunk"], n_parts=layout["n_parts"], T=T,
                    partials=bufs["partials"], counter=bufs["counter"],
                    stats_f=bufs["stats_f"], stats_b=bufs["stats_b"])
        if table:
            # The signature taken before new buffers were made says "no buffer": a table
            # built now must not be reused, so key it on a signature that cannot recur.
            key = sig if not first0 else None
            meta, align = self._table(extra, step, key, layout, device, firsts or [False] * n)
            p0 = params[0]
            args.update(meta=meta, chunk_base=n * k.ROW, p=p0, d=p0, g=p0, b=p0,
                        numel0=0, has_g0=0, first0=0)
        else:
            d0, g0 = step.grads[0], step.general_grads[0]
            b0 = step.momentum_buffers[0] if momentum else params[0]
            args.update(meta=None, chunk_base=0, p=params[0], d=d0,
                        g=g0 if g0 is not None else d0, b=b0, numel0=numels[0],
                        has_g0=int(g0 is not None), first0=first0)
        lr = step.lr
        lr_ptr = None
        if isinstance(lr, Tensor):
            if lr.device == device:
                lr_ptr, lr = lr, 0.0
            else:  # a CPU tensor lr for device parameters: reading it is not a device sync
                lr = float(lr)
        grad_scale, found_inf = step.grad_scale, step.found_inf
        flags = dict(GLOBAL=glob, TABLE=table, ALIGN=align,
                     AMP=grad_scale is not None or found_inf is not None,
                     AMP_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                     LR_PTR=lr_ptr is not None, MOMENTUM=momentum, NESTEROV=bool(step.nesterov),
                     MAXIMIZE=bool(step.maximize), WEIGHT_DECAY=step.weight_decay != 0)
        lam = float(step.lam)
        mom, omd, wd = float(step.momentum), 1.0 - float(step.dampening), float(step.weight_decay)
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):  # Triton launches on the current device
                self._launch(fused, args, flags, lam, float(lr), lr_ptr, grad_scale, found_inf,
                             mom, omd, wd)
        else:
            self._launch(fused, args, flags, lam, float(lr), lr_ptr, grad_scale, found_inf,
                         mom, omd, wd)
        return bufs["stats"]

    def _launch(self, fused, args, flags, lam, lr, lr_ptr, grad_scale, found_inf, mom, omd, wd):
        k = self._k
        if fused:
            k.launch_fused(args, flags, lam, lr, lr_ptr, grad_scale, found_inf, mom, omd, wd)
        else:
            k.launch_reduce(args, flags, lam, grad_scale, found_inf)
            k.launch_update(args, flags, lr, lr_ptr, grad_scale, mom, omd, wd)


BACKEND = TritonBackend()
