"""Test configuration: Triton runs in its interpreter when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (still run in CI)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


@pytest.fixture(params=["c", "python"])
def host_mode(request, monkeypatch):
    """Run a test with the optimizer's C host helper (prograd_fast._host) and with the
    Python host path alone (what runs where the helper cannot be built).  With ``"c"`` the
    torch backend counts as fused too, so an optimizer takes the helper after its first
    step whatever its backend."""
    from prograd_fast import _host
    from prograd_fast.backends import get_backend

    if request.param == "c":
        if _host.module() is None:
            pytest.skip("the host helper cannot be built here")
        monkeypatch.setattr(get_backend("torch"), "fused", True)
    else:
        monkeypatch.setattr(_host, "_module", None)
    return request.param
