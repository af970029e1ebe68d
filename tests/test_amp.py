"""AMP: GradScaler hands grad_scale/found_inf to ProGradSGD; both gradients are unscaled,
a non-finite value in either skips the whole update, and ProGradGradScaler lowers the scale
for a general-only overflow.  fp16 autocast on the CPU."""

import pytest
import torch

import prograd_fast as pf
from prograd_fast.amp import ProGradGradScaler, pending_general_grads
from hardening_cases import backends_here, batch, losses, tiny_model

BACKENDS = backends_here("cpu")
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, lam=1.0)
SCALE = 2.0 ** 12


def make(backend, granularity="global"):
    model = tiny_model()
    opt = pf.ProGradSGD(model.parameters(), backend=backend, granularity=granularity, **HYPER)
    return model, opt


def grads(model, opt, seed, scale=None, poison=None):
    opt.zero_grad()
    x, y, zs = batch(seed)
    with torch.autocast("cpu", dtype=torch.float16):
        ce, kl = losses(model, x, y, zs)
    s = (lambda t: t) if scale is None else scale
    pf.backward(opt, s(ce), s(kl))
    if poison == "general":
        pending_general_grads(opt)[1].view(-1)[3] = float("inf")
    elif poison == "domain":
        next(model.parameters()).grad.view(-1)[0] = float("nan")


def snapshot(model, opt):
    return [t.detach().clone() for t in model.parameters()] + [
        s["momentum_buffer"].clone() for s in opt.state.values() if "momentum_buffer" in s]


def assert_same(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if tol:
            torch.testing.assert_close(x, y, **tol)
        else:
            assert torch.equal(x, y)


def new_scaler(cls):
    return cls("cpu", init_scale=SCALE, growth_interval=1000)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [torch.amp.GradScaler, ProGradGradScaler])
def test_scaled_fp16_autocast_run_equals_unscaled_run(backend, cls):
    """Power-of-two scaling is exact: the scaled run follows the unscaled one closely."""
    ref_model, ref_opt = make(backend)
    model, opt = make(backend)
    scaler = new_scaler(cls)
    for step in range(4):
        grads(ref_model, ref_opt, step)
        ref_opt.step()
        grads(model, opt, step, scaler.scale)
        scaler.step(opt)
        scaler.update()
        assert not bool(opt.stats()[0]["skipped"])
        torch.testing.assert_close(opt.stats()[0]["coef"], ref_opt.stats()[0]["coef"],
                                   rtol=1e-5, atol=1e-7)
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt), rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == SCALE


def test_the_runs_above_do_project():
    """Guard for the test above: the batches produce conflicts (otherwise it tests SGD)."""
    model, opt = make("torch")
    conflicts = 0
    for step in range(4):
        grads(model, opt, step)
        opt.step()
        conflicts += int(opt.stats()[0]["conflict"])
    assert conflicts >= 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", ["general", "domain"])
@pytest.mark.parametrize("cls", [torch.amp.GradScaler, ProGradGradScaler])
def test_overflow_in_either_gradient_skips_the_whole_update(backend, poison, cls):
    model, opt = make(backend)
    scaler = new_scaler(cls)
    grads(model, opt, 0, scaler.scale)
    scaler.step(opt)
    scaler.update()  # a first, clean step creates the momentum buffers
    before = snapshot(model, opt)
    grads(model, opt, 1, scaler.scale, poison=poison)
    scaler.step(opt)
    assert bool(opt.stats()[0]["skipped"])
    assert_same(snapshot(model, opt), before)
    assert not pending_general_grads(opt)  # consumed: cannot leak into the next step
    scaler.update()
    lowered = poison == "domain" or cls is ProGradGradScaler
    # Documented: the stock scaler only sees p.grad, so a general-only overflow skips the
    # step but leaves the scale where it was; ProGradGradScaler lowers it.
    assert scaler.get_scale() == (SCALE / 2 if lowered else SCALE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_path_with_progradscaler_unscales_general_grads(backend):
    """scaler.unscale_(opt) (e.g. to clip) then scaler.step: grad_scale is None; the general
    gradients were unscaled in place by ProGradGradScaler, so stats are in true units."""
    ref_model, ref_opt = make(backend)
    model, opt = make(backend)
    scaler = new_scaler(ProGradGradScaler)
    for step in range(3):
        grads(ref_model, ref_opt, step)
        ref_opt.step()
        grads(model, opt, step, scaler.scale)
        scaler.unscale_(opt)
        for g, p in zip(pending_general_grads(opt), model.parameters()):
            assert g.abs().max() < 1e3  # unscaled (scaled values would be ~SCALE larger)
        scaler.step(opt)
        scaler.update()
        for key in ("coef", "dot", "general_norm_sq"):
            torch.testing.assert_close(opt.stats()[0][key], ref_opt.stats()[0][key],
                                       rtol=1e-5, atol=1e-9)
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt), rtol=1e-5, atol=1e-6)


