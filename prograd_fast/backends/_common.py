"""Helpers shared by the kernel backends."""

from __future__ import annotations

from typing import Callable

from ..functional import GRANULARITIES


def cached_problem(step, tag: str, check: Callable) -> str | None:
    """``check(step)`` (why the group cannot run, or None), cached per group: the same tensor
    objects as last step give the same answer (the kernels re-check devices, dtypes and
    shapes anyway)."""
    if step.granularity not in GRANULARITIES:
        return f"unknown granularity {step.granularity!r}"
    key = tuple(map(id, step.params)) + tuple(map(id, step.grads)) + \
        tuple(map(id, step.general_grads)) + tuple(map(id, step.momentum_buffers))
    cached = step.extra.get(tag)
    if cached is not None and cached[0] == key:
        return cached[1]
    problem = check(step)
    step.extra[tag] = (key, problem)
    return problem
