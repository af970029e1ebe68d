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
    Python host path alone, as ``PROGRAD_FAST_NO_HOST_HELPER=1`` gives it (what runs where
    the helper cannot be built).  The helper serves optimizers whose groups ran a fused
    backend: tests check which path ran with ``ProGradSGD.cache_stats()``."""
    from prograd_fast import _host

    _host.forget()
    if request.param == "c":
        monkeypatch.delenv(_host.NO_HELPER_ENV, raising=False)
        if _host.module() is None:
            pytest.skip("the host helper cannot be built here")
    else:
        monkeypatch.setenv(_host.NO_HELPER_ENV, "1")
        assert _host.module() is None
    yield request.param
    _host.forget()  # the next test decides from its own environment
