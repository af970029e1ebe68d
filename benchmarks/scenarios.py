"""The optimizer-step scenarios of DESIGN.md section 2, at GPU size and CPU-scaled size.

Each scenario is a list of parameter shapes (one parameter group).  On CUDA the real sizes
run; on a CPU the two dense scenarios shrink so the suite finishes in minutes (the small and
medium ones keep their real size: they are cheap on a CPU too).  The scale is chosen by the
environment variable ``PROGRAD_BENCH_SCALE``:

``auto`` (default)  ``full`` on CUDA, ``cpu`` on a CPU
``full``            the sizes of DESIGN.md section 2 everywhere (needs ~16 GiB for dense256M)
``cpu``             the CPU-scaled sizes
``tiny``            a few thousand elements per scenario: smoke tests, never numbers
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

__all__ = [
    "HYPER",
    "SCALES",
    "Scenario",
    "active_scale",
    "bench_device",
    "bench_dtype",
    "bench_granularity",
    "bytes_per_step",
    "maple_shapes",
    "scenarios",
]

# The hyper-parameters of the ProGrad paper's CoOp runs (SGD, lr 0.002, momentum 0.9,
# weight decay 5e-4, lambda 1).
HYPER = dict(lr=0.002, momentum=0.9, weight_decay=5e-4, lam=1.0)
SCALES = ("auto", "full", "cpu", "tiny")


@dataclass(frozen=True)
class Scenario:
    """One parameter group: a name stable across scales, its shapes and what it models."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    about: str

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    def __str__(self) -> str:  # the pytest id
        return self.name


def maple_shapes(n_ctx: int = 2, depth: int = 9, text_dim: int = 512,
                 vision_dim: int = 768) -> tuple[tuple[int, ...], ...]:
    """MaPLe's learnable tensors for ViT-B/16: the text context, ``depth - 1`` deeper text
    prompts and ``depth`` text->vision projections (weight and bias each): 27 tensors and
    3.56M elements with the defaults."""
    shapes = [(n_ctx, text_dim)]
    shapes += [(n_ctx, text_dim)] * (depth - 1)
    for _ in range(depth):
        shapes += [(vision_dim, text_dim), (vision_dim,)]
    return tuple(shapes)


_FULL = (
    Scenario("coop", ((16, 512),), "CoOp context: one 16x512 tensor (launch-bound)"),
    Scenario("maple", maple_shapes(), "MaPLe-like deep prompts: 27 tensors, 3.6M elements"),
    Scenario("classctx", ((1000, 16, 512),), "class-specific context, 1000 classes: 8.2M"),
    Scenario("dense64M", ((64 * 2**20,),), "dense 64M elements (bandwidth-bound)"),
    Scenario("dense256M", ((256 * 2**20,),), "dense 256M elements (bandwidth-bound)"),
)

# CPU: the dense groups shrink (a 2-core machine moves ~10-50 GB/s, and dense256M needs
# ~10 GiB with the peers' temporaries); the rest keep their real sizes.
_CPU = _FULL[:3] + (
    Scenario("dense64M", ((16 * 2**20,),), "dense64M scaled to 16M elements on a CPU"),
    Scenario("dense256M", ((32 * 2**20,),), "dense256M scaled to 32M elements on a CPU"),
)

# Smoke tests: same structure (tensor counts), a few thousand elements, awkward sizes.
_TINY = (
    Scenario("coop", ((4, 33),), "tiny CoOp"),
    Scenario("maple", maple_shapes(n_ctx=2, depth=3, text_dim=17, vision_dim=13), "tiny MaPLe"),
    Scenario("classctx", ((7, 4, 33),), "tiny class-specific context"),
    Scenario("dense64M", ((4099,),), "tiny dense"),
    Scenario("dense256M", ((8191,),), "tiny dense"),
)


def bench_device() -> torch.device:
    """``PROGRAD_BENCH_DEVICE`` if set, else CUDA when available, else the CPU."""
    name = os.environ.get("PROGRAD_BENCH_DEVICE", "").strip()
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def active_scale(device: torch.device | None = None) -> str:
    """The scale in force (``full``, ``cpu`` or ``tiny``) for ``device``."""
    scale = os.environ.get("PROGRAD_BENCH_SCALE", "auto").strip() or "auto"
    if scale not in SCALES:
        raise ValueError(f"PROGRAD_BENCH_SCALE must be one of {SCALES}, got {scale!r}")
    if scale == "auto":
        device = device or bench_device()
        scale = "full" if device.type == "cuda" else "cpu"
    return scale


def scenarios(scale: str | None = None) -> tuple[Scenario, ...]:
    """The scenarios at ``scale`` (default: :func:`active_scale`)."""
    scale = scale or active_scale()
    return {"full": _FULL, "cpu": _CPU, "tiny": _TINY}[scale]


def bench_dtype() -> torch.dtype:
    """``PROGRAD_BENCH_DTYPE`` (float32 default, float16, bfloat16): the parameters' and
    gradients' dtype."""
    name = os.environ.get("PROGRAD_BENCH_DTYPE", "float32").strip() or "float32"
    dtype = getattr(torch, name, None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"PROGRAD_BENCH_DTYPE must be float32, float16 or bfloat16, got {name!r}")
    return dtype


def bench_granularity() -> str:
    """``PROGRAD_BENCH_GRANULARITY``: ``tensor`` (default; what the official per-tensor loop
    computes, so every implementation does the same math) or ``global`` (the paper)."""
    value = os.environ.get("PROGRAD_BENCH_GRANULARITY", "tensor").strip() or "tensor"
    if value not in ("tensor", "global"):
        raise ValueError(f"PROGRAD_BENCH_GRANULARITY must be tensor or global, got {value!r}")
    return value


def bytes_per_step(elements: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a fused two-pass step moves: the reduction reads ``d, g``; the update reads
    ``d, g, p, buf`` and writes ``p, buf``: 8 element-sized accesses (32 B per fp32 element)."""
    return 8 * elements * torch.empty((), dtype=dtype).element_size()
