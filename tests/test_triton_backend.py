"""The Triton backend (kernels under TRITON_INTERPRET=1 on the CPU) against the reference
``prograd_sgd`` and an independent float64 computation written here."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import prograd_fast as pf
from prograd_fast.backends import BackendUnavailableError, GroupStep, run_step
from prograd_fast.backends import triton_backend as tb
from prograd_fast.functional import prograd_sgd

BACKEND = tb.BACKEND
if BACKEND.available() is not None:
    pytest.skip(f"triton backend unavailable: {BACKEND.available()}", allow_module_level=True)
K = BACKEND._k
DEVICE = "cuda" if not K.INTERPRET else "cpu"

# awkward sizes: 1, primes, BLOCK +- 1, CoOp, many small tensors (> one finalize tile of
# tensors), mixed shapes, groups above the single-program limit, > one tile of chunks.
SHAPES = {
    "one": [(1,)],
    "prime": [(8191,)],
    "block_pm1": [(K.BLOCK - 1,), (K.BLOCK + 1,), (1,)],
    "coop": [(16, 512)],
    "mixed": [(1,), (7, 13), (3, 1, 5), (257,), (2, 64)],
    "many_small": [(3,)] * 40,
    "big_one": [(K.SMALL_MAX + 1,)],
    "big_mixed": [(K.BLOCK - 1,), (7, 3), (K.SMALL_MAX - K.BLOCK + 5,)],
    "aligned": [(16,), (64, 16), (32,)],  # 16-element multiples: the ALIGN hint path
    "with_empty": [(0,), (5,), (2, 0), (17,)],
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HYPERS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9, weight_decay=5e-4),
    dict(lr=0.02, momentum=0.9, nesterov=True),
    dict(lr=0.03, momentum=0.5, dampening=0.3, maximize=True, weight_decay=1e-2),
    dict(lr=0.01, weight_decay=0.1, maximize=True),
    dict(lr=0.04, momentum=0.8, dampening=0.1),
]


# ----------------------------------------------------------------------------- helpers
def make_group(shapes, dtype, relation="conflict", seed=0, none_general=()):
    gen = torch.Generator().manual_seed(seed)
    ps, ds, gs = [], [], []
    for i, s in enumerate(shapes):
        p = torch.randn(s, generator=gen, dtype=torch.float64)
        d = torch.randn(s, generator=gen, dtype=torch.float64)
        if relation == "conflict":
            g = -d * (0.5 + torch.rand(s, generator=gen, dtype=torch.float64))
        elif relation == "aligned":
            g = d * (0.5 + torch.rand(s, generator=gen, dtype=torch.float64))
        elif relation == "zero":
            g = torch.zeros(s, dtype=torch.float64)
        else:
            g = torch.randn(s, generator=gen, dtype=torch.float64)
        ps.append(p.to(dtype).to(DEVICE))
        ds.append(d.to(dtype).to(DEVICE))
        gs.append(None if i in none_general else g.to(dtype).to(DEVICE))
    return ps, ds, gs


def a64(t):
    return t.detach().cpu().double().numpy().reshape(-1)


def f64_step(ps, ds, gs, bufs, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, maximize=False, lam=1.0, granularity="global", inv_scale=1.0):
    """Independent float64 ProGrad + SGD; returns (params, bufs, dots, nns, dds, coefs)."""
    ds = [a64(d) * inv_scale for d in ds]
    gs = [None if g is None else a64(g) * inv_scale for g in gs]
    dots = [0.0 if g is None else float(d @ g) for d, g in zip(ds, gs)]
    nns = [0.0 if g is None else float(g @ g) for g in gs]
    dds = [float(d @ d) for d in ds]
    if granularity == "global":
        dots, nns, dds = [math.fsum(dots)], [math.fsum(nns)], [math.fsum(dds)]

    def coef(dot, nn):
        ok = dot < 0 and nn > 0 and math.isfinite(dot) and math.isfinite(nn)
        return lam * dot / nn if ok else 0.0

    coefs = [coef(a, b) for a, b in zip(dots, nns)]
    new_p, new_b = [], []
    for i, (p, d, g) in enumerate(zip(ps, ds, gs)):
        c = coefs[0] if granularity == "global" else coefs[i]
        u = d if (g is None or c == 0.0) else d - c * g
        u = -u if maximize else u
        p = a64(p)
        if weight_decay:
            u = u + weight_decay * p
        b = None
        if momentum:
            b = u.copy() if bufs[i] is None else momentum * a64(bufs[i]) + (1 - dampening) * u
            u = u + momentum * b if nesterov else b
        new_p.append(p - lr * u)
        new_b.append(b)
    return new_p, new_b, dots, nns, dds, coefs


def close(actual, expected, dtype, scale=None, what=""):
    """rtol by dtype; atol relative to the largest expected magnitude (or ``scale``)."""
    a = a64(actual) if torch.is_tensor(actual) else np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64).reshape(-1)
    rtol = RTOL[dtype]
    ref = float(np.abs(e).max(initial=0.0)) if scale is None else scale
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * max(ref, 1e-30), err_msg=what)


def clone(ts):
    return [None if t is None else t.clone() for t in ts]


def run_both(ps, ds, gs, bufs_t, bufs_r, extra, **hyper):
    """One step through the triton backend and the reference on cloned params."""
    pr = clone(ps)
    st = BACKEND.step(GroupStep(ps, ds, gs, bufs_t, extra=extra, **hyper))
    sr = prograd_sgd(pr, ds, gs, bufs_r, **hyper)
    return st, sr, pr


@pytest.fixture(params=["auto", "two_launch"])
def path(request, monkeypatch):
    """"auto": one launch up to SMALL_MAX; "two_launch": force reduce + update everywhere."""
    if request.param == "two_launch":
        monkeypatch.setattr(K, "SMALL_MAX", 0)
    return request.param


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """First-step momentum buffers start as NaN: every element must be written."""
    monkeypatch.setattr(tb, "_new_buffer", lambda p: torch.full_like(p, float("nan")))


def poison_extra(extra):
    bufs = extra.get("triton_bufs")
    if bufs:
        bufs["stats_f"].fill_(float("nan"))
        bufs["partials"].fill_(float("nan"))
        bufs["stats_b"].fill_(7)


# ----------------------------------------------------------------------------- tests
CASES = [(s, dt, gr) for s in SHAPES for dt in DTYPES for gr in ("global", "tensor")]


@pytest.mark.parametrize("shape_name,dtype,granularity", CASES,
                         ids=[f"{s}-{str(d)[6:]}-{g}" for s, d, g in CASES])
def test_step_matches_reference_and_float64(shape_name, dtype, granularity, path,
                                            poisoned_buffers):
    index = CASES.index((shape_name, dtype, granularity))
    hyper = dict(HYPERS[index % len(HYPERS)])
    lam = [0.0, 0.5, 1.0][index % 3]
    relation = ["conflict", "aligned", "random"][(index // 3) % 3]
    shapes = SHAPES[shape_name]
    hyper.update(lam=lam, granularity=granularity)
    ps, ds, gs = make_group(shapes, dtype, relation, seed=index)
    bufs_t, bufs_r = [None] * len(ps), [None] * len(ps)
    extra = {}
    for it in range(2):
        p_before, b_before = clone(ps), clone(bufs_t)
        poison_extra(extra)
        st, sr, pr = run_both(ps, ds, gs, bufs_t, bufs_r, extra, **hyper)
        want_p, want_b, dots, nns, dds, coefs = f64_step(p_before, ds, gs, b_before, **hyper)
        n_acc = sum(math.prod(s) for s in shapes)
        for i in range(len(ps)):
            assert ps[i].dtype == dtype and ps[i].shape == shapes[i]
            close(ps[i], want_p[i], dtype, what=f"param {i} vs float64 (step {it})")
            close(ps[i], a64(pr[i]), dtype, what=f"param {i} vs reference (step {it})")
            if hyper.get("momentum"):
                assert bufs_t[i].dtype == dtype
                close(bufs_t[i], want_b[i], dtype, what=f"buffer {i} (step {it})")
                close(bufs_t[i], a64(bufs_r[i]), dtype, what=f"buffer {i} vs ref (step {it})")
            else:
                assert bufs_t[i] is None
        # statistics: reductions to fp32 accuracy, scaled by the magnitude of the sums
        sabs = sum(float(np.abs(a64(d) * a64(g)).sum()) for d, g in zip(ds, gs))
        ssq = sum(float((a64(d) ** 2).sum()) for d in ds)
        tol = 1e-6 * max(1.0, math.log2(n_acc)) * max(sabs, ssq)
        for name, want in (("dot", dots), ("general_norm_sq", nns), ("domain_norm_sq", dds)):
            got = getattr(st, name)
            assert got.dtype == torch.float32
            assert got.shape == getattr(sr, name).shape
            np.testing.assert_allclose(a64(got), want, rtol=0, atol=tol, err_msg=name)
        np.testing.assert_array_equal(a64(st.conflict), a64(sr.conflict))
        assert st.conflict.dtype == torch.bool and st.conflict.shape == sr.conflict.shape
        assert not bool(st.skipped) and st.skipped.shape == ()
        for name in ("coef", "cos"):
            np.testing.assert_allclose(a64(getattr(st, name)), a64(getattr(sr, name)),
                                       rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(a64(st.coef), coefs, rtol=1e-4, atol=1e-6 * lam)
        if relation == "conflict":  # every non-empty tensor conflicts (any lam)
            want = [True] if granularity == "global" else [math.prod(s) > 0 for s in shapes]
            np.testing.assert_array_equal(a64(st.conflict).astype(bool), want)
        if relation == "aligned":
            assert not bool(st.conflict.any()) and not bool(st.coef.any())


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Shrink every tile so small groups walk all loops: many chunks per tensor (> CBLOCK),
    tensors per finalize tile (> TBLOCK), partial blocks (> BLOCK_F), vector steps."""
    for name, value in (("BLOCK", 16), ("BLOCK_F", 4), ("TBLOCK", 4), ("CBLOCK", 2)):
        monkeypatch.setattr(K, name, value)


