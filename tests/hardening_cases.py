"""Shared pieces of the hardening suites (conformance, AMP, fuzz, memory, distributed)."""

from __future__ import annotations

import os

import torch

import prograd_fast as pf


def backends_here(device: str = "cpu") -> list[str]:
    """Backends that can run tensors on ``device`` here (Triton on the CPU only in its
    interpreter, which tests/conftest.py enables when there is no GPU)."""
    out = []
    for name, reason in pf.available_backends().items():
        if reason is not None:
            continue
        if name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            continue
        if name == "cuda" and device == "cpu":
            continue
        if name == "cpp" and device != "cpu":
            continue
        out.append(name)
    return out


def float64_ok(backend: str) -> bool:
    return backend != "triton"  # Triton passes float scalars as fp32: it refuses float64


def tiny_model(dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3)).to(dtype)


def batch(seed: int, n: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    zs = 3 * torch.randn(n, 3, generator=g)
    return x, y, zs


def losses(model, x, y, zs):
    return pf.prograd_losses(model(x), zs.to(x.dtype), y)
