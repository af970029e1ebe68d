"""Bad input, tried like an attacker would (hypothesis): layouts, dtypes, special values,
wrong/missing/stale general gradients, sparse and complex.  Each case either gives the
float64 model's result or a clear error; see docs/hardening.md for the documented rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import prograd_fast as pf
from hardening_cases import backends_here
from helpers import RTOL, np_prograd_sgd
from prograd_fast.backends import BackendUnavailableError

BACKENDS = backends_here("cpu")
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "transposed", "sliced", "channels_last"]


def _make(shape, dtype, layout, gen):
    """A tensor of ``shape`` with the requested memory layout (same values either way)."""
    if layout == "transposed" and len(shape) >= 2:
        t = torch.randn(shape[::-1], generator=gen).to(dtype).t() if len(shape) == 2 else \
            torch.randn(shape, generator=gen).to(dtype).transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "sliced":
        big = torch.randn(tuple(s * 2 for s in shape) or (2,), generator=gen).to(dtype)
        t = big[tuple(slice(None, None, 2) for _ in shape)] if shape else big[0]
    elif layout == "channels_last" and len(shape) == 4:
        t = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    else:
        t = torch.randn(shape, generator=gen).to(dtype)
    assert t.shape == torch.Size(shape)
    return t


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    mixed = draw(st.booleans())
    base_dtype = draw(st.sampled_from(DTYPES))
    tensors = []
    for _ in range(n):
        shape = draw(shapes)
        dtype = draw(st.sampled_from(DTYPES)) if mixed else base_dtype
        p = _make(shape, dtype, draw(st.sampled_from(LAYOUTS)), gen)
        grad_kind = draw(st.sampled_from(["same", "other_layout", "expanded"]))
        if grad_kind == "expanded" and len(shape) >= 1 and shape[0] > 0:
            d = torch.randn((1,) + shape[1:], generator=gen).to(dtype).expand(shape)
        else:
            d = _make(shape, dtype, draw(st.sampled_from(LAYOUTS)) if grad_kind != "same" else "contiguous", gen)
        g_kind = draw(st.sampled_from(["conflict", "random", "none"]))
        g = None
        if g_kind != "none":
            g = _make(shape, dtype, draw(st.sampled_from(LAYOUTS)), gen)
            if g_kind == "conflict":
                g = (-0.8 * d.double() + 0.3 * g.double()).to(dtype)
        tensors.append((p, d, g))
    hyper = dict(lr=draw(st.sampled_from([0.01, 0.5])),
                 momentum=draw(st.sampled_from([0.0, 0.9])),
                 weight_decay=draw(st.sampled_from([0.0, 1e-2])),
                 maximize=draw(st.booleans()),
                 lam=draw(st.sampled_from([1.0, 0.3])),
                 granularity=draw(st.sampled_from(["global", "tensor"])))
    hyper["nesterov"] = hyper["momentum"] > 0 and draw(st.booleans())
    return tensors, hyper


def _run(backend, tensors, hyper, steps=2):
    params = [torch.nn.Parameter(_clone(p)) for p, _, _ in tensors]
    opt = pf.ProGradSGD(params, backend=backend, **hyper)
    for _ in range(steps):
        for p, (_, d, _) in zip(params, tensors):
            p.grad = d
        opt.store_general_grads([g for _, _, g in tensors])
        opt.step()
    return params, opt


def _clone(t):
    """A copy with the same strides, gaps included (sliced layouts stay sliced)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


def _expected(tensors, hyper, steps=2):
    ps = [p for p, _, _ in tensors]
    bufs = [None] * len(ps)
    for _ in range(steps):
        new_p, new_b = np_prograd_sgd(ps, [d for _, d, _ in tensors], [g for _, _, g in tensors],
                                      bufs, **hyper)
        ps = [torch.from_numpy(x) for x in new_p]
        bufs = [None if b is None else torch.from_numpy(b) for b in new_b]
    return ps


