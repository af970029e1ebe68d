"""The compiled ProGrad-SGD kernels against the pure-PyTorch reference and a float64 model.

``run_case`` / ``f64_step`` are shared with tests/test_cuda_build.py (same matrix on CUDA).
Here they run the C++ CPU kernel (backend "cpp"); the extension is built on first use and
the module is skipped, with the reason, when it cannot be built.
"""

from __future__ import annotations

import math

import pytest
import torch

from prograd_fast import ProGradSGD, _ext
from prograd_fast.backends import GroupStep, get_backend, select_backend
from prograd_fast.functional import prograd_sgd

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
# Awkward sizes: 1, primes, vector width +- 1 (AVX-512 float: 16 lanes, 32 per unit), the
# C++ chunk (16384) +- 1, and the CUDA block sizes.
AWKWARD = (1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 65, 97, 255, 257, 1021, 4097, 16383,
           16384, 16385, 40961)


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


# ----------------------------------------------------------------- tests
_reason = _ext.unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"cpp backend unavailable: {_reason}")


@pytest.fixture(autouse=True)
def _poison():
    """Buffers the kernel creates start NaN-filled, so an unwritten element shows."""
    module = None if _reason else _ext.load("cpu")
    if module is not None:
        module.set_poison_new_buffers(True)
    yield
    if module is not None:
        module.set_poison_new_buffers(False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ("global", "tensor"))
