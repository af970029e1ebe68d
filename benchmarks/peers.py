"""The implementations an optimizer step is benchmarked across, behind one small interface.

Each implementation owns one parameter group (a :class:`Problem`) and exposes ``step()``
(one full optimizer step, as a training loop would call it between the backward passes and
the next forward) and ``momentum_buffers()``.  Gradients are fixed tensors that no
implementation may modify, so every round of a benchmark does the same work.

``paper_style``   the official ProGrad loop: clone the general gradients, per tensor a Python
                  ``if`` on ``cos < 0`` (a host synchronisation each), ``p.grad`` replaced,
                  then ``torch.optim.SGD`` with torch's default dispatch (as Dassl builds it).
``foreach``       a careful no-sync PyTorch version: per-tensor dots, ``torch._foreach_norm``,
                  the conflict as a ``torch.where`` mask, ``torch._foreach_*`` projection, then
                  ``torch.optim.SGD(foreach=True)``.
``compile``       ``torch.compile`` of the pure-PyTorch reference step
                  (``prograd_fast.functional.prograd_sgd``); compile time measured apart.
``torch_sgd``     ``torch.optim.SGD`` alone on the domain gradient (no ProGrad): the cost a
                  user already pays (``fused=True``, torch's fastest, on CUDA and on a CPU;
                  ``foreach`` where fused is not supported).
``prograd_fast-<backend>``  ``ProGradSGD(backend=...)`` with ``store_general_grads`` + ``step``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

import prograd_fast
from prograd_fast.backends import BACKENDS, BackendUnavailableError
from prograd_fast.functional import prograd_sgd

__all__ = [
    "PEERS",
    "Implementation",
    "Problem",
    "Unavailable",
    "build",
    "disagreement",
    "implementation_names",
    "make_problem",
    "reference_state",
    "synchronize",
]


class Unavailable(RuntimeError):
    """This implementation cannot run here; the message says why (benchmarks skip on it)."""


@dataclass
class Problem:
    """One parameter group with fixed domain (``d``) and general (``g``) gradients."""

    params: list[Tensor]
    domain: list[Tensor]
    general: list[Tensor]
    granularity: str = "tensor"
    hyper: dict = field(default_factory=lambda: dict(lr=0.002, momentum=0.9, weight_decay=5e-4,
                                                     lam=1.0))

    @property
    def device(self) -> torch.device:
        return self.params[0].device


def make_problem(shapes, device, dtype=torch.float32, granularity: str = "tensor",
                 seed: int = 0, conflict: str = "all", hyper: dict | None = None) -> Problem:
    """Random parameters and gradients of ``shapes``.

    ``d = x_perp + s * g / 2`` with ``x_perp`` a random vector made orthogonal to ``g``, so
    ``<d, g> = s ||g||^2 / 2`` has the sign ``s`` for sure.  ``conflict="all"``: ``s = -1``
    everywhere, so every implementation takes the projection path that ProGrad exists for.
    ``"mixed"``: tensors alternate between conflicting and aligned, for correctness tests.
    Setup only: this reads values on the host.
    """
    if conflict not in ("all", "mixed"):
        raise ValueError(f"conflict must be 'all' or 'mixed', got {conflict!r}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    params, domain, general = [], [], []
    for i, shape in enumerate(shapes):
        p = torch.randn(shape, generator=gen, device=device)
        g = torch.randn(shape, generator=gen, device=device)
        x = torch.randn(shape, generator=gen, device=device)
        sign = 1.0 if (conflict == "mixed" and i % 2 == 1) else -1.0
        xf, gf = x.reshape(-1), g.reshape(-1)
        along = float(torch.dot(xf, gf) / torch.dot(gf, gf))
        d = x.add_(g, alpha=0.5 * sign - along)
        params.append(p.to(dtype))
        domain.append(d.to(dtype))
        general.append(g.to(dtype))
        del p, g, x, d
    problem = Problem(params, domain, general, granularity)
    if hyper:
        problem.hyper.update(hyper)
    return problem


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Implementation:
    """Base: ``step()`` runs one optimizer step; ``info`` goes to the benchmark's extra_info.

    ``setup_steps``: steps already taken when construction returns; ``projects``: whether it
    computes ProGrad (False: plain SGD); :attr:`granularity`: the projection it computes.
    """

    name = "?"
    setup_steps = 0
    projects = True

    @property
    def granularity(self) -> str:
        return self.problem.granularity

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.info: dict = {}

    def step(self) -> None:
        raise NotImplementedError

    def momentum_buffers(self) -> list[Tensor | None]:
        raise NotImplementedError


class _TorchOptimizerMixin:
    opt: torch.optim.Optimizer

    def momentum_buffers(self) -> list[Tensor | None]:
        return [self.opt.state[p].get("momentum_buffer") for p in self.problem.params]


def _sgd(params: list[Tensor], hyper: dict, **dispatch) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=hyper["lr"], momentum=hyper["momentum"],
                           weight_decay=hyper["weight_decay"], **dispatch)


class PaperStyle(_TorchOptimizerMixin, Implementation):
    """The official ProGrad trainer's update, tensor by tensor, with its host syncs."""

    name = "paper_style"

    @property
    def granularity(self) -> str:
        return "tensor"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        if problem.granularity != "tensor":
            self.info["note"] = "always per tensor (the official loop)"
        self.opt = _sgd(problem.params, problem.hyper)  # torch's default dispatch, as Dassl
        self.info["sgd"] = "torch default dispatch"

    def step(self) -> None:
        pb, lam = self.problem, self.problem.hyper["lam"]
        # After the general backward the official loop clones every .grad before zeroing.
        b_grads = [g.clone() for g in pb.general]
        for p, d, b_grad in zip(pb.params, pb.domain, b_grads):
            b_unit = b_grad / torch.linalg.norm(b_grad)
            a_grad = d.clone()
            a_unit = a_grad / torch.linalg.norm(a_grad)
            p.grad = d
            if torch.dot(a_unit.flatten(), b_unit.flatten()) < 0:  # host sync, by design
                p.grad = a_grad - lam * torch.dot(a_grad.flatten(), b_unit.flatten()) * b_unit
        self.opt.step()


