"""Independent float64 implementations (numpy) used as the ground truth in tests."""

from __future__ import annotations

import numpy as np
import torch

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def f64(t):
    return None if t is None else t.detach().cpu().double().numpy().reshape(-1)


def np_coef(dot: float, nn: float, lam: float) -> float:
    if np.isfinite(dot) and np.isfinite(nn) and dot < 0 and nn > 0:
        return lam * dot / nn
    return 0.0


def np_project(ds, gs, lam, granularity):
    """float64 ProGrad projection; returns (list of flat arrays, coefs per tensor)."""
    ds = [f64(d) for d in ds]
    gs = [f64(g) for g in gs]
    if granularity == "global":
        dot = sum(float(d @ g) for d, g in zip(ds, gs) if g is not None)
        nn = sum(float(g @ g) for g in gs if g is not None)
        coefs = [np_coef(dot, nn, lam)] * len(ds)
    else:
        coefs = [np_coef(float(d @ g), float(g @ g), lam) if g is not None else 0.0
                 for d, g in zip(ds, gs)]
    out = []
    for d, g, c in zip(ds, gs, coefs):
        out.append(d.copy() if (g is None or c == 0.0) else d - c * g)
    return out, coefs


def np_prograd_sgd(params, ds, gs, bufs, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                   nesterov=False, maximize=False, lam=1.0, granularity="global"):
    """float64 ProGrad + torch.optim.SGD semantics; returns (new params, new bufs) as arrays."""
    us, _ = np_project(ds, gs, lam, granularity)
    new_p, new_b = [], []
    for p, u, b in zip(params, us, bufs):
        p = f64(p)
        if maximize:
            u = -u
        if weight_decay:
            u = u + weight_decay * p
        if momentum:
            b = u.copy() if b is None else momentum * f64(b) + (1 - dampening) * u
            u = u + momentum * b if nesterov else b
        new_p.append(p - lr * u)
        new_b.append(b)
    return new_p, new_b


def assert_close_np(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, scale: float = 1.0):
    """Compare a tensor with a float64 array; rtol by dtype, atol scaled to the values."""
    a = f64(actual)
    rtol = RTOL[dtype]
    atol = rtol * max(scale, float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(a, expected, rtol=rtol, atol=atol)