@pytest.mark.parametrize("lam", (0.0, 0.5, 1.0))
def test_awkward_sizes(dtype, granularity, lam):
    ps, ds, gs = make_group(AWKWARD, dtype, "cpu", none_general=(4,))
    bufs = [None if i % 3 == 0 else torch.randn(p.shape, dtype=dtype) for i, p in enumerate(ps)]
    run_case("cpp", ps, ds, gs, bufs, lr=0.5, momentum=0.9, weight_decay=1e-2, lam=lam,
             granularity=granularity)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("variant", [
    dict(momentum=0.0),
    dict(momentum=0.9, first=True),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.8, nesterov=True, weight_decay=0.1),
    dict(momentum=0.9, maximize=True, weight_decay=0.05),
    dict(momentum=0.0, maximize=True),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_sgd_variants(dtype, variant):
    variant = dict(variant)
    first = variant.pop("first", False)
    sizes = (33, 1000, 16385)
    ps, ds, gs = make_group(sizes, dtype, "cpu", conflict="all")
    bufs = [None if (first or not variant.get("momentum")) else torch.randn(p.shape, dtype=dtype)
            for p in ps]
    run_case("cpp", ps, ds, gs, bufs, lr=0.3, granularity="tensor", **variant)


@pytest.mark.parametrize("conflict", ("all", "none", "mixed"))
@pytest.mark.parametrize("granularity", ("global", "tensor"))
def test_conflict_patterns(conflict, granularity):
    ps, ds, gs = make_group((17, 4096, 99991), torch.float32, "cpu", conflict=conflict)
    _, _, stats = run_case("cpp", ps, ds, gs, [None] * 3, lr=0.1, momentum=0.9,
                           granularity=granularity)
    if conflict == "all":
        assert bool(stats.conflict.all())
    if conflict == "none":
        assert not bool(stats.conflict.any()) and bool((stats.coef == 0).all())


@pytest.mark.parametrize("granularity", ("global", "tensor"))
def test_zero_and_missing_general(granularity):
    ps, ds, gs = make_group((5, 300), torch.float32, "cpu", zero_general=True)
    _, _, stats = run_case("cpp", ps, ds, gs, [None, None], lr=0.1, momentum=0.9,
                           granularity=granularity)
    assert bool(torch.isfinite(stats.coef).all()) and not bool(stats.conflict.any())
    ps, ds, gs = make_group((5, 300, 7), torch.float16, "cpu", none_general=(0, 1, 2))
    run_case("cpp", ps, ds, gs, [None] * 3, lr=0.1, momentum=0.9, granularity=granularity)


def test_many_small_and_mixed_shapes():
    gen = torch.Generator().manual_seed(1)
    sizes = [int(x) for x in torch.randint(1, 60, (200,), generator=gen)]
    sizes += [(3, 5), (2, 3, 4), (16, 512), (1,)]
    ps, ds, gs = make_group(sizes, torch.float32, "cpu", none_general=(3, 50))
    for gran in ("global", "tensor"):
        run_case("cpp", ps, ds, gs, [None] * len(ps), lr=0.2, momentum=0.9, granularity=gran)


def test_mixed_dtypes_in_one_group():
    for dtypes in ((torch.float16, torch.float32, torch.bfloat16),
                   (torch.float64, torch.float32, torch.float16)):
        ps, ds, gs = [], [], []
        for k, dt in enumerate(dtypes):
            p, d, g = make_group((1000 + 7 * k,), dt, "cpu", conflict="all", seed=k)
            ps += p; ds += d; gs += g
        for gran in ("global", "tensor"):
            run_case("cpp", ps, ds, gs, [None] * 3, lr=0.1, momentum=0.5, granularity=gran)


def test_non_contiguous_tensors():
    base = [torch.randn(64, 33).t() for _ in range(3)]  # transposed views
    ps = [base[0].clone().t().contiguous().t(), torch.randn(70)[::2], torch.randn(33, 64)]
    ds = [torch.randn(33, 64), torch.randn(35), base[1]]
    gs = [-d.contiguous() * 0.5 + 0.1 * torch.randn(d.shape) for d in ds]
    gs[2] = gs[2].t().contiguous().t()
    bufs = [None, torch.randn(35), torch.randn(64, 33).t()]
    for gran in ("global", "tensor"):
        run_case("cpp", ps, ds, gs, bufs, lr=0.1, momentum=0.9, granularity=gran)
    # A strided (non-dense) parameter view: written through, its neighbours untouched.
    storage = torch.randn(70)
    view = storage[::2]
    before = storage.clone()
    expected = [view.clone()]
    d, g = torch.randn(35), torch.randn(35)
    prograd_sgd(expected, [d], [g], [None], lr=0.1)
    get_backend("cpp").step(GroupStep([view], [d], [g], [None], lr=0.1))
    torch.testing.assert_close(view, expected[0])
    assert torch.equal(storage[1::2], before[1::2])


def test_tensor_lr_equals_float_lr():
    ps, ds, gs = make_group((257, 16385), torch.float32, "cpu")
    a = run_case("cpp", ps, ds, gs, [None, None], lr=torch.tensor(0.05), momentum=0.9)
    b = run_case("cpp", ps, ds, gs, [None, None], lr=0.05, momentum=0.9)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_amp_scaling_and_skip(dtype):
    ps, ds, gs = make_group((31, 16385), dtype, "cpu")
    scale = torch.tensor(64.0)
    ds = [d * 64 for d in ds]
    gs = [g * 64 for g in gs]
    bufs = [None, torch.randn(16385, dtype=dtype)]
    run_case("cpp", ps, ds, gs, bufs, lr=0.1, momentum=0.9, grad_scale=scale,
             found_inf=torch.tensor(0.0))
    # found_inf set: nothing changes; the buffer created this step is zeros.
    p_new, b_new, stats = run_case("cpp", ps, ds, gs, bufs, lr=0.1, momentum=0.9,
                                   grad_scale=scale, found_inf=torch.tensor(1.0))
    assert bool(stats.skipped)
    assert torch.equal(b_new[0], torch.zeros_like(ps[0])) and torch.equal(b_new[1], bufs[1])
    # An inf in the general gradient skips the step too (AMP contract).
    gs_bad = clone_list(gs)
    gs_bad[1][5] = float("inf")
    _, _, stats = run_case("cpp", ps, ds, gs_bad, bufs, lr=0.1, momentum=0.9, grad_scale=scale,
                           found_inf=torch.tensor(0.0))
    assert bool(stats.skipped)


def test_inf_general_without_amp_gives_plain_sgd_for_that_tensor():
    ps, ds, gs = make_group((40, 50), torch.float32, "cpu", conflict="all")
    gs[0][3] = float("inf")
    p_new, _, stats = run_case("cpp", ps, ds, gs, [None, None], lr=0.1, momentum=0.9,
                               granularity="tensor")
    assert stats.conflict.tolist() == [False, True]
    assert bool(torch.isfinite(p_new[0]).all())


def test_deterministic_across_runs_and_thread_counts():
    ps, ds, gs = make_group((3_000_001, 77), torch.float32, "cpu")
    hyper = dict(lr=0.1, momentum=0.9, lam=1.0, granularity="global")
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            p, b = clone_list(ps), [None, None]
            st = GroupStep(p, ds, gs, b, **hyper)
            stats = get_backend("cpp").step(st)
            outs.append((p, stats.dot.clone()))
    finally:
        torch.set_num_threads(threads)
    for p, dot in outs[1:]:
        assert torch.equal(dot, outs[0][1])
        assert all(torch.equal(x, y) for x, y in zip(p, outs[0][0]))


def test_optimizer_several_steps_matches_torch_backend():
    torch.manual_seed(3)
    shapes = [(16, 512), (7,), (3, 5, 11), (1,)]
    for dtype in (torch.float32, torch.bfloat16):
        for gran in ("global", "tensor"):
            init = [torch.randn(s, dtype=dtype) for s in shapes]
            opts = {}
            params = {}
            for name in ("cpp", "torch"):
                params[name] = [torch.nn.Parameter(t.clone()) for t in init]
                opts[name] = ProGradSGD(params[name], lr=0.05, momentum=0.9, weight_decay=1e-3,
                                        nesterov=True, lam=0.7, granularity=gran, backend=name)
            for it in range(5):
                ds = [torch.randn(s, dtype=dtype) for s in shapes]
                gs = [(-0.5 * d + 0.1 * torch.randn(s, dtype=dtype)) if k % 2 == 0 else None
                      for k, (d, s) in enumerate(zip(ds, shapes))]
                if it == 2:  # a parameter without a domain gradient is skipped this step
                    ds[1] = None
                for name in ("cpp", "torch"):
                    for p, d in zip(params[name], ds):
                        p.grad = None if d is None else d.clone()
                    opts[name].store_general_grads([None if g is None else g.clone() for g in gs])
                    opts[name].step()
            for a, b in zip(params["cpp"], params["torch"]):
                torch.testing.assert_close(a, b, rtol=4 * EPS[dtype], atol=4 * EPS[dtype])
            for a, b in zip(params["cpp"], params["torch"]):
                ba = opts["cpp"].state[a]["momentum_buffer"]
                bb = opts["torch"].state[b]["momentum_buffer"]
                torch.testing.assert_close(ba, bb, rtol=4 * EPS[dtype], atol=4 * EPS[dtype])
            for sa, sb in zip(opts["cpp"].stats(), opts["torch"].stats()):
                assert sa.keys() == sb.keys()
                for k in sa:
                    assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, k


def test_auto_picks_cpp_on_cpu_and_rejects_other_devices(monkeypatch):
    monkeypatch.delenv("PROGRAD_FAST_BACKEND", raising=False)
    ps, ds, gs = make_group((10,), torch.float32, "cpu")
    step = GroupStep(ps, ds, gs, [None], lr=0.1)
    assert select_backend("auto", step).name == "cpp"
    meta = GroupStep([torch.empty(3, device="meta")], [torch.empty(3, device="meta")], [None],
                     [None], lr=0.1)
    assert "CPU" in get_backend("cpp").unsupported(meta)
    ints = GroupStep([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3, dtype=torch.int32)],
                     [None], [None], lr=0.1)
    assert "dtype" in get_backend("cpp").unsupported(ints)


def test_unavailable_reason_when_building_is_disabled(monkeypatch):
    monkeypatch.setenv(_ext.NO_BUILD_ENV, "1")
    assert _ext.NO_BUILD_ENV in _ext._prerequisites("cpu")
    monkeypatch.setenv("CXX", "definitely-not-a-compiler-xyz")
    monkeypatch.delenv(_ext.NO_BUILD_ENV)
    assert "compiler" in _ext._prerequisites("cpu")