@pytest.mark.parametrize("shape_name", ["mixed", "many_small", "aligned", "with_empty"])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiny_tiles(shape_name, granularity, dtype, path, tiny_tiles, poisoned_buffers):
    shapes = SHAPES[shape_name]
    ps, ds, gs = make_group(shapes, dtype, "random", seed=21, none_general=(1,))
    n = len(ps)
    bufs_t, bufs_r = [None] * n, [None] * n
    extra = {}
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, lam=0.5, granularity=granularity)
    for _ in range(2):
        p0, b0 = clone(ps), clone(bufs_t)
        poison_extra(extra)
        st, sr, pr = run_both(ps, ds, gs, bufs_t, bufs_r, extra, **hyper)
        want_p, want_b, dots, *_ = f64_step(p0, ds, gs, b0, **hyper)
        for i in range(n):
            close(ps[i], want_p[i], dtype)
            close(ps[i], a64(pr[i]), dtype)
            close(bufs_t[i], want_b[i], dtype)
        for name in ("dot", "general_norm_sq", "domain_norm_sq", "coef", "cos"):
            np.testing.assert_allclose(a64(getattr(st, name)), a64(getattr(sr, name)),
                                       rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(a64(st.conflict), a64(sr.conflict))


@pytest.mark.parametrize("hyper", HYPERS, ids=[str(i) for i in range(len(HYPERS))])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_hyperparameter_variants(hyper, granularity, path):
    shapes = SHAPES["mixed"]
    ps, ds, gs = make_group(shapes, torch.float32, "random", seed=7)
    bufs_t, bufs_r = [None] * len(ps), [None] * len(ps)
    extra = {}
    for _ in range(3):
        st, sr, pr = run_both(ps, ds, gs, bufs_t, bufs_r, extra, lam=1.0,
                              granularity=granularity, **hyper)
        for a, b in zip(ps, pr):
            close(a, a64(b), torch.float32)
        for a, b in zip(bufs_t, bufs_r):
            assert (a is None) == (b is None)
            if a is not None:
                close(a, a64(b), torch.float32)


@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_none_and_zero_general_gradients(granularity, path):
    shapes = SHAPES["mixed"]
    for none_general, relation in (((0, 3), "conflict"), (tuple(range(5)), "conflict"),
                                   ((), "zero"), ((1,), "zero")):
        ps, ds, gs = make_group(shapes, torch.float32, relation, seed=3, none_general=none_general)
        bufs_t, bufs_r = [None] * 5, [None] * 5
        st, sr, pr = run_both(ps, ds, gs, bufs_t, bufs_r, {}, lr=0.1, momentum=0.9,
                              granularity=granularity)
        for a, b in zip(ps, pr):
            close(a, a64(b), torch.float32)
        for name in ("dot", "general_norm_sq", "domain_norm_sq", "cos", "coef"):
            got = a64(getattr(st, name))
            assert np.isfinite(got).all(), name
            np.testing.assert_allclose(got, a64(getattr(sr, name)), rtol=1e-5, atol=1e-6)
        if relation == "zero" or len(none_general) == 5:
            assert not bool(st.conflict.any()) and not bool(st.coef.any())
            assert not bool(st.cos.any())
        if granularity == "tensor":
            for i in none_general:  # no general gradient: plain SGD, nothing reduced
                assert float(st.general_norm_sq[i]) == 0 and not bool(st.conflict[i])


# inf/inf in the cosine, as in torch
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_nonfinite_general_gradient_without_amp_is_a_select(granularity, path):
    """An inf in g makes nn non-finite: coef = 0 and u = d exactly (no 0*inf NaN)."""
    ps, ds, gs = make_group(SHAPES["mixed"], torch.float32, "conflict", seed=5)
    gs[2][0, 0, 1] = float("inf")
    st, sr, pr = run_both(ps, ds, gs, [None] * 5, [None] * 5, {}, lr=0.1,
                          granularity=granularity)
    for a, b in zip(ps, pr):
        assert torch.isfinite(a).all()
        close(a, a64(b), torch.float32)
    np.testing.assert_array_equal(a64(st.conflict), a64(sr.conflict))
    assert not bool(st.skipped)


# inf/inf in the cosine, as in torch
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_amp_unscale_and_skip(granularity, dtype, path, poisoned_buffers):
    shapes = SHAPES["block_pm1"]
    scale = torch.tensor(1024.0, device=DEVICE)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, granularity=granularity, lam=1.0)
    # 1) scaled gradients, no inf: equals the unscaled float64 step
    ps, ds, gs = make_group(shapes, dtype, "conflict", seed=11)
    ds_s = [(d.float() * 1024).to(dtype) for d in ds]
    gs_s = [(g.float() * 1024).to(dtype) for g in gs]
    zero = torch.zeros(1, device=DEVICE)
    p0 = clone(ps)
    bufs_t, bufs_r = [None] * 3, [None] * 3
    st, sr, pr = run_both(ps, ds_s, gs_s, bufs_t, bufs_r, {}, grad_scale=scale, found_inf=zero,
                          **hyper)
    want_p, want_b, *_ = f64_step(p0, ds_s, gs_s, [None] * 3, inv_scale=1 / 1024, **hyper)
    assert not bool(st.skipped)
    for i in range(3):
        close(ps[i], want_p[i], dtype)
        close(ps[i], a64(pr[i]), dtype)
        close(bufs_t[i], want_b[i], dtype)
    np.testing.assert_allclose(a64(st.dot), a64(sr.dot), rtol=1e-5)
    # 2) found_inf=1, or an inf in either gradient: nothing moves; new buffers are zeros
    for case in ("found_inf", "inf_in_d", "nan_in_g"):
        ps, ds, gs = make_group(shapes, dtype, "conflict", seed=12)
        found = torch.ones(1, device=DEVICE) if case == "found_inf" else zero
        if case == "inf_in_d":
            ds[1][5] = float("inf")
        if case == "nan_in_g":
            gs[0][3] = float("nan")
        p0 = clone(ps)
        bufs_t, bufs_r = [None] * 3, [None] * 3
        st, sr, pr = run_both(ps, ds, gs, bufs_t, bufs_r, {}, grad_scale=scale,
                              found_inf=found, **hyper)
        assert bool(st.skipped) and bool(sr.skipped)
        for i in range(3):
            assert torch.equal(ps[i], p0[i]), case
            assert torch.equal(bufs_t[i], torch.zeros_like(ps[i])), case
        # an existing buffer is left alone on a skipped step
        old = [torch.randn_like(p) for p in ps]
        bufs_t = clone(old)
        BACKEND.step(GroupStep(ps, ds, gs, bufs_t, extra={}, grad_scale=scale, found_inf=found,
                               **hyper))
        for i in range(3):
            assert torch.equal(bufs_t[i], old[i]) and torch.equal(ps[i], p0[i]), case