class ForeachNoSync(_TorchOptimizerMixin, Implementation):
    """No host sync: device-side conflict mask and ``torch._foreach_*`` ops, foreach SGD."""

    name = "foreach"

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.opt = _sgd(problem.params, problem.hyper, foreach=True)

    def step(self) -> None:
        pb, lam = self.problem, self.problem.hyper["lam"]
        ds, gs = pb.domain, pb.general
        acc = torch.float64 if ds[0].dtype == torch.float64 else torch.float32
        # Half-precision sums overflow past 65504: reductions accumulate and return in fp32.
        up = (lambda t: t.reshape(-1)) if ds[0].dtype == acc else (lambda t: t.reshape(-1).to(acc))
        dots = torch.stack([torch.dot(up(d), up(g)) for d, g in zip(ds, gs)])
        nns = torch.stack(torch._foreach_norm(gs, dtype=acc)).square()
        if pb.granularity == "global":
            dots, nns = dots.sum(), nns.sum()
        conflict = (dots < 0) & (nns > 0)
        coef = torch.where(conflict, lam * dots / torch.where(conflict, nns, 1.0), 0.0)
        scale = coef if pb.granularity == "global" else list(coef.unbind())
        us = torch._foreach_sub(ds, torch._foreach_mul(gs, scale))
        for p, u in zip(pb.params, us):
            p.grad = u
        self.opt.step()


class Compiled(Implementation):
    """``torch.compile`` of the reference step; the first (compiling) call is timed apart."""

    name = "compile"
    setup_steps = 2  # one eager step (creates buffers), one compiling step

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        hyper = dict(problem.hyper)
        lam = hyper.pop("lam")
        granularity = problem.granularity
        self._bufs: list[Tensor | None] = [None] * len(problem.params)

        def reference_step(params, grads, generals, bufs):
            prograd_sgd(params, grads, generals, bufs, lam=lam, granularity=granularity, **hyper)

        # The first step creates the momentum buffers (eager: a different program); the
        # compiled function then runs the steady state, where buffers exist.
        reference_step(problem.params, problem.domain, problem.general, self._bufs)
        torch._dynamo.reset()  # no in-memory cache from another scenario: honest compile time
        self._fn = torch.compile(reference_step)
        start = time.perf_counter()
        try:
            self._fn(problem.params, problem.domain, problem.general, self._bufs)
            synchronize(problem.device)
        except Exception as exc:  # no working compiler toolchain here, etc.
            raise Unavailable(f"torch.compile failed: {type(exc).__name__}: {exc}") from exc
        self.info["compile_s"] = time.perf_counter() - start

    def step(self) -> None:
        pb = self.problem
        self._fn(pb.params, pb.domain, pb.general, self._bufs)

    def momentum_buffers(self) -> list[Tensor | None]:
        return list(self._bufs)


class TorchSGD(_TorchOptimizerMixin, Implementation):
    """``torch.optim.SGD`` on the domain gradient only: no ProGrad at all (the floor)."""

    name = "torch_sgd"
    projects = False

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        try:  # torch >= 2.4 has fused SGD on CPUs too: 8x foreach at 33M elements here
            self.opt = _sgd(problem.params, problem.hyper, fused=True)
            self.info["sgd"] = "fused"
        except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
            self.opt = _sgd(problem.params, problem.hyper, foreach=True)
            self.info["sgd"] = "foreach"
        for p, d in zip(problem.params, problem.domain):
            p.grad = d

    def step(self) -> None:
        self.opt.step()


