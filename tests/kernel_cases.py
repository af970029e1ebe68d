"""Shared cases for the compiled kernels (tests/test_cpp_backend.py, tests/test_cuda_build.py).

``run_case`` runs one backend and the pure-PyTorch reference on copies of the same group and
checks both against ``f64_step``, an independent float64 model written here.
"""

from __future__ import annotations

import math

import torch

from prograd_fast.backends import GroupStep, get_backend
from prograd_fast.functional import prograd_sgd

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
# Awkward sizes: 1, primes, vector width +- 1 (AVX-512 float: 16 lanes, 32 per unit; CUDA:
# 16-byte packs), block sizes +- 1, the C++ chunk (16384) +- 1, the CUDA chunk (32768) + 1.
AWKWARD = (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 65, 97, 255, 257, 1021, 4097, 16383,
           16384, 16385, 32769, 40961)


# ----------------------------------------------------------------- the float64 model
def f64_step(params, ds, gs, bufs, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, maximize=False, lam=1.0, granularity="global", inv_scale=1.0):
    """Independent float64 ProGrad + SGD: (new params, new buffers, dict of per-tensor sums)."""
    d64 = [d.detach().double().cpu().reshape(-1) * inv_scale for d in ds]
    g64 = [None if g is None else g.detach().double().cpu().reshape(-1) * inv_scale for g in gs]
    dots = [0.0 if g is None else float(d @ g) for d, g in zip(d64, g64)]
    nns = [0.0 if g is None else float(g @ g) for g in g64]
    dds = [float(d @ d) for d in d64]

    def coef_of(dot, nn):
        ok = math.isfinite(dot) and math.isfinite(nn) and dot < 0 and nn > 0
        return lam * dot / nn if ok else 0.0

    if granularity == "global":
        c = coef_of(sum(dots), sum(nns))
        coefs = [c] * len(ds)
    else:
        coefs = [coef_of(a, b) for a, b in zip(dots, nns)]
    new_p, new_b, scales = [], [], []
    for i, p in enumerate(params):
        u = d64[i].clone()
        terms = [u.abs().max().item() if u.numel() else 0.0]
        if g64[i] is not None and coefs[i] != 0.0:
            u = u - coefs[i] * g64[i]
            terms.append(abs(coefs[i]) * g64[i].abs().max().item())
        if maximize:
            u = -u
        p64 = p.detach().double().cpu().reshape(-1)
        if weight_decay:
            u = u + weight_decay * p64
        b = None
        if momentum:
            b = u.clone() if bufs[i] is None else momentum * bufs[i].double().cpu().reshape(-1) + (1 - dampening) * u
            u = u + momentum * b if nesterov else b
        new_p.append(p64 - lr * u)
        new_b.append(b)
        if p64.numel():
            terms.append(p64.abs().max().item())
            if bufs[i] is not None:
                terms.append(bufs[i].double().abs().max().item())
        scales.append(max(terms))
    # scale: the largest term entering tensor i's update (tolerances follow it, not the result)
    return new_p, new_b, dict(dot=dots, nn=nns, dd=dds, coef=coefs, scale=scales)


def assert_close(actual, expected64, dtype, scale=0.0, factor=4.0):
    """``actual`` (any dtype) vs a float64 vector: rtol from the dtype, atol from the scale of
    the values and of the terms that produced them (``scale``)."""
    a = actual.detach().double().cpu().reshape(-1)
    e = expected64.reshape(-1)
    if e.numel():
        scale = max(scale, e.abs().max().item())
    tol = factor * EPS[dtype]
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * max(scale, 1e-30), equal_nan=True)