def test_unscale_path_with_stock_scaler_projects_the_same():
    """Stock GradScaler.unscale_ leaves G_g scaled by S: the projection coef*G_g is
    invariant to that, the update is the same; only coef (1/S) and dot/nn (S, S^2) move."""
    ref_model, ref_opt = make("torch")
    model, opt = make("torch")
    scaler = new_scaler(torch.amp.GradScaler)
    for step in range(3):
        grads(ref_model, ref_opt, step)
        ref_opt.step()
        grads(model, opt, step, scaler.scale)
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        ref, got = ref_opt.stats()[0], opt.stats()[0]
        torch.testing.assert_close(got["coef"] * SCALE, ref["coef"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(got["cos"], ref["cos"], rtol=1e-5, atol=1e-7)
    assert_same(snapshot(model, opt), snapshot(ref_model, ref_opt), rtol=1e-5, atol=1e-6)


def test_unscale_refuses_fp16_general_grads_like_torch():
    model = tiny_model(torch.float16)
    opt = pf.ProGradSGD(model.parameters(), lr=0.1)
    x, y, zs = batch(0, dtype=torch.float16)
    ce, kl = losses(model, x, y, zs)
    scaler = ProGradGradScaler("cpu")
    opt.zero_grad()
    pf.backward(opt, scaler.scale(ce), scaler.scale(kl))
    for p in model.parameters():
        p.grad = None  # only the general gradients are left
    with pytest.raises(ValueError, match="FP16 general"):
        scaler.unscale_(opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_contract_per_backend(backend):
    """Functional contract of every backend: grad_scale divides both gradients; found_inf or
    an inf in the general gradient leaves params and momentum untouched (no host sync)."""
    shapes = [(7,), (3, 5)]
    gen = torch.Generator().manual_seed(5)
    ps = [torch.randn(s, generator=gen) for s in shapes]
    ds = [torch.randn(s, generator=gen) for s in shapes]
    gs = [-d + 0.3 * torch.randn(s, generator=gen) for d, s in zip(ds, shapes)]
    from prograd_fast.backends import GroupStep, get_backend
    scale = torch.tensor(SCALE)
    for found, poison in [(0.0, False), (1.0, False), (0.0, True)]:
        p_ref = [p.clone() for p in ps]
        b_ref = [torch.ones_like(p) for p in ps]
        p_be = [p.clone() for p in ps]
        b_be = [b.clone() for b in b_ref]
        g_in = [g * scale for g in gs]
        if poison:
            g_in[1][2, 1] = float("inf")
        kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, lam=1.0,
                  grad_scale=scale, found_inf=torch.tensor(found))
        s_ref = pf.functional.prograd_sgd(p_ref, [d * scale for d in ds], g_in, b_ref, **kw)
        s_be = get_backend(backend).step(GroupStep(p_be, [d * scale for d in ds], g_in, b_be, **kw))
        assert bool(s_be.skipped) == bool(s_ref.skipped) == (found == 1.0 or poison)
        for a, b in zip(p_be + b_be, p_ref + b_ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        if found or poison:
            assert all(torch.equal(a, b) for a, b in zip(p_be, ps))
