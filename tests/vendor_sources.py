"""The third-party sources in ``../shared/vendor`` (real Dassl.pytorch, official ProGrad code).

Integration tests unpack them into a temporary folder and run prograd_fast inside them, as a
user's machine would have them.  A user's clone has no ``shared/``: tests that need the
sources skip with the reason from :func:`vendor_dir`.  ``PROGRAD_FAST_VENDOR`` points
elsewhere.  :func:`vendor_tree` is a session fixture holding both, unpacked once.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DASSL = "Dassl.pytorch-c61a1b5.tar.gz"
PROMPT_ALIGN = "Prompt-align-1b76203.tar.gz"


def vendor_dir() -> Path:
    """The vendor folder, or a pytest skip saying why it is missing."""
    path = Path(os.environ.get("PROGRAD_FAST_VENDOR") or REPO.parent / "shared" / "vendor")
    if not path.is_dir():
        pytest.skip(f"third-party sources not found at {path} (a clone without ../shared; set "
                    f"PROGRAD_FAST_VENDOR to the folder holding {DASSL} and {PROMPT_ALIGN})")
    return path


def unpack(archive: str, dest: Path) -> Path:
    """Unpack ``archive`` from the vendor folder into ``dest`` (once) and return ``dest``."""
    if not (dest / ".unpacked").exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(vendor_dir() / archive) as tar:
            tar.extractall(dest, filter="data")
        (dest / ".unpacked").touch()
    return dest


@pytest.fixture(scope="session")
def vendor_tree(tmp_path_factory) -> Path:
    """Both archives unpacked once per session (skips without the vendor folder):
    ``dassl/`` (upstream Dassl.pytorch) and ``prompt_align/`` (``ProGrad.public/``,
    ``Dassl.ProGrad.pytorch/``).  Import it into a test module to use it."""
    root = tmp_path_factory.getbasetemp() / "vendor"
    unpack(DASSL, root / "dassl")
    unpack(PROMPT_ALIGN, root / "prompt_align")
    return root


def custom_templates(trainer: Path) -> dict:
    """``CUSTOM_TEMPLATES`` of an official trainer file, read as text (never executed)."""
    for node in ast.parse(Path(trainer).read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CUSTOM_TEMPLATES":
            return ast.literal_eval(node.value)
    raise AssertionError(f"no CUSTOM_TEMPLATES in {trainer}")


#: top-level package names the official trees define (and other tests may have imported)
OFFICIAL_PACKAGES = ("clip", "dassl", "trainers")


def import_tree(paths: list, names: dict) -> SimpleNamespace:
    """Import ``names`` (attribute -> module) from source trees put first on ``sys.path``;
    afterwards ``sys.path`` and the modules under :data:`OFFICIAL_PACKAGES` are put back as
    they were (another test may have imported its own ``clip`` or ``dassl``)."""
    saved = list(sys.path)
    ours = OFFICIAL_PACKAGES
    before = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] in ours}
    sys.path[:0] = [str(p) for p in paths]
    try:
        return SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})
    finally:
        sys.path[:] = saved
        for name in [m for m in sys.modules if m.split(".")[0] in ours]:
            del sys.modules[name]
        sys.modules.update(before)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against the official value ``b`` (Frobenius norms)."""
    return float((a - b).detach().norm() / b.detach().norm())