def test_tensor_lr_equals_float_lr(path):
    shapes = SHAPES["mixed"]
    ps, ds, gs = make_group(shapes, torch.float32, "random", seed=2)
    p2 = clone(ps)
    b1, b2 = [None] * 5, [None] * 5
    e1, e2 = {}, {}
    lr_t = torch.tensor(0.05, device=DEVICE)
    for step in range(3):
        lr_t.fill_(0.05 / (step + 1))  # a scheduler writing the tensor in place
        BACKEND.step(GroupStep(ps, ds, gs, b1, lr=lr_t, momentum=0.9, extra=e1))
        BACKEND.step(GroupStep(p2, ds, gs, b2, lr=0.05 / (step + 1), momentum=0.9, extra=e2))
        for a, b in zip(ps, p2):
            close(a, a64(b), torch.float32)


def test_deterministic_and_no_realloc_after_first_step(path):
    shapes = SHAPES["big_mixed"]
    ps, ds, gs = make_group(shapes, torch.float32, "random", seed=4)
    p2 = clone(ps)
    b1, b2 = [None] * 3, [None] * 3
    e1, e2 = {}, {}
    kw = dict(lr=0.1, momentum=0.9, granularity="tensor")
    storage = plan = None
    for step in range(4):
        s1 = BACKEND.step(GroupStep(ps, ds, gs, b1, extra=e1, **kw))
        s2 = BACKEND.step(GroupStep(p2, ds, gs, b2, extra=e2, **kw))
        for a, b in zip(ps + b1, p2 + b2):
            assert torch.equal(a, b)  # bitwise: fixed-order reductions
        assert torch.equal(s1.dot, s2.dot) and torch.equal(s1.coef, s2.coef)
        ptrs = (s1.dot.data_ptr(), e1["triton_bufs"]["partials"].data_ptr())
        if step >= 2:  # step 0 made the momentum buffers; from step 1 on nothing is new
            assert ptrs == storage and e1["triton_plan"] is plan
        storage, plan = ptrs, e1["triton_plan"]


