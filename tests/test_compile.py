"""ProGradSGD under ``torch.compile`` (CPU): the C++ kernel as a custom op, one graph for
``store_general_grads`` + ``step``, the eager result, nothing printed, no graph break.

Inductor compiles cold in tens of seconds on a small machine: the models are tiny and the
tests marked slow."""

from __future__ import annotations

import warnings

import pytest
import torch

import prograd_fast as pf
from prograd_fast import _ext
from prograd_fast._ops import sgd_step_cpu

pytestmark = pytest.mark.slow

CPP = pytest.mark.skipif(_ext.unavailable_reason("cpu") is not None,
                         reason=f"C++ kernel unavailable: {_ext.unavailable_reason('cpu')}")
SHAPES = ((4, 3), (3,), (2,))  # the last parameter never gets a domain gradient


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]


def _run(backend: str, options: dict, compiled: bool, steps: int = 3):
    """``steps`` of store_general_grads + step; on step 1 one general gradient is missing.
    Returns the parameters, momentum buffers and last statistics."""
    params = _params()
    opt = pf.ProGradSGD(params, backend=backend, **options)

    def fn(general):
        opt.store_general_grads(general)
        opt.step()

    run = torch.compile(fn, fullgraph=True) if compiled else fn
    for s in range(steps):
        gen = torch.Generator().manual_seed(s)
        for p in params[:-1]:
            p.grad = torch.randn(p.shape, generator=gen)
        general = [torch.randn(p.shape, generator=gen) for p in params]
        if s == 1:
            general[1] = None
        run(general)
    bufs = [opt.state[p]["momentum_buffer"] for p in params if "momentum_buffer" in opt.state[p]]
    return [p.detach() for p in params], bufs, opt.stats()[0], opt


OPTIONS = [dict(lr=0.1), dict(lr=0.1, momentum=0.9, weight_decay=0.01),
           dict(lr=torch.tensor(0.05), momentum=0.9, nesterov=True, granularity="tensor"),
           dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True, lam=0.5)]


@CPP
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_compiled_step_on_the_cpp_kernel_equals_eager_exactly(options):
    """fullgraph=True compiles store_general_grads + step, the first step (new momentum
    buffers) included; the same kernel runs, so the result is bit-identical."""
    torch._dynamo.reset()
    eager = _run("cpp", options, compiled=False)
    compiled = _run("cpp", options, compiled=True)
    for want, got in zip(eager[:2], compiled[:2]):
        assert len(want) == len(got)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    for key, value in eager[2].items():
        torch.testing.assert_close(compiled[2][key], value, rtol=0, atol=0)
    assert compiled[3].state_dict()["state"].keys() == eager[3].state_dict()["state"].keys()


def test_compiled_step_on_the_reference_math_equals_eager():
    """backend="torch" traces the reference math, which Inductor fuses: float32 results
    within a few units in the last place (fused multiply-adds, reordered sums; values
    here are of order 1, so 1e-6 is about 8 ulp)."""
    torch._dynamo.reset()
    options = dict(lr=0.1, momentum=0.9, weight_decay=0.01, granularity="tensor")
    eager = _run("torch", options, compiled=False)
    compiled = _run("torch", options, compiled=True)
    for want, got in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compiled_auto_step_follows_the_backend_variable(monkeypatch):
    """PROGRAD_FAST_BACKEND=torch turns "auto" into the reference math in a compiled step
    too (run inside the custom op, eagerly: bit-identical to an eager step)."""
    torch._dynamo.reset()
    monkeypatch.setenv("PROGRAD_FAST_BACKEND", "torch")
    options = dict(lr=0.1, momentum=0.9, nesterov=True)
    eager = _run("auto", options, compiled=False)
    compiled = _run("auto", options, compiled=True)
    assert compiled[3]._backend_cache[0].get("auto_backend") is None  # the eager path never ran
    for want, got in zip(eager[0] + eager[1], compiled[0] + compiled[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@CPP
def test_store_and_step_trace_to_one_graph_holding_the_custom_op():
    """As torch's own SGD.step: one graph, no break, no Dynamo warning (it used to warn it
    could not trace the extension's builtins and give no graph at all)."""
    torch._dynamo.reset()
    params = _params()
    opt = pf.ProGradSGD(params, lr=0.1, momentum=0.9, backend="cpp")
    for p in params:  # a warm eager step: the C host helper is in use afterwards
        p.grad = torch.ones_like(p)
    opt.store_general_grads([torch.ones_like(p) for p in params])
    opt.step()

    def fn(general):
        opt.store_general_grads(general)
        opt.step()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explained = torch._dynamo.explain(fn)([torch.randn(s) for s in SHAPES])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    assert "prograd_fast.sgd_step_cpu" in explained.graphs[0].code
    assert not [w for w in caught if "Dynamo" in str(w.message)]


def test_compiled_training_step_prints_nothing_and_breaks_only_at_backward(capfd):
    """A whole training step compiled: the graph breaks where autograd's backward runs (as
    with any optimizer), never inside prograd_fast, and nothing is printed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    teacher = torch.nn.Linear(6, 3)
    opt = pf.ProGradSGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def train_step(x, y):
        opt.zero_grad()
        ce, kl = pf.prograd_losses(model(x), teacher(x).detach(), y)
        kl.backward(retain_graph=True)
        opt.store_general_grads()
        ce.backward()
        opt.step()
        return ce.detach()

    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(train_step)
        losses = [compiled(x, y) for _ in range(3)]
        explained = torch._dynamo.explain(train_step)(x, y)
    out, err = capfd.readouterr()
    assert not caught and out == "" and err == ""
    assert losses[-1] < losses[0]
    for reason in explained.break_reasons:
        assert "backward" in str(reason.reason)
        assert not any("prograd_fast" in frame.filename for frame in reason.user_stack)


def test_custom_op_passes_torch_library_opcheck():
    """The op's schema, fake (meta) implementation and mutations as torch checks them."""
    if _ext.unavailable_reason("cpu") is not None:
        pytest.skip(f"C++ kernel unavailable: {_ext.unavailable_reason('cpu')}")
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    generals = [torch.randn(SHAPES[0], generator=gen), None, torch.randn(SHAPES[2], generator=gen)]
    bufs = [torch.zeros(s) for s in SHAPES]
    args = (params, grads, generals, bufs, [True, False, True], 0.1, None, 0.9, 0.0, 0.01, False,
            False, 1.0, True, None, None, torch.empty(5), torch.zeros(2, dtype=torch.bool), "cpp")
    torch.library.opcheck(sgd_step_cpu, args)


def test_compiled_step_follows_a_scheduler():
    """A scheduler wraps ``step`` in code Dynamo skips (so no fullgraph, as for torch's SGD);
    the float lr it changes is guarded: every compiled step uses the current lr."""
    torch._dynamo.reset()

    def run(compiled):
        params = _params()
        opt = pf.ProGradSGD(params, lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)

        def fn(general):
            opt.store_general_grads(general)
            opt.step()

        step = torch.compile(fn) if compiled else fn
        for s in range(3):
            gen = torch.Generator().manual_seed(s)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            step([torch.randn(p.shape, generator=gen) for p in params])
            sched.step()
        return [p.detach() for p in params]

    for want, got in zip(run(False), run(True)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
