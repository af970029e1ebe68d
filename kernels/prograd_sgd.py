"""Triton kernels for one ProGrad-SGD parameter group: reduce, finalize, update.

Math (see ``prograd_fast.functional``): per group (``GLOBAL``) or per tensor,
``dot = <d, g>``, ``nn = ||g||^2``, ``dd = ||d||^2`` (fp32 accumulation, both gradients
multiplied by ``1/grad_scale`` under AMP); ``coef = lam*dot/nn`` where ``dot < 0``,
``nn > 0`` and both are finite, else 0; ``u = where(conflict, d - coef*g, d)``; then
``torch.optim.SGD`` on ``u`` and a write-back in the parameter's dtype.

Launches per group (whatever the number of tensors):

* ``_fused_kernel`` -- ONE program does everything (reduce, finalize, update), for groups
  of at most ``SMALL_MAX`` elements in at most ``FUSED_MAX_CHUNKS`` chunks (CoOp: one
  16x512 tensor).  The chunk bound matters: one program walks its chunks one after the
  other, so 200 tiny tensors would take a millisecond there.
* ``_reduce_kernel`` + ``_update_kernel`` -- two launches over a chunk grid.  Each reduce
  program writes its chunk's partial sums and draws a ticket from a monotonic int64
  counter; the program whose ticket is ``n_parts - 1`` modulo ``n_parts`` (the last of
  this launch, since every launch adds exactly ``n_parts``) sums the partials in a fixed
  order -- deterministic, no float atomics -- and writes the statistics, the coefficient and
  the skip flag to device memory, where the update kernel reads them.  The counter is never
  reset by a kernel (a reset that were ever skipped would shift every later step); it is
  zeroed when it is allocated.  The host never looks at any of it.

Addressing many tensors: an *offset table* (``TABLE=True``), not a flat copy.  The backend
keeps one int64 device tensor per group holding, per tensor, the element offsets of
``p, d, g, buf`` from ``params[0]`` (``p_ref``) and sizes, and per chunk ``(tensor,
start)``; a program loads its row and forms ``p_ref + offset``.  Why a table: a flat buffer
needs either a copy of ``d`` and ``g`` every step (+16 B/element) or ownership of the
``.grad`` storage by the optimizer (which a user replacing ``.grad``, or autograd
allocating a fresh ``.grad`` after ``zero_grad(set_to_none=True)``, breaks).  Why offsets
rather than raw addresses cast to pointers: the compiler's alignment analysis follows
``pointer + multiple_of(offset)`` but not an int-to-pointer cast.

The table is rebuilt when an address or size changes -- including inside CUDA-graph
capture, where the standard pattern (``zero_grad(set_to_none=True)``, then capture backward
and step) gives ``.grad`` new addresses from the graph's pool.  The backend uploads it from
pinned host memory (no pageable copy; eagerly no sync); a table built during capture is
copied at once outside the graph, so replays copy nothing from the host (see
``prograd_fast/backends/_common.py``).  A group of one tensor
skips the table (``TABLE=False``): its pointers travel as kernel arguments.

Vector width: every chunk is walked as full ``BLOCK``-element steps without a mask, then
one masked tail step.  The full steps use 128-bit loads and stores whenever the tensor's
pointers are 16-byte aligned, whatever its size: for a single tensor Triton specialises on
the pointers' alignment; in a table the row carries an ``aligned`` bit per tensor and the
program takes the hinted (``multiple_of``) path for that tensor only.  Checked by compiling
for sm_90 (``tests/test_triton_backend.py``; no GPU run yet).

Table layout (int64): rows of ``ROW`` entries per tensor
``[p, d, g, buf (offsets), numel, first_chunk, n_chunks, bits]`` (bit 0: new momentum
buffer, bit 1: has a general gradient, bit 2: all four pointers 16-byte aligned), then two
entries per chunk ``[tensor, start]`` from ``chunk_base``.  Statistics buffer ``stats_f``
(fp32): ``[dot, nn, dd, cos, coef]`` each of length ``T`` (1 for global, tensors for
"tensor"); ``stats_b`` (uint8): ``[conflict x T, skipped]``; ``partials`` (fp32):
``[dot, nn, dd]`` each of length ``n_parts`` (one per chunk).

Launching: :class:`Launcher` calls a kernel through Triton's JIT entry point once, keeps
the compiled kernel it returns and from then on calls the compiled kernel's launcher
directly with a pre-packed argument list (no binder, no specialisation lookup per step);
with a launch hook installed (Proton, a profiler) it calls the hooks with the kernel's launch
metadata itself, as Triton's entry point would, and still launches the compiled kernel.
The update walks its chunks in reverse (last chunk first): the reduce read the end of the
group last, so that part of ``d`` and ``g`` is the most likely to be still in L2.
The backend makes a new ``Launcher`` whenever anything the compiled kernel was specialised
on can change (addresses, constexpr flags, the dtype or alignment of the AMP / lr tensors).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older triton: launch hooks are not looked at
    _knobs = None

__all__ = ["ROW", "SMALL_MAX", "FUSED_MAX_CHUNKS", "BLOCK", "INTERPRET", "Launcher",
           "chunk_size", "table_rows", "BIT_FIRST", "BIT_GENERAL", "BIT_ALIGNED"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ROW = 8                 # int64 entries per tensor row of the table
BLOCK = 2048            # elements per vector step (8 warps x 32 threads x 8 elements)
NUM_WARPS = 8
SMALL_MAX = 16384       # largest group (elements) handled by the single-program kernel
FUSED_MAX_CHUNKS = 8    # ... and most chunks (= non-empty tensors) it walks one by one
BLOCK_F = 1024          # partials per finalize step (global)
TBLOCK = 32             # tensors per finalize tile ("tensor" granularity)
CBLOCK = 32             # chunks per finalize tile ("tensor"; 32x32 keeps the reduce at 64 regs)
BIT_FIRST, BIT_GENERAL, BIT_ALIGNED = 1, 2, 4
# Tensor arguments the caller writes before every launch (kept as tensors).
PER_STEP_TENSORS = frozenset(("grad_scale", "found_inf", "lr_ptr"))


@triton.jit
def _isfinite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _inv_scale(grad_scale, AMP_SCALE: tl.constexpr):
    # 1/scale in fp64 then rounded, as the reference computes it.
    if AMP_SCALE:
        inv = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)
    else:
        inv = 1.0
    return inv


@triton.jit
def _chunk(meta, c, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0, first0, CHUNK,
           TABLE: tl.constexpr, ROW: tl.constexpr):
    """Resolve chunk ``c``: tensor index, start element, pointers, size, flags."""
    if TABLE:
        t = tl.load(meta + chunk_base + 2 * c)
        start = tl.multiple_of(tl.load(meta + chunk_base + 2 * c + 1), 16)  # j * CHUNK
        row = meta + t * ROW
        p = p_ref + tl.load(row)
        d = p_ref + tl.load(row + 1)
        g = p_ref + tl.load(row + 2)
        b = p_ref + tl.load(row + 3)
        numel = tl.load(row + 4)
        bits = tl.load(row + 7)
        has_g = (bits & 2) != 0
        first = (bits & 1) != 0
        aligned = (bits & 4) != 0
    else:
        t = 0
        start = tl.cast(c, tl.int64) * CHUNK
        p = p_ref
        d = d_ref
        g = g_ref
        b = b_ref
        numel = tl.cast(numel0, tl.int64)
        has_g = has_g0 != 0
        first = first0 != 0
        aligned = False  # Triton specialises the argument pointers' alignment itself
    return t, start, p, d, g, b, numel, has_g, first, aligned


@triton.jit
def _aligned_ptrs(meta, c, chunk_base, p_ref, ROW: tl.constexpr, VEC: tl.constexpr):
    """The chunk's pointers with the 16-byte alignment the host checked made visible."""
    t = tl.load(meta + chunk_base + 2 * c)
    row = meta + t * ROW
    p = p_ref + tl.multiple_of(tl.load(row), VEC)
    d = p_ref + tl.multiple_of(tl.load(row + 1), VEC)
    g = p_ref + tl.multiple_of(tl.load(row + 2), VEC)
    b = p_ref + tl.multiple_of(tl.load(row + 3), VEC)
    return p, d, g, b