def test_cache_follows_new_tensors(path):
    """Same extra dict, new tensors (addresses, sizes, count): results still right."""
    extra = {}
    for seed, name in enumerate(["mixed", "many_small", "big_mixed", "coop", "mixed", "rev"]):
        ps, ds, gs = make_group(SHAPES["mixed" if name == "rev" else name], torch.float32,
                                "conflict", seed=seed)
        if name == "rev":  # params[0] allocated last: negative offsets in the table
            ps, ds, gs = ps[::-1], ds[::-1], gs[::-1]
        n = len(ps)
        st, sr, pr = run_both(ps, ds, gs, [None] * n, [None] * n, extra, lr=0.1,
                              momentum=0.9, granularity="tensor")
        for a, b in zip(ps, pr):
            close(a, a64(b), torch.float32)
        np.testing.assert_allclose(a64(st.coef), a64(sr.coef), rtol=1e-5)


def test_unsupported_reasons():
    ps, ds, gs = make_group(SHAPES["mixed"], torch.float32, "random")
    assert BACKEND.unsupported(GroupStep(ps, ds, gs, [None] * 5, lr=0.1)) is None
    p64 = [p.double() for p in ps]
    reason = BACKEND.unsupported(GroupStep(p64, [d.double() for d in ds], [None] * 5,
                                           [None] * 5, lr=0.1))
    assert reason and "float64" in reason
    mixed = [ps[0].half()] + ps[1:]
    assert "mixed dtypes" in BACKEND.unsupported(
        GroupStep(mixed, [ds[0].half()] + ds[1:], [None] * 5, [None] * 5, lr=0.1))
    nc = [d.clone() for d in ds]
    nc[1] = ds[1].t().contiguous().t()
    assert "non-contiguous" in BACKEND.unsupported(GroupStep(ps, nc, gs, [None] * 5, lr=0.1))
    with pytest.raises(BackendUnavailableError, match="float64"):
        run_step("triton", GroupStep(p64, [d.double() for d in ds], [None] * 5,
                                     [None] * 5, lr=0.1))
    # AMP tensors and a tensor lr are checked every step, not only when addresses change
    extra = {}
    assert BACKEND.unsupported(GroupStep(ps, ds, gs, [None] * 5, lr=0.1, extra=extra)) is None
    two = torch.ones(2, device=DEVICE)
    assert "grad_scale" in BACKEND.unsupported(
        GroupStep(ps, ds, gs, [None] * 5, lr=0.1, grad_scale=two, extra=extra))
    assert "lr" in BACKEND.unsupported(GroupStep(ps, ds, gs, [None] * 5, lr=two, extra=extra))
    with pytest.raises(ValueError, match="lam"):
        BACKEND.step(GroupStep(ps, ds, gs, [None] * 5, lr=0.1, lam=1.5, extra=extra))
    with pytest.raises(ValueError, match="granularity"):
        BACKEND.step(GroupStep(ps, ds, gs, [None] * 5, lr=0.1, granularity="layer", extra=extra))
    # a cached "valid" verdict does not survive a layout change at new addresses
    extra = {}
    assert BACKEND.unsupported(GroupStep(ps, ds, gs, [None] * 5, lr=0.1, extra=extra)) is None
    assert "non-contiguous" in BACKEND.unsupported(
        GroupStep(ps, nc, gs, [None] * 5, lr=0.1, extra=extra))


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3)).to(DEVICE)


