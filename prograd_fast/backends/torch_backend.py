"""The pure-PyTorch backend: runs the reference in ``prograd_fast.functional`` as is."""

from __future__ import annotations

from ..functional import ProGradStats, prograd_sgd
from ._common import Backend, refuse_first_step_under_capture


class TorchBackend(Backend):
    name = "torch"
    fused = False

    def try_step(self, step) -> ProGradStats:
        return self.step(step)  # every group can run here

    def step(self, step) -> ProGradStats:
        if step.params:
            refuse_first_step_under_capture(step, step.params[0].device)
        return prograd_sgd(step.params, step.grads, step.general_grads, step.momentum_buffers,
                           **step.hyper())


BACKEND = TorchBackend()
