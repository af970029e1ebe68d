"""Rehearsal of ``benchmarks/device_check.sh`` on a machine without a GPU.

With ``PROGRAD_FAST_REHEARSAL=1`` and this folder on ``PYTHONPATH`` (device_check.sh sets both
in rehearsal mode), every Python process sees ``torch.cuda.is_available() == True``, so it
takes its GPU path, and stops at its first CUDA call (torch's lazy CUDA initialisation),
printing where (and appending it to the file ``PROGRAD_FAST_REHEARSAL_STOPS`` names, if
set: pytest captures the output of a test), with exit status 86: everything before it
(imports, test collection, argument parsing, extension builds and loads, files written) runs
as on the GPU machine.
torch is patched when ``torch.cuda`` is first imported, so processes that never import torch
(pip, nvcc) are untouched.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import traceback

REHEARSAL_ENV = "PROGRAD_FAST_REHEARSAL"
STOP_STATUS = 86


def _where() -> str:
    """The innermost frame outside torch and this file: the caller's first CUDA call."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/" not in path and path != __file__ and not path.startswith("<frozen"):
            return f"{path}:{frame.lineno} in {frame.name}"
    return "?"


def _stop(*args, **kwargs):
    line = f"REHEARSAL STOP before the first CUDA call: {_where()}"
    print(line, flush=True)
    sys.stderr.flush()
    record = os.environ.get("PROGRAD_FAST_REHEARSAL_STOPS")
    if record:
        with open(record, "a") as f:
            f.write(line + "\n")
    os._exit(STOP_STATUS)


def _patch(cuda) -> None:
    import torch

    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda._lazy_init = _stop  # what torch calls (from Python and C++) before any CUDA work
    torch._C._cuda_init = _stop  # for modules that imported the original _lazy_init
    # Objects whose constructors reach the driver without the lazy initialisation:
    for name in ("Stream", "CUDAGraph"):
        setattr(cuda, name, _stop)
    generator = torch.Generator

    class Generator(generator):
        def __new__(cls, device="cpu"):
            if torch.device(device).type == "cuda":
                _stop()
            return generator.__new__(cls, device)

    torch.Generator = Generator


class _PatchTorchCuda(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.cuda":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(REHEARSAL_ENV, "").strip() not in ("", "0"):
    sys.meta_path.insert(0, _PatchTorchCuda())