@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_optimizer_triton_equals_torch(granularity):
    models = [tiny_model(), tiny_model()]
    opts = [pf.ProGradSGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4, lam=1.0,
                          granularity=granularity, backend=b)
            for m, b in zip(models, ("triton", "torch"))]
    for s in range(4):
        gen = torch.Generator().manual_seed(s)
        x = torch.randn(16, 6, generator=gen).to(DEVICE)
        y = torch.randint(0, 3, (16,), generator=gen).to(DEVICE)
        zs = (3 * torch.randn(16, 3, generator=gen)).to(DEVICE)
        for m, o in zip(models, opts):
            o.zero_grad()
            ce, kl = pf.prograd_losses(m(x), zs, y)
            pf.backward(o, ce, kl)
            o.step()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            close(a, a64(b), torch.float32, what=f"step {s}")
        s_t, s_r = opts[0].stats()[0], opts[1].stats()[0]
        for key in s_r:
            assert s_t[key].shape == s_r[key].shape and s_t[key].dtype == s_r[key].dtype, key
            np.testing.assert_allclose(a64(s_t[key]), a64(s_r[key]), rtol=1e-5, atol=1e-7)
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        close(opts[0].state[pa]["momentum_buffer"], a64(opts[1].state[pb]["momentum_buffer"]),
              torch.float32)


