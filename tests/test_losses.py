"""prograd_losses against the official ProGrad loss and a float64 KL."""

import pytest
import torch
import torch.nn.functional as F

import prograd_fast as pf


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_kl_value_and_gradient(T):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g, dtype=torch.float64, requires_grad=True)
    zs = torch.randn(7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (7,), generator=g)
    ce, kl = pf.prograd_losses(logits, zs, labels, temperature=T)
    p = torch.softmax(zs / T, 1)
    q = torch.softmax(logits / T, 1)
    want = (p * (p.log() - q.log())).sum(1).mean() * T * T
    torch.testing.assert_close(kl, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ce, F.cross_entropy(logits, labels))
    # same gradient as the official soft-target cross entropy
    official = -(p * F.log_softmax(logits / T, 1)).sum(1).mean() * T * T
    g1 = torch.autograd.grad(kl, logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(official, logits)[0]
    torch.testing.assert_close(g1.double(), g2, rtol=1e-5, atol=1e-7)


def test_kl_zero_when_student_equals_teacher_and_teacher_detached():
    zs = torch.randn(4, 5, requires_grad=True)
    logits = zs.detach().clone().requires_grad_()
    _, kl = pf.prograd_losses(logits, zs, torch.zeros(4, dtype=torch.long))
    assert abs(float(kl.detach())) < 1e-6
    kl.backward()
    assert zs.grad is None
    assert float(logits.grad.abs().max()) < 1e-6


def test_bad_shapes():
    with pytest.raises(ValueError, match="batch, classes"):
        pf.prograd_losses(torch.randn(4, 5), torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        pf.prograd_losses(torch.randn(4, 5), torch.randn(4, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        pf.prograd_losses(torch.randn(4, 5), torch.randn(4, 5), torch.zeros(4, dtype=torch.long), 0)