# ----------------------------------------------------------------- problem builders
def make_group(sizes, dtype, device, *, conflict="mixed", none_general=(), seed=0,
               zero_general=False):
    """Params/domain/general gradients; tensor i conflicts when ``conflict`` says so."""
    gen = torch.Generator().manual_seed(seed)
    ps, ds, gs = [], [], []
    for i, n in enumerate(sizes):
        shape = n if isinstance(n, tuple) else (n,)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        sign = {"all": -1.0, "none": 1.0, "mixed": -1.0 if i % 2 == 0 else 1.0}[conflict]
        d = x + sign * 1.5 * g
        if zero_general:
            g = torch.zeros_like(g)
        ps.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device))
        ds.append(d.to(dtype).to(device))
        gs.append(None if i in none_general else g.to(dtype).to(device))
    return ps, ds, gs


def finite_max(t) -> float:
    t = t.detach().double()
    t = t[torch.isfinite(t)]
    return t.abs().max().item() if t.numel() else 0.0


def clone_list(ts):
    return [None if t is None else t.clone() for t in ts]


def run_case(backend, params, ds, gs, bufs, **hyper):
    """Run ``backend`` and the reference on copies; check both against the float64 model.

    Returns the backend's (params, buffers, stats) for extra checks."""
    be = get_backend(backend)
    p_ref, b_ref = clone_list(params), clone_list(bufs)
    p_new, b_new = clone_list(params), clone_list(bufs)
    ref_stats = prograd_sgd(p_ref, ds, gs, b_ref, **hyper)
    step = GroupStep(p_new, ds, gs, b_new, **hyper)
    assert be.unsupported(step) is None
    stats = be.step(step)
    b_new = step.momentum_buffers
    inv = 1.0
    if hyper.get("grad_scale") is not None:
        inv = 1.0 / float(hyper["grad_scale"])
    model_hyper = {k: v for k, v in hyper.items() if k not in ("grad_scale", "found_inf")}
    if isinstance(model_hyper["lr"], torch.Tensor):
        model_hyper["lr"] = float(model_hyper["lr"])
    exp_p, exp_b, sums = f64_step(params, ds, gs, bufs, inv_scale=inv, **model_hyper)
    skipped = bool(ref_stats.skipped)
    assert bool(stats.skipped) == skipped
    for i, p in enumerate(params):
        dtype = p.dtype
        assert p_new[i].dtype == dtype and p_new[i].shape == p.shape
        scale = sums["scale"][i]
        assert_close(p_new[i], p_ref[i].double().reshape(-1), dtype, scale)
        if not skipped:
            assert_close(p_new[i], exp_p[i], dtype, scale)
        else:
            assert torch.equal(p_new[i], params[i])
        if hyper.get("momentum", 0):
            assert b_new[i] is not None and b_new[i].dtype == dtype and b_new[i].shape == p.shape
            assert_close(b_new[i], b_ref[i].double().reshape(-1), dtype, scale)
            if not skipped:
                assert_close(b_new[i], exp_b[i], dtype, scale)
    # Statistics: same fields, shapes and dtypes as the reference, values within tolerance.
    for field in ("dot", "general_norm_sq", "domain_norm_sq", "cos", "coef", "conflict", "skipped"):
        a, r = getattr(stats, field), getattr(ref_stats, field)
        assert a.shape == r.shape and a.dtype == r.dtype, field
        assert a.device == r.device, field
        if a.dtype == torch.bool:
            assert torch.equal(a, r), field
        else:
            acc = torch.float64 if a.dtype == torch.float64 else torch.float32
            scale = finite_max(r)
            torch.testing.assert_close(a.double(), r.double(), rtol=50 * EPS[acc],
                                       atol=50 * EPS[acc] * max(scale, 1e-30), equal_nan=True)
    n = len(params)
    if hyper.get("granularity", "global") == "tensor":
        exp_dot = torch.tensor(sums["dot"], dtype=torch.float64)
    else:
        exp_dot = torch.tensor([sum(sums["dot"])], dtype=torch.float64)
    lo = min(EPS[p.dtype] for p in params)
    torch.testing.assert_close(stats.dot.double().cpu().reshape(-1), exp_dot, equal_nan=True,
                               rtol=1e-4 if lo < 1e-5 else 1e-10,
                               atol=1e-4 * n * max(1.0, finite_max(exp_dot)))
    return p_new, b_new, stats
