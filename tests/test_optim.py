"""ProGradSGD as a torch.optim.Optimizer: API, equivalences, state, edge cases (torch backend)."""

import copy
import io
import warnings

import pytest
import torch

import prograd_fast as pf
from prograd_fast import functional as F


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def losses(model, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g).to(dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    zs = 3 * torch.randn(16, 3, generator=g)
    return pf.prograd_losses(model(x), zs, y)


def run(model, opt, steps, how="backward"):
    for s in range(steps):
        opt.zero_grad()
        ce, kl = losses(model, s, next(model.parameters()).dtype)
        if how == "backward":
            pf.backward(opt, ce, kl)
        elif how == "manual":
            kl.backward(retain_graph=True)
            opt.store_general_grads()
            ce.backward()
        elif how == "list":
            params = [p for grp in opt.param_groups for p in grp["params"]]
            general = torch.autograd.grad(kl, params, retain_graph=True)
            opt.store_general_grads(list(general))
            ce.backward()
        opt.step()


def test_construction_errors():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for kwargs, match in [
        (dict(lr=-1), "learning rate"), (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-1), "weight_decay"), (dict(nesterov=True), "Nesterov"),
        (dict(lam=2.0), "lam"), (dict(lam=-0.1), "lam"),
        (dict(granularity="layer"), "granularity"), (dict(backend="fortran"), "backend"),
    ]:
        with pytest.raises(ValueError, match=match):
            pf.ProGradSGD(params, **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize("how", ["manual", "list"])
def test_three_ways_to_get_gradients_agree(how):
    m1, m2 = tiny_model(), tiny_model()
    o1 = pf.ProGradSGD(m1.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    o2 = pf.ProGradSGD(m2.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    run(m1, o1, 5, "backward")
    run(m2, o2, 5, how)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_conflicts_happen_and_change_the_update():
    """Sanity: the tiny problem has conflicts and ProGrad differs from plain SGD there."""
    m1, m2 = tiny_model(), tiny_model()
    o1 = pf.ProGradSGD(m1.parameters(), lr=0.5, lam=1.0)
    o2 = pf.ProGradSGD(m2.parameters(), lr=0.5, lam=0.0)
    conflicts = 0
    for s in range(6):
        run(m1, o1, 1)
        conflicts += int(o1.stats()[0]["conflict"])
        run(m2, o2, 1)
    assert conflicts > 0
    assert any(not torch.allclose(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_matches_functional_reference(granularity):
    model = tiny_model()
    ref = copy.deepcopy(model)
    opt = pf.ProGradSGD(model.parameters(), lr=0.3, momentum=0.9, nesterov=True, lam=0.7,
                        granularity=granularity)
    bufs = [None] * 4
    for s in range(4):
        opt.zero_grad()
        ce, kl = losses(model, s)
        pf.backward(opt, ce, kl)
        opt.step()
        ps = list(ref.parameters())
        ce, kl = losses(ref, s)
        gen = torch.autograd.grad(kl, ps, retain_graph=True)
        dom = torch.autograd.grad(ce, ps)
        with torch.no_grad():
            F.prograd_sgd(ps, list(dom), list(gen), bufs, lr=0.3, momentum=0.9, nesterov=True,
                          lam=0.7, granularity=granularity)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def official_style_step(params, lam, lr, momentum, wd, bufs):
    """The official ProGrad code: per tensor, python `if` on cos < 0, unit-normalised G_g."""
    for i, p in enumerate(params):
        d, g = p.grad, p.general
        if torch.dot(d.flatten(), g.flatten()) / (d.norm() * g.norm()) < 0:
            gu = g / g.norm()
            d = d - lam * torch.dot(d.flatten(), gu.flatten()) * gu
        d = d + wd * p
        bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
        with torch.no_grad():
            p -= lr * bufs[i]


def test_multistep_trajectory_matches_official_per_tensor_update():
    m1, m2 = tiny_model(torch.float64), tiny_model(torch.float64)
    opt = pf.ProGradSGD(m1.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4, granularity="tensor")
    bufs = [None] * 4
    for s in range(10):
        opt.zero_grad()
        ce, kl = losses(m1, s, torch.float64)
        pf.backward(opt, ce, kl)
        opt.step()
        ps = list(m2.parameters())
        ce, kl = losses(m2, s, torch.float64)
        gen = torch.autograd.grad(kl, ps, retain_graph=True)
        dom = torch.autograd.grad(ce, ps)
        for p, d, g in zip(ps, dom, gen):
            p.grad, p.general = d, g
        official_style_step(ps, 1.0, 0.2, 0.9, 5e-4, bufs)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hyper", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.2),
                                   dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
                                   dict(lr=0.1, maximize=True, weight_decay=1e-2)])
def test_equals_torch_sgd_without_general_gradients(hyper):
    m1, m2 = tiny_model(), tiny_model()
    o1 = pf.ProGradSGD(m1.parameters(), **hyper)
    o2 = torch.optim.SGD(m2.parameters(), foreach=False, **hyper)
    with pytest.warns(UserWarning, match="plain"):
        for s in range(5):
            for m, o in ((m1, o1), (m2, o2)):
                o.zero_grad()
                losses(m, s)[0].backward()
                o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_no_warning_when_lam_zero_and_general_grads_are_consumed():
    model = tiny_model()
    opt = pf.ProGradSGD(model.parameters(), lr=0.1, lam=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses(model, 0)[0].backward()
        opt.step()
    opt2 = pf.ProGradSGD(model.parameters(), lr=0.1)
    run(model, opt2, 1)
    assert not opt2.has_general_grads()  # consumed: a later step cannot reuse stale ones


def test_state_dict_round_trip_resumes_identically():
    """A checkpoint taken mid-iteration (general gradients stored, not stepped) holds the
    training state only: the resumed run redoes that iteration and matches."""
    m1 = tiny_model()
    o1 = pf.ProGradSGD(m1.parameters(), lr=0.2, momentum=0.9, granularity="tensor", lam=0.5)
    run(m1, o1, 3)
    o1.zero_grad()
    ce, kl = losses(m1, 3)
    pf.backward(o1, ce, kl)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    o1.step()
    run(m1, o1, 2)

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = tiny_model()
    m2.load_state_dict(ck["model"])
    o2 = pf.ProGradSGD(m2.parameters(), lr=0.0)
    o2.load_state_dict(ck["opt"])
    assert o2.param_groups[0]["granularity"] == "tensor" and o2.param_groups[0]["lam"] == 0.5
    assert not o2.has_general_grads()
    o2.zero_grad()
    pf.backward(o2, *losses(m2, 3))  # the interrupted iteration, again
    o2.step()
    run(m2, o2, 2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_parameters_without_grad_are_skipped():
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(3))
    opt = pf.ProGradSGD([a, b], lr=0.1, momentum=0.9)
    b0 = b.detach().clone()
    a.grad = torch.randn(4)
    opt.store_general_grads([-a.grad.clone(), torch.randn(3)])
    opt.step()
    assert torch.equal(b, b0) and "momentum_buffer" not in opt.state[b]
    assert not opt.has_general_grads()


@pytest.mark.parametrize("bad, match", [
    (lambda p: torch.zeros(5), "shape"),
    (lambda p: torch.zeros(4, dtype=torch.float64), "dtype"),
    (lambda p: torch.zeros(4).to_sparse(), "sparse"),
    (lambda p: torch.zeros(4, dtype=torch.complex64), "complex"),
    (lambda p: "grad", "tensors"),
])
def test_bad_general_gradients_raise(bad, match):
    p = torch.nn.Parameter(torch.randn(4))
    opt = pf.ProGradSGD([p], lr=0.1)
    with pytest.raises((RuntimeError, TypeError), match=match):
        opt.store_general_grads([bad(p)])
    with pytest.raises(ValueError, match="2 gradients for 1"):
        opt.store_general_grads([None, None])


def test_bad_domain_gradient_raises():
    p = torch.nn.Parameter(torch.randn(4))
    opt = pf.ProGradSGD([p], lr=0.1)
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params(dtype):
    m32, mlo = tiny_model(), tiny_model(dtype)
    o32 = pf.ProGradSGD(m32.parameters(), lr=0.1, momentum=0.9)
    olo = pf.ProGradSGD(mlo.parameters(), lr=0.1, momentum=0.9)
    run(m32, o32, 3)
    run(mlo, olo, 3)
    for a, b in zip(mlo.parameters(), m32.parameters()):
        assert a.dtype == dtype and olo.state[a]["momentum_buffer"].dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)


def test_stats_shapes_and_values():
    model = tiny_model()
    for gran, shape in [("global", ()), ("tensor", (4,))]:
        opt = pf.ProGradSGD(model.parameters(), lr=0.1, granularity=gran)
        assert opt.stats() == [None]
        run(model, opt, 1)
        st = opt.stats()[0]
        assert set(st) >= {"cos", "conflict", "coef", "dot", "general_norm_sq", "domain_norm_sq", "skipped"}
        for k, v in st.items():
            assert tuple(v.shape) == (() if k == "skipped" else shape), k
        assert st["conflict"].dtype == torch.bool
        assert bool(((st["cos"] >= -1 - 1e-6) & (st["cos"] <= 1 + 1e-6)).all())
        assert torch.equal(st["conflict"], st["coef"] < 0)


def test_param_groups_have_own_options():
    m = tiny_model()
    ps = list(m.parameters())
    opt = pf.ProGradSGD([{"params": ps[:2], "lam": 0.0}, {"params": ps[2:], "granularity": "tensor"}],
                        lr=0.1)
    run(m, opt, 2)
    s0, s1 = opt.stats()
    assert s0["coef"].shape == () and float(s0["coef"]) == 0.0
    assert s1["coef"].shape == (2,)


def test_closure_is_called():
    model = tiny_model()
    opt = pf.ProGradSGD(model.parameters(), lr=0.1)
    calls = []

    def closure():
        opt.zero_grad()
        ce, kl = losses(model, 0)
        pf.backward(opt, ce, kl)
        calls.append(1)
        return ce

    loss = opt.step(closure)
    assert calls == [1] and isinstance(loss, torch.Tensor)
