"""The pure-PyTorch reference against an independent float64 computation and torch.optim.SGD."""

import math

import numpy as np
import pytest
import torch

from prograd_fast import functional as F
from tests.helpers import RTOL, assert_close_np, f64, np_project, np_prograd_sgd

SHAPES = {
    "one": [(1,)],
    "prime": [(8191,)],
    "coop": [(16, 512)],
    "mixed": [(1,), (7, 13), (3, 1, 5), (257,), (2, 64)],
    "many_small": [(3,)] * 40,
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_grads(shapes, dtype, relation, gen):
    """Domain/general gradients with a controlled sign of <d, g>."""
    ds = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    if relation == "conflict":
        # element-wise opposite but not parallel: <d, g> < 0 for every tensor
        gs = [-d * (0.5 + torch.rand(d.shape, generator=gen, dtype=torch.float64)) for d in ds]
    elif relation == "aligned":
        gs = [d * (0.5 + torch.rand(d.shape, generator=gen, dtype=torch.float64)) for d in ds]
    else:
        gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return [d.to(dtype) for d in ds], [g.to(dtype) for g in gs]


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", F.GRANULARITIES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("relation", ["conflict", "aligned", "random"])
def test_project_matches_float64(shapes, dtype, granularity, lam, relation):
    gen = torch.Generator().manual_seed(hash((len(shapes), str(dtype), granularity, lam, relation)) % 2**31)
    ds, gs = make_grads(shapes, dtype, relation, gen)
    us, stats = F.project(ds, gs, lam, granularity)
    expected, coefs = np_project(ds, gs, lam, granularity)
    for u, e in zip(us, expected):
        assert u.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close_np(u, e, torch.float64 if dtype == torch.float64 else torch.float32, scale=1.0)
    got = f64(stats.coef)
    want = np.array(coefs[:1] if granularity == "global" else coefs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if relation == "conflict" and granularity == "global":
        assert bool(stats.conflict)
    if relation == "aligned":
        assert not bool(stats.conflict.any())


def test_projection_removes_conflicting_component():
    """With lam=1 the projected gradient is orthogonal to G_g (the paper's property)."""
    gen = torch.Generator().manual_seed(1)
    ds, gs = make_grads([(16, 512)], torch.float64, "conflict", gen)
    (u,), stats = F.project(ds, gs, 1.0, "global")
    assert bool(stats.conflict)
    assert abs(float(u.flatten() @ gs[0].flatten())) < 1e-9 * float(gs[0].norm() * u.norm())


def test_coefficient_edge_cases():
    lam = 1.0
    z = torch.tensor
    cases = [  # dot, nn, expected coef, conflict
        (-1.0, 0.0, 0.0, False),           # zero general gradient: no projection, no NaN
        (0.0, 2.0, 0.0, False),            # exactly orthogonal
        (-0.0, 2.0, 0.0, False),
        (1.0, 2.0, 0.0, False),
        (-1.0, 2.0, -0.5, True),
        (float("nan"), 2.0, 0.0, False),
        (-1.0, float("inf"), 0.0, False),
        (float("-inf"), 2.0, 0.0, False),
        (-1.0, float("nan"), 0.0, False),
    ]
    for dot, nn, coef, conflict in cases:
        c, k = F.prograd_coefficient(z(dot), z(nn), lam)
        assert float(c) == coef and bool(k) == conflict, (dot, nn)
        assert not math.isnan(float(c))


def test_zero_general_gradient_is_plain_gradient():
    d = torch.randn(100)
    (u,), stats = F.project([d], [torch.zeros(100)], 1.0, "global")
    assert torch.equal(u, d)
    assert float(stats.cos) == 0.0 and not bool(stats.conflict)


def test_nonfinite_domain_gradient_is_not_hidden():
    d = torch.randn(10)
    d[3] = float("nan")
    g = -torch.randn(10)
    (u,), _ = F.project([d], [g], 1.0, "global")
    assert torch.isnan(u[3])
    p = torch.zeros(10)
    F.prograd_sgd([p], [d], [g], [None], lr=0.1)
    assert torch.isnan(p[3])


def test_nonfinite_general_gradient_gives_no_projection_and_no_nan():
    d = torch.randn(10)
    g = -d.clone()
    g[2] = float("inf")
    (u,), stats = F.project([d], [g], 1.0, "global")
    assert torch.equal(u, d) and not bool(stats.conflict)
    assert torch.isinf(stats.general_norm_sq)


def _torch_sgd(params, grads, hyper):
    ps = [p.clone() for p in params]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt = torch.optim.SGD(ps, foreach=False, **hyper)
    return ps, opt


SGD_GRID = [
    dict(lr=0.1),
    dict(lr=0.01, momentum=0.9),
    dict(lr=0.01, momentum=0.9, dampening=0.1),
    dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(lr=0.05, weight_decay=0.1, maximize=True),
    dict(lr=0.002, momentum=0.9, weight_decay=5e-4, maximize=True),
]


@pytest.mark.parametrize("hyper", SGD_GRID, ids=lambda h: "-".join(f"{k}{v}" for k, v in h.items()))
@pytest.mark.parametrize("general", ["none", "aligned", "orthogonal_zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torch_sgd_without_conflict(hyper, general, dtype):
    """coef = 0 must give exactly torch.optim.SGD, over several steps."""
    shapes = SHAPES["mixed"]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    ours = [p.clone() for p in params]
    ref, opt = _torch_sgd(params, [torch.zeros_like(p) for p in params], hyper)
    bufs = [None] * len(params)
    for _ in range(4):
        ds = [torch.randn(s, dtype=dtype) for s in shapes]
        if general == "none":
            gs = [None] * len(ds)
        elif general == "aligned":
            gs = [d * 2 for d in ds]
        else:
            gs = [torch.zeros_like(d) for d in ds]
        for p, d in zip(ref, ds):
            p.grad = d.clone()
        opt.step()
        F.prograd_sgd(ours, ds, gs, bufs, **{"momentum": 0.0, **hyper})
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    if hyper.get("momentum"):
        for buf, p in zip(bufs, ref):
            assert torch.equal(buf, opt.state[p]["momentum_buffer"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", F.GRANULARITIES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_prograd_sgd_matches_float64_over_steps(dtype, granularity, lam):
    hyper = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True)
    shapes = SHAPES["mixed"]
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    exp_p = [f64(p) for p in params]
    exp_b = [None] * len(params)
    bufs = [None] * len(params)
    for step in range(3):
        ds, gs = make_grads(shapes, dtype, "conflict" if step % 2 == 0 else "random", gen)
        gs[1] = None  # a tensor without general gradient gets plain SGD
        exp_p, exp_b = np_prograd_sgd(
            [torch.from_numpy(p) for p in exp_p], ds, gs,
            [None if b is None else torch.from_numpy(b) for b in exp_b],
            lam=lam, granularity=granularity, **hyper)
        # feed our own (rounded) params back to the float64 model to avoid drift
        F.prograd_sgd(params, ds, gs, bufs, lam=lam, granularity=granularity, **hyper)
        for p, e in zip(params, exp_p):
            assert p.dtype == dtype
            assert_close_np(p, e, dtype, scale=1.0)
        exp_p = [f64(p) for p in params]
        exp_b = [f64(b) for b in bufs]
        assert all(b.dtype == dtype for b in bufs)


def test_low_precision_math_runs_in_fp32():
    """fp16 params: result == fp32 computation rounded once, not fp16 step by step."""
    shapes = [(257,), (16, 33)]
    p16 = [torch.randn(s).half() for s in shapes]
    p32 = [p.float() for p in p16]
    ds, gs = make_grads(shapes, torch.float16, "conflict", torch.Generator().manual_seed(3))
    b16, b32 = [None, None], [None, None]
    hyper = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, lam=1.0)
    F.prograd_sgd(p16, ds, gs, b16, **hyper)
    F.prograd_sgd(p32, [d.float() for d in ds], [g.float() for g in gs], b32, **hyper)
    for a, b in zip(p16, p32):
        assert torch.equal(a, b.half())


def test_amp_scale_and_skip():
    shapes = SHAPES["mixed"]
    gen = torch.Generator().manual_seed(11)
    ds, gs = make_grads(shapes, torch.float32, "conflict", gen)
    scale = torch.tensor(1024.0)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    p_ref = [torch.randn(s, generator=gen) for s in shapes]
    p_amp = [p.clone() for p in p_ref]
    b_ref, b_amp = [None] * 5, [None] * 5
    s_ref = F.prograd_sgd(p_ref, ds, gs, b_ref, **hyper)
    s_amp = F.prograd_sgd(p_amp, [d * scale for d in ds], [g * scale for g in gs], b_amp,
                          grad_scale=scale, found_inf=torch.tensor(0.0), **hyper)
    for a, b in zip(p_amp, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s_amp.coef, s_ref.coef)
    assert not bool(s_amp.skipped)
    # found_inf skips everything; so does an inf in the general gradient alone
    for found, poison in [(1.0, False), (0.0, True)]:
        before_p = [p.clone() for p in p_amp]
        before_b = [b.clone() for b in b_amp]
        g2 = [g * scale for g in gs]
        if poison:
            g2[2][0, 0] = float("inf")
        s = F.prograd_sgd(p_amp, [d * scale for d in ds], g2, b_amp, grad_scale=scale,
                          found_inf=torch.tensor(found), **hyper)
        assert bool(s.skipped)
        for a, b in zip(p_amp + b_amp, before_p + before_b):
            assert torch.equal(a, b)


def test_tensor_lr_equals_float_lr():
    shapes = SHAPES["mixed"]
    ds, gs = make_grads(shapes, torch.float32, "conflict", torch.Generator().manual_seed(5))
    pa = [torch.ones(s) for s in shapes]
    pb = [torch.ones(s) for s in shapes]
    F.prograd_sgd(pa, ds, gs, [None] * 5, lr=0.125, momentum=0.5)
    F.prograd_sgd(pb, ds, gs, [None] * 5, lr=torch.tensor(0.125), momentum=0.5)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_bad_options():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="granularity"):
        F.prograd_sgd(p, p, [None], [None], lr=0.1, granularity="layer")
    with pytest.raises(ValueError, match="lam"):
        F.prograd_sgd(p, p, [None], [None], lr=0.1, lam=1.5)
    with pytest.raises(ValueError, match="lengths"):
        F.prograd_sgd(p, p, [], [None], lr=0.1)
