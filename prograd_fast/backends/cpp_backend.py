"""The C++ CPU backend: one fused call per parameter group (``csrc/prograd_cpu.cpp``).

Vectorised and multi-threaded two-pass kernel (reduce, then projected SGD update), built
just in time on first use (see :mod:`prograd_fast._ext`).  It is the ``"auto"`` choice for
CPU tensors of dtype float32/float16/bfloat16/float64 whenever the build succeeds.
"""

from __future__ import annotations

from ._common import cached_problem, finish_step, group_tensor_problem, kernel_args
from .. import _ext
from ..functional import ProGradStats


class CppBackend:
    name = "cpp"

    def available(self) -> str | None:
        return _ext.unavailable_reason("cpu")

    def unsupported(self, step) -> str | None:
        return cached_problem(step, "cpp_checked", self._check)

    def _check(self, step) -> str | None:
        return group_tensor_problem(step, "cpu", self.name)

    def step(self, step) -> ProGradStats:
        stats, bufs = _ext.load("cpu").prograd_sgd(*kernel_args(step))
        return finish_step(step, stats, bufs)


BACKEND = CppBackend()