class ProGradFast(Implementation):
    """``ProGradSGD`` on one named backend, as a user calls it every step."""

    def __init__(self, problem: Problem, backend: str) -> None:
        super().__init__(problem)
        self.name = f"prograd_fast-{backend}"
        reason = prograd_fast.available_backends().get(backend, f"unknown backend {backend!r}")
        if reason is None and backend == "triton" and problem.device.type != "cuda":
            reason = "Triton runs only in its interpreter on a CPU: not a benchmark"
        if reason is not None:
            raise Unavailable(f"backend {backend!r}: {reason}")
        h = problem.hyper
        self.opt = prograd_fast.ProGradSGD(
            problem.params, lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"],
            lam=h["lam"], granularity=problem.granularity, backend=backend)
        for p, d in zip(problem.params, problem.domain):
            p.grad = d

    def step(self) -> None:
        self.opt.store_general_grads(self.problem.general)
        try:
            self.opt.step()
        except BackendUnavailableError as exc:
            raise Unavailable(str(exc)) from exc

    def momentum_buffers(self) -> list[Tensor | None]:
        return [self.opt.state[p].get("momentum_buffer") for p in self.problem.params]


def reference_state(problem: Problem, steps: int, granularity: str | None = None,
                    project: bool = True, dtype: torch.dtype = torch.float64,
                    ) -> tuple[list[Tensor], list[Tensor | None]]:
    """Parameters and momentum buffers after ``steps`` steps of the pure-PyTorch reference,
    computed in ``dtype`` (float64: free of fp32 reduction error) on a copy of ``problem``."""
    hyper = dict(problem.hyper)
    lam = hyper.pop("lam")
    params = [p.detach().to(dtype, copy=True) for p in problem.params]
    domain = [d.to(dtype) for d in problem.domain]
    generals = [g.to(dtype) for g in problem.general] if project else [None] * len(params)
    bufs: list[Tensor | None] = [None] * len(params)
    for _ in range(steps):
        prograd_sgd(params, domain, generals, bufs, lam=lam,
                    granularity=granularity or problem.granularity, **hyper)
    return params, bufs


def disagreement(implementation: Implementation, expected, rtol: float, atol: float,
                 coef_tol: float = 0.05) -> str | None:
    """Why ``implementation``'s parameters and buffers differ from ``expected`` (float64
    reference), or None when they agree.

    Agreement allows (a) elementwise rounding within ``atol + rtol*|expected|`` and (b) per
    tensor a multiple of the general gradient ``g`` up to ``coef_tol``: summing millions of
    fp32 products in a different order moves the projection coefficient by up to ~1e-3
    relative (torch's own CPU reductions do), which shifts every element along ``g``.  An
    unwritten tail, a missing term or a wrong coefficient does not fit that pattern.
    Reads device values: call it in setup, never in a timed step.
    """
    exp_params, exp_bufs = expected
    got_bufs = implementation.momentum_buffers()
    pairs = [("param", implementation.problem.params, exp_params), ("buffer", got_bufs, exp_bufs)]
    for i, g in enumerate(implementation.problem.general):
        g32 = g.detach().reshape(-1).float()  # fp32 is plenty for a check of this resolution
        gg = float(g32 @ g32)
        for what, got_list, exp_list in pairs:
            got, want = got_list[i], exp_list[i]
            if got is None or want is None:
                if (got is None) != (want is None):
                    return f"{what} {i}: {'missing' if got is None else 'unexpected'} buffer"
                continue
            want = want.detach().reshape(-1).float()
            r = got.detach().reshape(-1).float() - want
            alpha = float(r @ g32) / gg if gg > 0 else 0.0
            if not abs(alpha) <= coef_tol:
                return f"{what} {i}: off by {alpha:.3g} x the general gradient"
            rest = (r.sub_(g32, alpha=alpha)).abs_()
            bad = ~(rest <= atol + rtol * want.abs())
            if bool(bad.any()):
                return (f"{what} {i}: {int(bad.sum())} of {bad.numel()} elements differ, "
                        f"up to {float(rest.nan_to_num(float('inf')).max()):.3g}")
    return None


# Cheapest to set up first; ``compile`` last: its cold Inductor compile takes seconds to
# minutes, so a time-boxed run (device_check.sh) loses only it when time runs out.
PEERS: dict[str, Callable[[Problem], Implementation]] = {
    "paper_style": PaperStyle,
    "foreach": ForeachNoSync,
    "torch_sgd": TorchSGD,
    "compile": Compiled,
}


def implementation_names() -> list[str]:
    """Every implementation id: the peers, then ``prograd_fast-<backend>`` for each backend
    the package knows (availability is decided when one is built, with a reason)."""
    return list(PEERS) + [f"prograd_fast-{b}" for b in BACKENDS]


def build(name: str, problem: Problem) -> Implementation:
    """The implementation called ``name`` on ``problem``; :class:`Unavailable` if it cannot run."""
    if name in PEERS:
        return PEERS[name](problem)
    prefix = "prograd_fast-"
    if name.startswith(prefix) and name[len(prefix):] in BACKENDS:
        return ProGradFast(problem, name[len(prefix):])
    raise ValueError(f"unknown implementation {name!r}; choose from {implementation_names()}")