def _check(params, tensors, expected):
    for p, (p0, _, _), e in zip(params, tensors, expected):
        assert p.dtype == p0.dtype and p.shape == p0.shape and p.stride() == p0.stride()
        e = e.numpy()
        a = p.detach().double().numpy().reshape(-1)
        rtol = RTOL[p.dtype] * 4
        atol = rtol * max(1.0, float(np.abs(e).max(initial=0.0)))
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
@FUZZ
@given(problem=problems())
def test_layouts_dtypes_shapes(backend, problem):
    """'auto' always runs and is right; a named backend is right or refuses clearly."""
    tensors, hyper = problem
    if backend == "triton" and any(p.numel() > 64 for p, _, _ in tensors):
        event("skipped: large for the interpreter")
        return  # the interpreter is slow; small cases only
    try:
        params, _ = _run(backend, tensors, hyper)
    except BackendUnavailableError as exc:
        assert backend != "auto" and str(exc)
        event(f"refused: {str(exc).split(':')[-1].strip()[:40]}")
        return
    event("ran")
    _check(params, tensors, _expected(tensors, hyper))


# ------------------------------------------------------------------ special values
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e-40, 1e38, -1e38, 0.0]


def _fp32_reduction(a, b):
    """<a,b> as float32 hardware would see it: products rounded to fp32 (overflow -> inf,
    underflow -> 0/denormal), summed; None when fp32 summation order could matter."""
    with np.errstate(all="ignore"):
        prods = (a.astype(np.float64) * b.astype(np.float64)).astype(np.float32).astype(np.float64)
    if not np.all(np.isfinite(prods)):
        return float(prods.sum())
    total = float(np.abs(prods).sum())
    if total > 1e38:
        return None
    return float(prods.sum())


@st.composite
def special_problems(draw):
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shapes_ = [(draw(st.integers(1, 9)),) for _ in range(draw(st.integers(1, 3)))]
    ds = [torch.randn(s, generator=gen) for s in shapes_]
    gs = [-0.8 * d + 0.3 * torch.randn(s, generator=gen) for d, s in zip(ds, shapes_)]
    where = draw(st.sampled_from(["domain", "general", "both"]))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(ds) - 1))
        j = draw(st.integers(0, shapes_[i][0] - 1))
        value = draw(st.sampled_from(SPECIAL))
        if where in ("domain", "both"):
            ds[i][j] = value
        if where in ("general", "both"):
            gs[i][j] = draw(st.sampled_from(SPECIAL))
    if draw(st.booleans()):  # a whole gradient of tiny or zero values
        k = draw(st.integers(0, len(ds) - 1))
        gs[k] = gs[k].sign() * draw(st.sampled_from([0.0, 1e-40, 1e-30]))
    ps = [torch.randn(s, generator=gen) for s in shapes_]
    return ps, ds, gs, draw(st.sampled_from(["global", "tensor"]))


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(problem=special_problems())
def test_special_values_follow_the_documented_rules(backend, problem):
    """No AMP: a non-finite or fp32-overflowing dot/||g||^2 means no projection (plain SGD on
    G_d); a non-finite G_d propagates to its parameter as in torch.optim.SGD, never hidden."""
    ps, ds, gs, granularity = problem
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, lam=1.0)
    params = [torch.nn.Parameter(p.clone()) for p in ps]
    for p, d in zip(params, ds):
        p.grad = d
    opt = pf.ProGradSGD(params, backend=backend, granularity=granularity, **hyper)
    opt.store_general_grads(gs)
    opt.step()
    # expected: float64 math on fp32-faithful reductions
    d64 = [d.double().numpy() for d in ds]
    g64 = [g.double().numpy() for g in gs]
    dots = [_fp32_reduction(d, g) for d, g in zip(d64, g64)]
    nns = [_fp32_reduction(g, g) for g in g64]
    assume(all(v is not None for v in dots + nns))
    if granularity == "global":
        pairs = [(sum(dots), sum(nns))] * len(ps)
        assume(abs(sum(dots)) < 3e38 or not np.isfinite(sum(dots)))
        assume(abs(sum(nns)) < 3e38 or not np.isfinite(sum(nns)))
    else:
        pairs = list(zip(dots, nns))
    for p, p0, d, g, (dot, nn) in zip(params, ps, d64, g64, pairs):
        project = np.isfinite(dot) and np.isfinite(nn) and dot < 0 and nn > 0
        with np.errstate(all="ignore"):
            # coef lives in fp32: |dot/nn| beyond the fp32 range is +-inf (documented)
            coef = float(np.float32(dot / nn)) if project else 0.0
            step_ = coef * g if project else np.zeros_like(d)
            u = d - step_ + 1e-2 * p0.double().numpy()
            exp = (p0.double().numpy() - 0.1 * u).astype(np.float32)
        got = p.detach().numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(exp))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(exp))
        finite = np.isfinite(exp)
        # fp32 rounding of terms as large as |d|, |coef*g| (they may cancel)
        terms = np.abs(np.stack([d, step_, p0.double().numpy()]))
        scale = float(np.max(np.where(np.isfinite(terms), terms, 0), initial=1.0))
        np.testing.assert_allclose(got[finite], exp[finite], rtol=1e-4, atol=1e-6 * scale)
    stats = opt.stats()[0]
    assert stats["coef"].dtype == torch.float32 and not torch.isnan(stats["coef"]).any()