def test_optimizer_with_grad_scaler_equals_torch():
    """torch.amp.GradScaler hands grad_scale/found_inf to step(); an inf skips the step."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(6, 3).to(DEVICE) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [pf.ProGradSGD(m.parameters(), lr=0.1, momentum=0.9, backend=b)
            for m, b in zip(models, ("triton", "torch"))]
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=1024.0) for _ in range(2)]
    for s in range(4):
        gen = torch.Generator().manual_seed(s)
        x = torch.randn(8, 6, generator=gen)
        if s == 2:
            x[0, 0] = float("inf")
        y = torch.randint(0, 3, (8,), generator=gen)
        zs = torch.randn(8, 3, generator=gen)
        x, y, zs = x.to(DEVICE), y.to(DEVICE), zs.to(DEVICE)
        for m, o, sc in zip(models, opts, scalers):
            o.zero_grad()
            ce, kl = pf.prograd_losses(m(x), zs, y)
            pf.backward(o, sc.scale(ce), sc.scale(kl))
            sc.step(o)
            sc.update()
        skipped = [bool(o.stats()[0]["skipped"]) for o in opts]
        assert skipped == [s == 2, s == 2]
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            close(a, a64(b), torch.float32, what=f"step {s}")


_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from prograd_fast.kernels import prograd_sgd as k
    PTR = dict(meta="*i64", p_ref="*fp32", d_ref="*fp32", g_ref="*fp32", b_ref="*fp32",
               partials="*fp32", counter="*i64", stats_f="*fp32", stats_b="*u8",
               grad_scale="*fp32", found_inf="*fp32", lr_ptr="*fp32")
    FLOAT = ("lam", "lr", "momentum", "one_minus_dampening", "weight_decay")
    CONST = dict(ROW=k.ROW, VEC=4, BLOCK=k.BLOCK, BLOCK_F=k.BLOCK_F, TBLOCK=k.TBLOCK,
                 CBLOCK=k.CBLOCK)
    def build(fn, flags, none=()):
        consts = {n: v for n, v in {**flags, **CONST}.items() if n in fn.arg_names}
        consts.update({n: None for n in none if n in fn.arg_names})
        sig = {n: "constexpr" if n in consts else PTR.get(n) or ("fp32" if n in FLOAT else "i32")
               for n in fn.arg_names}
        # numel0 deliberately NOT divisible by 16: the unmasked full blocks must still be
        # 128-bit, whatever the tensor's size (the masked tail takes the rest)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (sig[n].startswith("*") or n == "CHUNK")}
        src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                        constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=k.NUM_WARPS))
        assert out.asm["cubin"], fn
        ptx = out.asm["ptx"]
        return ptx.count("ld.global.v4."), ptx.count("st.global.v4.")
    full = dict(GLOBAL=False, TABLE=True, AMP=True, AMP_SCALE=True, HAS_FOUND_INF=True,
                LR_PTR=True, MOMENTUM=True, NESTEROV=True, MAXIMIZE=True, WEIGHT_DECAY=True)
    plain = dict(full, GLOBAL=True, TABLE=False, AMP=False, AMP_SCALE=False,
                 HAS_FOUND_INF=False, LR_PTR=False, NESTEROV=False)
    # 8 fp32 elements per thread and BLOCK: 2 x 128-bit per tensor stream (the finalize's
    # loads are .cg scalars and do not count): reduce reads d, g; update reads d, g, p, buf
    # and writes p, buf
    want = {k._fused_kernel: (12, 4), k._reduce_kernel: (4, 0), k._update_kernel: (8, 4)}
    for fn, (loads, stores) in want.items():
        none = ("meta", "grad_scale", "found_inf", "lr_ptr")
        for got in (build(fn, full), build(fn, plain, none=none)):
            assert got[0] >= loads and got[1] >= stores, (fn, got)
    print("ok")
""")


def test_kernels_compile_for_sm90():
    """No GPU here: compile every kernel for an H100/H200 (sm_90) to PTX and a cubin, with
    and without the table, and check that the loads/stores are 128-bit vectorised (table: in
    the per-tensor aligned branch; without: for a size that is not a multiple of 16)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr:
        pytest.skip("no ptxas for the sm_90 compile check")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
