"""The CUDA backend: fused kernels from ``csrc/prograd_cuda.cu``, one call per group.

Plans (chosen in C++ from the group's layout, see the .cu file): one single-block launch
for small groups (CoOp), one cooperative single-pass launch when every chunk of the group
fits on chip at once (not while capturing a CUDA graph; a launch refused as too large falls
back to two passes), else reduce -> finalize -> update.

Nothing is allocated or copied from the host after a group's first step: the statistics
buffers, the partial-sum workspace and the per-tensor slot starts live in ``step.extra``
(made again only when the group's sizes, dtypes or granularity change; the slot starts are
uploaded from pinned memory, see ``_common.upload``).  The returned statistics are views of
those buffers, overwritten by the next step.  On a stream switch they get
``record_stream`` (``_common.note_stream``).  A device tensor lr is read by the kernels (a
scheduler writing it in place steers CUDA-graph replays); a CPU tensor lr is read on the
host (no device sync) and refused under capture, where its value would be baked in.
``PROGRAD_FAST_CUDA_PLAN`` = auto | small | coop | two_pass forces a plan (tests, benchmarks).
"""

from __future__ import annotations

import os

import torch

from ._common import (CaptureError, ExtensionBackend, capturing, count, kernel_args,
                      keep_for_graphs, note_stream, refuse_first_step_under_capture,
                      stats_buffers, upload)
from .. import _ext
from ..functional import ProGradStats

PLAN_ENV = "PROGRAD_FAST_CUDA_PLAN"
PLANS = {"auto": 0, "small": 1, "coop": 2, "two_pass": 3}


def requested_plan() -> int:
    name = os.environ.get(PLAN_ENV, "auto").strip() or "auto"
    if name not in PLANS:
        raise ValueError(f"{PLAN_ENV} must be one of {tuple(PLANS)}, got {name!r}")
    return PLANS[name]


def slot_starts(numels, chunk: int) -> list[int]:
    """First partial-sum slot of each tensor (one slot per ``chunk`` elements), then the total."""
    out, acc = [], 0
    for n in numels:
        out.append(acc)
        acc += (n + chunk - 1) // chunk
    return out + [acc]


def _group_buffers(cache: dict, step, module, device) -> dict:
    """Slot starts, statistics and their views for this layout, made once per layout."""
    dtypes = tuple(p.dtype for p in step.params)
    glob = step.granularity == "global"
    layout = (tuple(p.numel() for p in step.params), dtypes, glob, device)
    if cache.get("layout") == layout:
        return cache
    keep = cache.get("graph_keep")  # buffers of earlier captures stay alive
    cache.clear()
    if keep:
        cache["graph_keep"] = keep
    S = 1 if glob else len(step.params)
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    stats_f, stats_b, stats = stats_buffers(S, acc, device, glob)
    count(step.extra, "table_uploads")
    cache.update(
        layout=layout, stats_f=stats_f, stats_b=stats_b, stats=stats,
        slots=upload(slot_starts(layout[0], int(module.CHUNK)), torch.int32, device, cache,
                     "cuda_slots"),
        workspace=None, plan=None)
    if capturing(device):
        keep_for_graphs(cache, stats_f, stats_b, cache["slots"])
    return cache


class CudaBackend(ExtensionBackend):
    name = "cuda"
    device_type = "cuda"

    def available(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return _ext.unavailable_reason("cuda")

    def step(self, step) -> ProGradStats:
        device = step.params[0].device
        refuse_first_step_under_capture(step, device)
        module = _ext.load("cuda")
        cache = _group_buffers(step.extra.setdefault("cuda", {}), step, module, device)
        args = list(kernel_args(step))
        lr = step.lr
        now_capturing = capturing(device)
        if isinstance(lr, torch.Tensor) and lr.device != device:
            if now_capturing:
                raise CaptureError(
                    "a CPU tensor lr would be baked into the CUDA graph (a scheduler's later "
                    f"values ignored on replay): pass lr as a 0-d tensor on {device}")
            args[4], args[5] = float(lr), None  # a host read of a CPU tensor: no device sync
        if device.type == "cuda":
            note_stream(cache, device, [cache["stats_f"], cache["stats_b"], cache["slots"],
                                        cache["workspace"], *step.momentum_buffers], "stream")
        bufs, workspace, plan = module.prograd_sgd(
            *args, cache["workspace"], cache["slots"], cache["stats_f"], cache["stats_b"],
            requested_plan())
        cache["workspace"] = workspace
        if now_capturing:  # what the graph reads and writes outlives any layout change
            keep_for_graphs(cache, cache["stats_f"], cache["stats_b"], cache["slots"],
                            workspace, *bufs)
        cache["plan"] = plan
        if step.momentum != 0:
            step.momentum_buffers[:] = bufs
        return cache["stats"]


BACKEND = CudaBackend()