# ------------------------------------------------------------------ general gradients
@pytest.mark.parametrize("bad,exc,match", [
    (lambda p: torch.zeros(p.numel() + 1), RuntimeError, "shape"),
    (lambda p: torch.zeros_like(p).reshape(-1), RuntimeError, "shape"),
    (lambda p: torch.zeros_like(p, dtype=torch.float64), RuntimeError, "dtype"),
    (lambda p: torch.zeros_like(p, dtype=torch.float16), RuntimeError, "dtype"),
    (lambda p: torch.zeros_like(p, device="meta"), RuntimeError, "meta"),
    (lambda p: torch.zeros_like(p).to_sparse(), RuntimeError, "sparse"),
    (lambda p: torch.zeros_like(p, dtype=torch.complex64), RuntimeError, "complex"),
    (lambda p: p.detach().numpy(), TypeError, "tensors"),
])
def test_wrong_general_gradients_are_refused_when_stored(bad, exc, match):
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = pf.ProGradSGD([p], lr=0.1)
    with pytest.raises(exc, match=match):
        opt.store_general_grads([bad(p)])
    assert not opt.has_general_grads()


def test_wrong_number_of_general_gradients():
    opt = pf.ProGradSGD([torch.nn.Parameter(torch.randn(2))], lr=0.1)
    for grads in ([], [None, None]):
        with pytest.raises(ValueError, match="gradients for 1 parameters"):
            opt.store_general_grads(grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_and_stale_general_gradients(backend):
    """Missing: that parameter gets plain SGD.  Stale: general gradients are consumed by
    the step that uses them, and zero_grad() drops pending ones, so none is reused."""
    gen = torch.Generator().manual_seed(3)
    p0 = [torch.randn(5, generator=gen), torch.randn(4, generator=gen)]
    d = [torch.randn(5, generator=gen), torch.randn(4, generator=gen)]
    g = [-d[0] + 0.1 * torch.randn(5, generator=gen), None]
    params = [torch.nn.Parameter(x.clone()) for x in p0]
    opt = pf.ProGradSGD(params, lr=0.1, granularity="tensor", backend=backend)
    opt.store_general_grads(g)
    for p, x in zip(params, d):
        p.grad = x
    opt.step()
    exp, _ = np_prograd_sgd(p0, d, g, [None, None], lr=0.1, granularity="tensor")
    for p, e in zip(params, exp):
        np.testing.assert_allclose(p.detach().double().numpy(), e, rtol=1e-6)
    before = [p.detach().clone() for p in params]
    with pytest.warns(UserWarning, match="without general gradients"):
        opt.step()  # the same grads again, no new general grads: plain SGD, not a reuse
    exp2, _ = np_prograd_sgd(before, d, [None, None], [None, None], lr=0.1)
    for p, e in zip(params, exp2):
        np.testing.assert_allclose(p.detach().double().numpy(), e, rtol=1e-6)
    opt.store_general_grads(g)
    opt.zero_grad()
    assert not opt.has_general_grads()


# ------------------------------------------------------------------ sparse, complex, weird params
@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_sparse_domain_gradient_is_refused(backend):
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    opt = pf.ProGradSGD([p], lr=0.1, backend=backend)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_sparse_embedding_gradient_is_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = pf.ProGradSGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_complex_parameters_are_refused(backend):
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        pf.ProGradSGD([p], lr=0.1, backend=backend).step()


def test_expanded_parameter_is_refused_not_corrupted():
    """A parameter whose elements alias each other cannot be updated in place."""
    base = torch.randn(1, 4)
    p = torch.nn.Parameter(base.expand(3, 4))
    p.grad = torch.randn(3, 4)
    with pytest.raises(RuntimeError):
        pf.ProGradSGD([p], lr=0.1, backend="torch").step()
    assert torch.equal(p.detach()[0], base[0])