@triton.jit
def _reduce_steps(d, g, lo, hi, end, has_g, inv, acc_dg, acc_gg, acc_dd,
                  MASKED: tl.constexpr, AMP_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    for off in range(lo, hi, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        if MASKED:
            m = offs < end
            dv = tl.load(d + offs, mask=m, other=0.0).to(tl.float32)
            gv = tl.load(g + offs, mask=m & has_g, other=0.0).to(tl.float32)
        else:
            dv = tl.load(d + offs).to(tl.float32)
            gv = tl.load(g + offs, mask=has_g, other=0.0).to(tl.float32)
        if AMP_SCALE:
            dv = dv * inv
            gv = gv * inv
        acc_dg += dv * gv
        acc_gg += gv * gv
        acc_dd += dv * dv
    return acc_dg, acc_gg, acc_dd


@triton.jit
def _reduce_chunk(d, g, start, numel, has_g, inv, CHUNK,
                  AMP_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums of one chunk: full blocks unmasked, then a masked tail."""
    end = tl.minimum(start + CHUNK, numel)
    body = start + ((end - start) // BLOCK) * BLOCK
    acc_dg = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gg = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dg, acc_gg, acc_dd = _reduce_steps(d, g, start, body, end, has_g, inv, acc_dg, acc_gg,
                                           acc_dd, False, AMP_SCALE, BLOCK)
    acc_dg, acc_gg, acc_dd = _reduce_steps(d, g, body, end, end, has_g, inv, acc_dg, acc_gg,
                                           acc_dd, True, AMP_SCALE, BLOCK)
    return tl.sum(acc_dg, 0), tl.sum(acc_gg, 0), tl.sum(acc_dd, 0)


@triton.jit
def _reduce_one(meta, c, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0, first0, CHUNK,
                inv, TABLE: tl.constexpr, AMP_SCALE: tl.constexpr, ROW: tl.constexpr,
                VEC: tl.constexpr, BLOCK: tl.constexpr):
    t, start, p, d, g, b, numel, has_g, first, aligned = _chunk(
        meta, c, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0, first0, CHUNK, TABLE,
        ROW)
    if TABLE and aligned:  # TABLE is a constexpr: without a table this branch is not built
        p, d, g, b = _aligned_ptrs(meta, c, chunk_base, p_ref, ROW, VEC)
        dg, gg, dd = _reduce_chunk(d, g, start, numel, has_g, inv, CHUNK, AMP_SCALE, BLOCK)
    else:
        dg, gg, dd = _reduce_chunk(d, g, start, numel, has_g, inv, CHUNK, AMP_SCALE, BLOCK)
    return dg, gg, dd


@triton.jit
def _write_stats(stats_f, stats_b, T, idx, mask, dot, nn, dd, lam):
    """Coefficient, conflict and cosine exactly as ``prograd_coefficient`` / ``_cosine``."""
    conflict = (dot < 0) & (nn > 0) & _isfinite(dot) & _isfinite(nn)
    coef = tl.where(conflict, tl.div_rn(lam * dot, tl.where(conflict, nn, 1.0)), 0.0)
    denom = tl.sqrt_rn(dd) * tl.sqrt_rn(nn)
    positive = denom > 0
    cos = tl.where(positive, tl.div_rn(dot, tl.where(positive, denom, 1.0)), 0.0)
    tl.store(stats_f + idx, dot, mask=mask)
    tl.store(stats_f + T + idx, nn, mask=mask)
    tl.store(stats_f + 2 * T + idx, dd, mask=mask)
    tl.store(stats_f + 3 * T + idx, cos, mask=mask)
    tl.store(stats_f + 4 * T + idx, coef, mask=mask)
    tl.store(stats_b + idx, conflict.to(tl.uint8), mask=mask)


@triton.jit
def _finalize(partials, n_parts, meta, T, stats_f, stats_b, found_inf, lam,
              GLOBAL: tl.constexpr, TABLE: tl.constexpr, AMP: tl.constexpr,
              HAS_FOUND_INF: tl.constexpr, ROW: tl.constexpr,
              BLOCK_F: tl.constexpr, TBLOCK: tl.constexpr, CBLOCK: tl.constexpr):
    """Sum the per-chunk partials in a fixed order and write the statistics (one program)."""
    if GLOBAL or not TABLE:
        a_dg = tl.zeros([BLOCK_F], dtype=tl.float32)
        a_gg = tl.zeros([BLOCK_F], dtype=tl.float32)
        a_dd = tl.zeros([BLOCK_F], dtype=tl.float32)
        for off in range(0, n_parts, BLOCK_F):
            offs = off + tl.arange(0, BLOCK_F)
            m = offs < n_parts
            a_dg += tl.load(partials + offs, mask=m, other=0.0, cache_modifier=".cg")
            a_gg += tl.load(partials + n_parts + offs, mask=m, other=0.0, cache_modifier=".cg")
            a_dd += tl.load(partials + 2 * n_parts + offs, mask=m, other=0.0, cache_modifier=".cg")
        dot = tl.sum(a_dg, 0)
        nn = tl.sum(a_gg, 0)
        dd = tl.sum(a_dd, 0)
        _write_stats(stats_f, stats_b, 1, 0, True, dot, nn, dd, lam)
        tot_nn = nn
        tot_dd = dd
    else:
        # "tensor" granularity over a table: tiles of [tensors, chunks of that tensor].
        tot_nn = tl.full([], 0.0, tl.float32)
        tot_dd = tl.full([], 0.0, tl.float32)
        for t0 in range(0, T, TBLOCK):
            ts = t0 + tl.arange(0, TBLOCK)
            tm = ts < T
            c0 = tl.load(meta + ts * ROW + 5, mask=tm, other=0)
            nc = tl.load(meta + ts * ROW + 6, mask=tm, other=0)
            max_nc = tl.max(nc, 0)
            a_dg = tl.zeros([TBLOCK, CBLOCK], dtype=tl.float32)
            a_gg = tl.zeros([TBLOCK, CBLOCK], dtype=tl.float32)
            a_dd = tl.zeros([TBLOCK, CBLOCK], dtype=tl.float32)
            for j0 in range(0, max_nc, CBLOCK):
                js = j0 + tl.arange(0, CBLOCK)
                m = tm[:, None] & (js[None, :] < nc[:, None])
                idx = c0[:, None] + js[None, :]
                a_dg += tl.load(partials + idx, mask=m, other=0.0, cache_modifier=".cg")
                a_gg += tl.load(partials + n_parts + idx, mask=m, other=0.0, cache_modifier=".cg")
                a_dd += tl.load(partials + 2 * n_parts + idx, mask=m, other=0.0,
                                cache_modifier=".cg")
            dot = tl.sum(a_dg, 1)
            nn = tl.sum(a_gg, 1)
            dd = tl.sum(a_dd, 1)
            _write_stats(stats_f, stats_b, T, ts, tm, dot, nn, dd, lam)
            tot_nn += tl.sum(tl.where(tm, nn, 0.0), 0)
            tot_dd += tl.sum(tl.where(tm, dd, 0.0), 0)
    skip = tl.full([], 0, tl.int1)
    if HAS_FOUND_INF:
        skip = skip | (tl.load(found_inf) != 0)
    if AMP:
        # An inf/NaN in either gradient skips the whole step, as GradScaler expects.
        skip = skip | ~_isfinite(tot_nn) | ~_isfinite(tot_dd)
    tl.store(stats_b + T, skip.to(tl.uint8))


@triton.jit
def _update_steps(p, d, g, b, lo, hi, end, apply, first, keep, skip, coef, inv, lr,
                  momentum, one_minus_dampening, weight_decay,
                  MASKED: tl.constexpr, AMP_SCALE: tl.constexpr, MOMENTUM: tl.constexpr,
                  NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                  BLOCK: tl.constexpr):
    for off in range(lo, hi, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        if MASKED:
            m = offs < end
        else:
            m = tl.full([BLOCK], 1, tl.int1)  # folded away: the full steps are unmasked
        dv = tl.load(d + offs, mask=m, other=0.0).to(tl.float32)
        gv = tl.load(g + offs, mask=m & apply, other=0.0).to(tl.float32)
        if AMP_SCALE:
            dv = dv * inv
            gv = gv * inv
        # A select, not d - 0*g: an inf in g with no conflict leaves u = d.
        u = tl.where(apply, dv - coef * gv, dv)
        if MAXIMIZE:
            u = -u
        pv = tl.load(p + offs, mask=m, other=0.0).to(tl.float32)
        if WEIGHT_DECAY:
            u = u + weight_decay * pv
        if MOMENTUM:
            bv = tl.load(b + offs, mask=m & ~first, other=0.0).to(tl.float32)
            nb = tl.where(first, u, bv * momentum + one_minus_dampening * u)
            # Skipped step: an existing buffer is left alone, a new one is zeros.
            tl.store(b + offs, tl.where(skip, 0.0, nb).to(b.dtype.element_ty),
                     mask=m & (keep | first))
            if NESTEROV:
                u = u + momentum * nb
            else:
                u = nb
        tl.store(p + offs, (pv - lr * u).to(p.dtype.element_ty), mask=m & keep)


@triton.jit
def _update_chunk(p, d, g, b, start, numel, has_g, first, coef, conflict, skip, inv, lr,
                  momentum, one_minus_dampening, weight_decay, CHUNK,
                  AMP_SCALE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                  MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, BLOCK: tl.constexpr):
    end = tl.minimum(start + CHUNK, numel)
    body = start + ((end - start) // BLOCK) * BLOCK
    apply = conflict & has_g
    keep = ~skip
    _update_steps(p, d, g, b, start, body, end, apply, first, keep, skip, coef, inv, lr,
                  momentum, one_minus_dampening, weight_decay, False, AMP_SCALE, MOMENTUM,
                  NESTEROV, MAXIMIZE, WEIGHT_DECAY, BLOCK)
    _update_steps(p, d, g, b, body, end, end, apply, first, keep, skip, coef, inv, lr,
                  momentum, one_minus_dampening, weight_decay, True, AMP_SCALE, MOMENTUM,
                  NESTEROV, MAXIMIZE, WEIGHT_DECAY, BLOCK)


@triton.jit
def _load_lr(lr, lr_ptr, LR_PTR: tl.constexpr):
    if LR_PTR:
        val = tl.load(lr_ptr).to(tl.float32)
    else:
        val = lr
    return val


@triton.jit
def _update_one(meta, c, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0, first0, CHUNK,
                stats_f, stats_b, T, inv, lr, momentum, one_minus_dampening, weight_decay,
                GLOBAL: tl.constexpr, TABLE: tl.constexpr, AMP_SCALE: tl.constexpr,
                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                WEIGHT_DECAY: tl.constexpr, ROW: tl.constexpr, VEC: tl.constexpr,
                BLOCK: tl.constexpr):
    t, start, p, d, g, b, numel, has_g, first, aligned = _chunk(
        meta, c, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0, first0, CHUNK, TABLE,
        ROW)
    if GLOBAL:
        s = 0
    else:
        s = t
    coef = tl.load(stats_f + 4 * T + s)
    conflict = tl.load(stats_b + s) != 0
    skip = tl.load(stats_b + T) != 0
    if TABLE and aligned:
        p, d, g, b = _aligned_ptrs(meta, c, chunk_base, p_ref, ROW, VEC)
        _update_chunk(p, d, g, b, start, numel, has_g, first, coef, conflict, skip, inv, lr,
                      momentum, one_minus_dampening, weight_decay, CHUNK,
                      AMP_SCALE, MOMENTUM, NESTEROV, MAXIMIZE, WEIGHT_DECAY, BLOCK)
    else:
        _update_chunk(p, d, g, b, start, numel, has_g, first, coef, conflict, skip, inv, lr,
                      momentum, one_minus_dampening, weight_decay, CHUNK,
                      AMP_SCALE, MOMENTUM, NESTEROV, MAXIMIZE, WEIGHT_DECAY, BLOCK)


@triton.jit(do_not_specialize=["chunk_base", "has_g0", "first0", "n_parts", "T"])
def _reduce_kernel(meta, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0, first0, CHUNK,
                   partials, n_parts, counter, stats_f, stats_b, T, grad_scale, found_inf, lam,
                   GLOBAL: tl.constexpr, TABLE: tl.constexpr,
                   AMP: tl.constexpr, AMP_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                   ROW: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_F: tl.constexpr, TBLOCK: tl.constexpr, CBLOCK: tl.constexpr):
    c = tl.program_id(0)
    inv = _inv_scale(grad_scale, AMP_SCALE)
    dg, gg, dd = _reduce_one(meta, c, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0,
                             first0, CHUNK, inv, TABLE, AMP_SCALE, ROW, VEC, BLOCK)
    tl.store(partials + c, dg)
    tl.store(partials + n_parts + c, gg)
    tl.store(partials + 2 * n_parts + c, dd)
    tl.debug_barrier()
    # Monotonic ticket: each launch draws exactly n_parts numbers, so the program holding
    # n_parts - 1 modulo n_parts is this launch's last one; it sums everyone's partials.
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    if ticket % n_parts == n_parts - 1:
        _finalize(partials, n_parts, meta, T, stats_f, stats_b, found_inf, lam,
                  GLOBAL, TABLE, AMP, HAS_FOUND_INF, ROW, BLOCK_F, TBLOCK, CBLOCK)


@triton.jit(do_not_specialize=["chunk_base", "has_g0", "first0", "T"])
def _update_kernel(meta, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0, first0, CHUNK,
                   stats_f, stats_b, T, grad_scale, lr, lr_ptr, momentum, one_minus_dampening,
                   weight_decay,
                   GLOBAL: tl.constexpr, TABLE: tl.constexpr,
                   AMP_SCALE: tl.constexpr, LR_PTR: tl.constexpr, MOMENTUM: tl.constexpr,
                   NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                   ROW: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    # Chunks in reverse: the programs scheduled first take the end of the group, the part
    # of d and g the reduce read last and that is most likely still in L2.
    c = tl.num_programs(0) - 1 - tl.program_id(0)
    inv = _inv_scale(grad_scale, AMP_SCALE)
    lr_val = _load_lr(lr, lr_ptr, LR_PTR)
    _update_one(meta, c, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0, first0, CHUNK,
                stats_f, stats_b, T, inv, lr_val, momentum, one_minus_dampening, weight_decay,
                GLOBAL, TABLE, AMP_SCALE, MOMENTUM, NESTEROV, MAXIMIZE, WEIGHT_DECAY,
                ROW, VEC, BLOCK)


@triton.jit(do_not_specialize=["chunk_base", "has_g0", "first0", "n_parts", "T"])
def _fused_kernel(meta, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0, first0, CHUNK,
                  partials, n_parts, stats_f, stats_b, T, grad_scale, found_inf, lam,
                  lr, lr_ptr, momentum, one_minus_dampening, weight_decay,
                  GLOBAL: tl.constexpr, TABLE: tl.constexpr,
                  AMP: tl.constexpr, AMP_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                  LR_PTR: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                  MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, ROW: tl.constexpr,
                  VEC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr,
                  TBLOCK: tl.constexpr, CBLOCK: tl.constexpr):
    """The whole step in one program: reduce every chunk, finalize, update every chunk."""
    inv = _inv_scale(grad_scale, AMP_SCALE)
    for c in range(0, n_parts):
        dg, gg, dd = _reduce_one(meta, c, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0,
                                 has_g0, first0, CHUNK, inv, TABLE, AMP_SCALE, ROW, VEC, BLOCK)
        tl.store(partials + c, dg)
        tl.store(partials + n_parts + c, gg)
        tl.store(partials + 2 * n_parts + c, dd)
    tl.debug_barrier()
    _finalize(partials, n_parts, meta, T, stats_f, stats_b, found_inf, lam,
              GLOBAL, TABLE, AMP, HAS_FOUND_INF, ROW, BLOCK_F, TBLOCK, CBLOCK)
    tl.debug_barrier()
    lr_val = _load_lr(lr, lr_ptr, LR_PTR)
    for i in range(0, n_parts):  # in reverse, as the update kernel (L2 holds the tail)
        c = n_parts - 1 - i
        _update_one(meta, c, chunk_base, p_ref, d_ref, g_ref, b_ref, numel0, has_g0, first0,
                    CHUNK, stats_f, stats_b, T, inv, lr_val, momentum, one_minus_dampening,
                    weight_decay, GLOBAL, TABLE, AMP_SCALE, MOMENTUM, NESTEROV, MAXIMIZE,
                    WEIGHT_DECAY, ROW, VEC, BLOCK)


KERNELS = {"fused": _fused_kernel, "reduce": _reduce_kernel, "update": _update_kernel}


# ---------------------------------------------------------------------------- launching
def _hooks_idle() -> bool:
    """True when no Triton launch hook (profilers) is installed: the fast path may skip them.
    (Triton 3.6 keeps a hook as a callable or None, 3.8 as a chain with a ``calls`` list.)"""
    if _knobs is None:
        return False
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _launch_hooked(compiled, grid: int, stream: int, args: list) -> None:
    """Launch ``compiled`` as Triton's own entry point does when a launch hook (Proton, a
    profiler) is installed: the hooks get the kernel's launch metadata.  The arguments stay
    as packed (addresses for pointers): going back through ``kernel[grid](*args)`` would
    specialise those integers as ``i64`` and compile a kernel that cannot load."""
    runtime = _knobs.runtime
    metadata = compiled.launch_metadata((grid,), stream, *args)
    compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, metadata,
                 runtime.launch_enter_hook, runtime.launch_exit_hook, *args)


class Launcher:
    """One kernel launch prepared for a fixed specialisation.

    ``args`` maps every parameter name of the kernel (constexprs included) to its value;
    ``slots`` names the ones the caller may change between launches (scalars, the AMP and lr
    tensors).  The first call goes through Triton's JIT entry point (compiling if needed) and
    keeps the compiled kernel it returns; later calls pass the pre-packed list straight to
    the compiled kernel's launcher.  Under ``TRITON_INTERPRET`` (no compiled kernels) every
    call goes through the JIT entry point.
    """

    __slots__ = ("kernel", "grid", "names", "args", "index", "compiled", "device_index")

    def __init__(self, kernel, grid: int, args: dict, device: torch.device) -> None:
        self.kernel = kernel
        self.grid = grid
        self.names = tuple(kernel.arg_names)
        missing = set(self.names) ^ set(args)
        if missing:
            raise ValueError(f"launcher arguments do not match {kernel}: {sorted(missing)}")
        self.args = [args[n] for n in self.names]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.compiled = None
        self.device_index = device.index if device.type == "cuda" else None

    def set(self, name: str, value) -> None:
        self.args[self.index[name]] = value

    def bind(self, **tensors) -> None:
        """Pointer arguments: the tensors for Triton's JIT entry point, their addresses once
        the compiled kernel is launched directly (the caller keeps the tensors alive for as
        long as they are bound, or binds others)."""
        compiled = self.compiled is not None
        for name, t in tensors.items():
            self.args[self.index[name]] = t.data_ptr() if compiled else t

    def __call__(self) -> None:
        compiled = self.compiled
        if compiled is not None:
            stream = torch._C._cuda_getCurrentRawStream(self.device_index)
            if _hooks_idle():
                compiled.run(self.grid, 1, 1, stream, compiled.function,
                             compiled.packed_metadata, None, None, None, *self.args)
            else:  # never back through the JIT: the pointers are addresses by now
                _launch_hooked(compiled, self.grid, stream, self.args)
            return
        out = self.kernel[(self.grid,)](*self.args, num_warps=NUM_WARPS)
        if self.device_index is not None and hasattr(out, "packed_metadata") \
                and self.compiled is None:
            self.compiled = out
            # From now on the compiled launcher takes addresses: no tensor (a consumed
            # gradient) is held by the arguments between steps.
            for i, name in enumerate(self.names):
                value = self.args[i]
                if isinstance(value, torch.Tensor) and name not in PER_STEP_TENSORS:
                    self.args[i] = value.data_ptr()


def chunk_size(total: int, target_programs: int = 1024, block: int = BLOCK) -> int:
    """Elements per chunk (a multiple of ``block``, at most 64K): enough programs to fill
    an H200 (132 SMs) a few times over, few enough that the finalize stays short."""
    per = max(1, total // max(1, target_programs))
    size = block
    while size < per and size < 65536:
        size *= 2
    return size


def table_rows(offsets: list[tuple[int, int, int, int]], numels: list[int], firsts: list[int],
               counts: list[int], bits: list[int], chunks: list[int]) -> list[int]:
    """The int64 table (see the module docstring) as a flat list."""
    rows: list[int] = []
    for (po, do, go, bo), n, f, c, b in zip(offsets, numels, firsts, counts, bits):
        rows += (po, do, go, bo, n, f, c, b)
    return rows + chunks
