"""The C++ CPU kernel (backend "cpp") against the pure-PyTorch reference and a float64 model.

The extension is built on first use; the module is skipped, with the reason, when it cannot
be built.  The shared checks live in tests/kernel_cases.py (also used on CUDA).
"""

from __future__ import annotations

import pytest
import torch

from prograd_fast import ProGradSGD, _ext
from prograd_fast.backends import GroupStep, get_backend, run_step
from prograd_fast.functional import prograd_sgd
from tests.kernel_cases import AWKWARD, DTYPES, EPS, clone_list, make_group, run_case

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
    for x, y in zip(a[0], b[0]):  # p - lr*u vs p + (-lr)*u (fused): as the reference rounds
        torch.testing.assert_close(x, y, rtol=EPS[torch.float32], atol=EPS[torch.float32])


@pytest.mark.parametrize("hyper", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.2),
                                   dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
                                   dict(lr=0.1, maximize=True, weight_decay=1e-2, momentum=0.5)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_without_general_grads_equals_torch_sgd_bitwise(hyper, dtype):
    shapes = [(16, 512), (7,), (33, 5)]
    p1 = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    p2 = [torch.nn.Parameter(p.detach().clone()) for p in p1]
    o1 = ProGradSGD(p1, lam=0.0, backend="cpp", **hyper)
    o2 = torch.optim.SGD(p2, foreach=False, **hyper)
    for _ in range(4):
        grads = [torch.randn(s, dtype=dtype) for s in shapes]
        for a, b, g in zip(p1, p2, grads):
            a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


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
    run_step("auto", step)
    assert step.extra["auto_backend"] == "cpp"
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


def test_unavailable_backend_auto_uses_torch_and_forced_raises(monkeypatch):
    from prograd_fast.backends import BackendUnavailableError

    monkeypatch.delenv("PROGRAD_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_ext, "unavailable_reason", lambda kind: "no compiler in this test")
    ps, ds, gs = make_group((10,), torch.float32, "cpu")
    step = GroupStep(ps, ds, gs, [None], lr=0.1)
    assert get_backend("cpp").available() == "no compiler in this test"
    run_step("auto", step)
    assert step.extra["auto_backend"] == "torch"
    with pytest.raises(BackendUnavailableError, match="no compiler in this test"):
        run_step("cpp", step)
