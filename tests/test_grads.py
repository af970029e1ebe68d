"""prograd_fast.backward: both gradients from one forward, no clone of .grad."""

import pytest
import torch

import prograd_fast as pf


def pending(opt):
    """The optimizer's pending general gradients, aligned with its parameters."""
    return opt._pending_general_grads()


def setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    frozen = torch.nn.Parameter(torch.randn(3))  # requires grad but not in the optimizer
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    zs = torch.randn(10, 3)
    return model, frozen, x, y, zs


def forward(model, frozen, x, y, zs):
    return pf.prograd_losses(model(x) + frozen, zs, y)


def test_fills_grad_and_general_buffer_exactly():
    model, frozen, x, y, zs = setup()
    params = list(model.parameters())
    opt = pf.ProGradSGD(params, lr=0.1)
    ce, kl = forward(model, frozen, x, y, zs)
    want_g = torch.autograd.grad(kl, params, retain_graph=True)
    want_d = torch.autograd.grad(ce, params, retain_graph=True)
    pf.backward(opt, ce, kl)
    for p, d, g, got in zip(params, want_d, want_g, pending(opt)):
        torch.testing.assert_close(p.grad, d, rtol=0, atol=0)
        torch.testing.assert_close(got, g, rtol=0, atol=0)
    assert not opt.state  # kept beside the optimizer's state, not in it
    assert frozen.grad is None  # only the optimizer's parameters receive gradients


def test_graph_is_freed_after_the_call():
    model, frozen, x, y, zs = setup()
    opt = pf.ProGradSGD(model.parameters(), lr=0.1)
    ce, kl = forward(model, frozen, x, y, zs)
    pf.backward(opt, ce, kl)
    with pytest.raises(RuntimeError, match="second time|freed"):
        ce.backward()


def test_accumulates_over_micro_batches():
    model, frozen, x, y, zs = setup()
    params = list(model.parameters())
    opt = pf.ProGradSGD(params, lr=0.1)
    want_d = [torch.zeros_like(p) for p in params]
    want_g = [torch.zeros_like(p) for p in params]
    for half in (slice(0, 5), slice(5, 10)):
        ce, kl = forward(model, frozen, x[half], y[half], zs[half])
        for acc, g in zip(want_g, torch.autograd.grad(kl, params, retain_graph=True)):
            acc += g
        for acc, d in zip(want_d, torch.autograd.grad(ce, params, retain_graph=True)):
            acc += d
        pf.backward(opt, ce, kl)
    for p, d, g, got in zip(params, want_d, want_g, pending(opt)):
        torch.testing.assert_close(p.grad, d)
        torch.testing.assert_close(got, g)


def test_general_loss_without_path_to_some_params():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3))
    opt = pf.ProGradSGD([a, b], lr=0.1)
    task = (a * b).sum()
    general = (a ** 2).sum()
    pf.backward(opt, task, general)
    ga, gb = pending(opt)
    assert ga is not None and gb is None
    torch.testing.assert_close(b.grad, a.detach())
    opt.step()  # b gets the plain SGD update


def test_bad_arguments():
    model, frozen, x, y, zs = setup()
    opt = pf.ProGradSGD(model.parameters(), lr=0.1)
    ce, kl = forward(model, frozen, x, y, zs)
    with pytest.raises(TypeError):
        pf.backward(torch.optim.SGD(model.parameters(), lr=0.1), ce, kl)
    with pytest.raises(ValueError, match="scalar"):
        pf.backward(opt, ce.expand(2), kl)
    with pytest.raises(ValueError, match="require grad"):
        pf.backward(opt, ce, kl.detach())
