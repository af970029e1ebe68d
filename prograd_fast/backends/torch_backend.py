"""The pure-PyTorch backend: runs the reference in ``prograd_fast.functional`` as is."""

from __future__ import annotations

from ..functional import ProGradStats, prograd_sgd
from ._common import refuse_first_step_under_capture


class TorchBackend:
    name = "torch"

    def available(self) -> str | None:
        return None

    def unsupported(self, step) -> str | None:
        return None

    def try_step(self, step) -> ProGradStats:
        return self.step(step)

    def step(self, step) -> ProGradStats:
        if step.params:
            refuse_first_step_under_capture(step, step.params[0].device)
        return prograd_sgd(step.params, step.grads, step.general_grads, step.momentum_buffers,
                           **step.hyper())


BACKEND = TorchBackend()
