"""The C++ CPU backend: one fused call per parameter group (``csrc/prograd_cpu.cpp``).

Vectorised and multi-threaded two-pass kernel (reduce, then projected SGD update), built
just in time on first use (see :mod:`prograd_fast._ext`).  It is the ``"auto"`` choice for
CPU tensors of dtype float32/float16/bfloat16/float64 whenever the build succeeds.  The
statistics are written into buffers the group keeps (views of them are returned and
overwritten by the next step), so a steady step allocates nothing.
"""

from __future__ import annotations

import operator

import torch

from ._common import ExtensionBackend, kernel_args, stats_buffers
from .. import _ext
from ..functional import ProGradStats


_DTYPE = operator.attrgetter("dtype")


class CppBackend(ExtensionBackend):
    name = "cpp"
    device_type = "cpu"

    def available(self) -> str | None:
        return _ext.unavailable_reason("cpu")

    def step(self, step) -> ProGradStats:
        cache = step.extra.get("cpp_stats")
        params = step.params
        glob = step.granularity == "global"
        S = 1 if glob else len(params)
        acc = torch.float64 if torch.float64 in set(map(_DTYPE, params)) else torch.float32
        if cache is None or cache[0] != (S, acc, glob):
            cache = ((S, acc, glob), *stats_buffers(S, acc, torch.device("cpu"), glob))
            step.extra["cpp_stats"] = cache
        _, stats_f, stats_b, stats = cache
        _, bufs = _ext.load("cpu").prograd_sgd(*kernel_args(step), stats_f, stats_b)
        if step.momentum != 0:
            step.momentum_buffers[:] = bufs
        return stats


BACKEND = CppBackend()
