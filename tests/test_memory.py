"""Memory: after the first step a step keeps nothing new alive (no growth), and the
optimizer holds at most the momentum buffers plus one general-gradient buffer (plus a few
bytes of statistics / launch tables).  Measured on the CPU by tracking every storage the
step allocates (a TorchDispatchMode sees allocations made from C++ too).

``python tests/test_memory.py`` prints the numbers quoted in docs/hardening.md."""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import prograd_fast as pf  # noqa: E402
from hardening_cases import backends_here  # noqa: E402

BACKENDS = backends_here("cpu")
SHAPES = [(16, 512), (7,), (33, 5), (1000,)]  # CoOp context + awkward extras
SMALL_OVERHEAD = 4096 + 64 * len(SHAPES)  # stats, tables, tickets (bytes)


class AllocTracker(TorchDispatchMode):
    """Weak references to every new storage created by an op, and the peak of their sum."""

    def __init__(self, known=()):
        super().__init__()
        self.refs: list[tuple[StorageWeakRef, int]] = []
        self.cdatas: set[int] = set()
        # storages that existed before (the Triton interpreter re-wraps them without inputs)
        self.known = {t.untyped_storage().data_ptr() for t in known if t is not None}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {}))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            if s.data_ptr() in inputs or s.data_ptr() in self.known or not s.nbytes():
                continue
            ref = StorageWeakRef(s)
            if ref.cdata not in self.cdatas:
                self.cdatas.add(ref.cdata)
                self.refs.append((ref, s.nbytes()))
        self.peak = max(self.peak, self.alive())
        return out

    def alive(self) -> int:
        return sum(n for ref, n in self.refs if not ref.expired())


def held_tensors(opt) -> list[torch.Tensor]:
    """Tensors reachable from the optimizer (state, backend caches, stats)."""
    found = []

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("prograd_fast"):
            visit(vars(obj))

    visit(dict(opt.state))
    visit(getattr(opt, "_backend_cache", []))
    visit(getattr(opt, "_stats", []))
    return found


def held_bytes(opt) -> int:
    """Bytes of the distinct storages reachable from the optimizer."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in held_tensors(opt) if t.device.type != "meta"}
    return sum(storages.values())


def measure(backend: str, steps: int = 5, momentum: float = 0.9, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    general = [(-d.float() + 0.5 * torch.randn(s, generator=gen)).to(dtype)
               for d, s in zip(grads, SHAPES)]
    opt = pf.ProGradSGD(params, lr=0.01, momentum=momentum, backend=backend)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    out = dict(backend=backend, param_bytes=param_bytes, retained=[], retained2=[], held=[],
               peak=[], held_with_general=None)
    for p, d in zip(params, grads):
        p.grad = d
    previous = earlier = None
    for k in range(steps):
        opt.store_general_grads([g.clone() for g in general])
        if k == 1:
            out["held_with_general"] = held_bytes(opt)
        tracker = AllocTracker(params + grads + held_tensors(opt))
        with tracker:
            opt.step()
        gc.collect()  # the dispatch mode itself builds reference cycles (see the test below)
        if previous is not None:
            out["retained"].append(previous.alive())  # from the step before
        if earlier is not None:
            out["retained2"].append(earlier.alive())  # from two steps before
        out["held"].append(held_bytes(opt))
        out["peak"].append(tracker.peak)
        previous, earlier = tracker, previous
    return out


@pytest.fixture(scope="module", params=BACKENDS)
def numbers(request):
    return measure(request.param)


def test_no_growth_after_the_first_step(numbers):
    # what step k allocated is gone after step k+1 (stats are replaced, not accumulated);
    assert numbers["retained"][1:] == [0] * (len(numbers["retained"]) - 1), numbers
    assert numbers["retained2"][1:] == [0] * (len(numbers["retained2"]) - 1), numbers
    # ...and what the optimizer holds stops changing after the first step
    assert len(set(numbers["held"][1:])) == 1, numbers


def test_extra_memory_is_momentum_plus_one_general_buffer(numbers):
    params = numbers["param_bytes"]
    assert params <= numbers["held"][-1] <= params + SMALL_OVERHEAD, numbers
    assert numbers["held_with_general"] <= 2 * params + SMALL_OVERHEAD, numbers


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_fused_backends_allocate_little_per_step(backend):
    """After the first step the fused backends' step needs no parameter-sized scratch."""
    n = measure(backend, steps=3)
    assert max(n["peak"][1:]) <= SMALL_OVERHEAD, n


def test_without_momentum_nothing_parameter_sized_is_kept():
    n = measure("torch", steps=3, momentum=0.0)
    assert n["held"][-1] <= SMALL_OVERHEAD, n


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_stats_are_freed_at_once_without_gc(backend):
    """No reference cycles in the step: the previous step's statistics die when replaced."""
    params = [torch.nn.Parameter(torch.randn(5))]
    params[0].grad = torch.randn(5)
    opt = pf.ProGradSGD(params, lr=0.01, momentum=0.9, backend=backend)
    refs = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(4):
            opt.store_general_grads([torch.randn(5)])
            opt.step()
            refs.append(StorageWeakRef(opt.stats()[0]["coef"].untyped_storage()))
    finally:
        if enabled:
            gc.enable()
    shared = backend in ("triton", "cpp")  # stats: views of buffers the group keeps
    assert [r.expired() for r in refs[:-1]] == [not shared] * 3


def test_tracker_sees_allocations():
    """Guard for the tracker itself: a kept clone is seen and counted."""
    x = torch.randn(1000)
    with AllocTracker() as tracker:
        y = x.clone()
    assert tracker.alive() == 4000 and tracker.peak >= 4000
    del y
    assert tracker.alive() == 0


if __name__ == "__main__":
    print(f"shapes {SHAPES}, fp32, momentum 0.9")
    print("| backend | params (B) | held after step (B) | held with pending general grads (B) "
          "| peak transient, step 1 / later (B) |")
    print("|---|---|---|---|---|")
    for name in BACKENDS:
        n = measure(name)
        print(f"| {name} | {n['param_bytes']} | {n['held'][-1]} | {n['held_with_general']} | "
              f"{n['peak'][0]} / {max(n['peak'][1:])} |")
