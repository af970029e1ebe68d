"""The GPU step path's runtime rules, checked on the CPU: the update's chunk order (Triton
interpreter), what a CUDA-graph capture owns and what crosses PCIe while capturing (capture
state and CUDA allocations stubbed), the first step refused under capture, and ``"auto"``
falling back from a fused backend that fails.  The GPU twins are in
tests/test_gpu_step_path.py."""

from __future__ import annotations

import pytest
import torch

from prograd_fast.backends import Backend, GroupStep
from prograd_fast.backends._common import CaptureError
from prograd_fast.backends import triton_backend as tb
from prograd_fast.functional import prograd_sgd

BACKEND = tb.BACKEND
TRITON = BACKEND.available() is None and BACKEND._k.INTERPRET
needs_interpreter = pytest.mark.skipif(
    not TRITON, reason="runs the Triton kernels in the interpreter (CPU tensors)")


# ------------------------------------------------------------ the update's chunk order
def _aliased_group():
    """Two tensors where the first one's domain gradient IS the second parameter: the order
    in which the update writes them shows in the result (no general gradient, no momentum:
    ``p -= lr * d`` per tensor)."""
    store = torch.arange(1.0, 49.0) / 8
    p_a, p_b, d_b = store[0:16], store[16:32], store[32:48]
    return [p_a, p_b], [p_b, d_b], store


@needs_interpreter
@pytest.mark.parametrize("launches", ["one_program", "reduce_update"])
def test_the_update_walks_the_chunks_last_first(launches, monkeypatch):
    k = BACKEND._k
    monkeypatch.setattr(k, "BLOCK", 16)
    monkeypatch.setattr(k, "SMALL_MAX", 32 if launches == "one_program" else 0)
    ps, ds, store = _aliased_group()
    p_a, p_b, d_b = (t.clone() for t in (ps[0], ps[1], ds[1]))
    extra = {}
    BACKEND.step(GroupStep(ps, ds, [None, None], [None, None], lr=0.5, extra=extra))
    assert len(extra["triton_plan"].launchers) == (1 if launches == "one_program" else 2)
    new_b = p_b - 0.5 * d_b           # the last tensor first ...
    new_a = p_a - 0.5 * new_b         # ... then the first one reads it, updated
    assert torch.equal(ps[1], new_b) and torch.equal(ps[0], new_a)


@needs_interpreter
@pytest.mark.parametrize("tiny", [False, True], ids=["tiles", "tiny_tiles"])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_reverse_update_is_exact_on_awkward_sizes(tiny, granularity, monkeypatch):
    """Awkward sizes over many chunks, poisoned new buffers and statistics: every element
    is written once, as the reference computes it."""
    k = BACKEND._k
    if tiny:
        for name, value in (("BLOCK", 16), ("BLOCK_F", 4), ("TBLOCK", 4), ("CBLOCK", 2)):
            monkeypatch.setattr(k, name, value)
    monkeypatch.setattr(k, "SMALL_MAX", 0)
    monkeypatch.setattr(tb, "_new_buffer", lambda p: torch.full_like(p, float("nan")))
    gen = torch.Generator().manual_seed(3)
    shapes = [(37, 3), (1,), (2049,), (0,), (5, 7)]
    ds = [torch.randn(s, generator=gen) for s in shapes]
    gs = [-d * torch.rand(d.shape, generator=gen) for d in ds]
    gs[2] = None
    ps = [torch.randn(s, generator=gen) for s in shapes]
    ref_p = [p.clone() for p in ps]
    bufs, ref_b = [None] * len(ps), [None] * len(ps)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, lam=0.7, granularity=granularity)
    extra = {}
    for _ in range(2):
        if "triton_bufs" in extra:
            extra["triton_bufs"]["stats_f"].fill_(float("nan"))
            extra["triton_bufs"]["partials"].fill_(float("nan"))
        BACKEND.step(GroupStep(ps, ds, gs, bufs, extra=extra, **hyper))
        prograd_sgd(ref_p, ds, gs, ref_b, **hyper)
        for a, b, ba, bb in zip(ps, ref_p, bufs, ref_b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ba, bb, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- the first step refused under capture
def test_a_first_step_with_momentum_is_refused_while_capturing(monkeypatch):
    from prograd_fast.backends import _common

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cuda = torch.device("cuda", 0)
    p = torch.zeros(3)
    first = GroupStep([p], [p], [None], [None], lr=0.1, momentum=0.9)
    with pytest.raises(_common.CaptureError, match="take one eager step before capturing"):
        _common.refuse_first_step_under_capture(first, cuda)
    # buffers made by an eager step, no momentum, or no capture: nothing to refuse
    _common.refuse_first_step_under_capture(
        GroupStep([p], [p], [None], [torch.zeros(3)], lr=0.1, momentum=0.9), cuda)
    _common.refuse_first_step_under_capture(GroupStep([p], [p], [None], [None], lr=0.1), cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    _common.refuse_first_step_under_capture(first, cuda)


def _capture_everywhere(monkeypatch):
    """CPU tensors that count as "being captured" (the device check stubbed)."""
    from prograd_fast.backends import _common

    state = {"on": True}
    monkeypatch.setattr(_common, "capturing", lambda device: state["on"])
    monkeypatch.setattr(tb, "capturing", lambda device: state["on"])
    return state


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_optimizer_refuses_a_captured_first_step_then_captures(backend, monkeypatch):
    import prograd_fast as pf
    from prograd_fast.backends import _common

    if backend == "triton" and not TRITON:
        pytest.skip("the Triton interpreter is not available")
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = pf.ProGradSGD([p], lr=0.1, momentum=0.9, backend=backend)
    p.grad = torch.randn(4, 3)
    opt.store_general_grads([-p.grad])
    capture = _capture_everywhere(monkeypatch)
    before = p.detach().clone()
    with pytest.raises(_common.CaptureError, match="take one eager step before capturing"):
        opt.step()
    assert torch.equal(p.detach(), before) and "momentum_buffer" not in opt.state[p]
    capture["on"] = False
    opt.store_general_grads([-p.grad])
    opt.step()  # the eager step that makes the buffers
    capture["on"] = True
    opt.store_general_grads([-p.grad])
    opt.step()  # now capturable: nothing new to make
    assert opt.state[p]["momentum_buffer"] is not None


def test_the_cuda_backend_refuses_a_captured_first_step(monkeypatch):
    from prograd_fast import _ext
    from prograd_fast.backends import _common
    from prograd_fast.backends import cuda_backend as cb

    calls = []
    monkeypatch.setattr(_ext, "load", lambda kind: calls.append(kind) or pytest.fail("launched"))
    monkeypatch.setattr(_common, "capturing", lambda device: True)
    p = torch.empty(5, device="meta")
    step = GroupStep([p], [torch.empty_like(p)], [None], [None], lr=0.1, momentum=0.9)
    with pytest.raises(_common.CaptureError, match="take one eager step before capturing"):
        cb.CudaBackend().step(step)


# ------------------------------------------------ "auto" falls back from a failing backend
class FailingBackend(Backend):
    """A fused backend that is available but fails when it runs (after making a momentum
    buffer, as a real one does before its launch)."""

    name = "cpp"

    def __init__(self, exc):
        self.exc, self.calls = exc, 0

    def try_step(self, step):
        self.calls += 1
        if step.momentum:
            step.momentum_buffers[:] = [torch.full_like(p, float("nan"))
                                        for p in step.params]
        raise self.exc


def _compile_error():
    import ast

    from triton.compiler.errors import CompilationError

    return CompilationError("x = 1", ast.parse("x = 1").body[0], "unsupported on sm_75")


def _twin_runs(backend, steps=3):
    import prograd_fast as pf

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = pf.ProGradSGD([p], lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        p.grad = torch.randn(6, 5, generator=gen)
        opt.store_general_grads([-p.grad * 0.5 + torch.randn(6, 5, generator=gen)])
        opt.step()
    return p.detach(), opt.state[p]["momentum_buffer"]


@pytest.fixture
def failing(monkeypatch):
    """Install a failing "cpp" (the first CPU choice of "auto"), forget earlier failures."""
    from prograd_fast import backends

    monkeypatch.setattr(backends, "_failed", {})

    def install(exc):
        fake = FailingBackend(exc)
        monkeypatch.setitem(backends._loaded, "cpp", fake)
        monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("cpp", "torch"))
        return fake
    return install


@pytest.mark.parametrize("make_exc", [
    _compile_error,
    lambda: RuntimeError("Error building extension 'prograd_cpu': no compiler"),
    lambda: RuntimeError("CUDA error: no kernel image is available for execution on the "
                         "device"),
    lambda: TypeError("run() takes 12 positional arguments but 13 were given"),
], ids=["triton_compile", "build", "arch", "other_triton_version"])
def test_auto_falls_back_with_one_warning_and_the_same_result(make_exc, failing):
    import warnings

    pytest.importorskip("triton")
    fake = failing(make_exc())
    want_p, want_b = _twin_runs("torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_p, got_b = _twin_runs("auto")
    mine = [w for w in caught if "backend failed on this machine" in str(w.message)
            or "'cpp' backend failed" in str(w.message)]
    assert len(mine) == 1 and "'cpp'" in str(mine[0].message), [str(w.message) for w in caught]
    assert type(make_exc()).__name__ in str(mine[0].message)
    assert fake.calls == 1  # dropped for the rest of the process
    torch.testing.assert_close(got_p, want_p, rtol=0, atol=0)
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=0)


def test_a_named_backend_that_fails_raises_backend_unavailable(failing):
    from prograd_fast.backends import BackendUnavailableError

    pytest.importorskip("triton")
    failing(_compile_error())
    with pytest.raises(BackendUnavailableError, match="'cpp' failed on this machine"):
        _twin_runs("cpp", steps=1)


@pytest.mark.parametrize("exc", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("Triton Error [CUDA]: an illegal address was accessed"),
    getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: unspecified launch failure"),
    CaptureError("take one eager step before capturing"),
    torch.OutOfMemoryError("CUDA out of memory"),
], ids=["illegal_access", "illegal_address", "accelerator_error", "capture", "oom"])
@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_sticky_cuda_errors_and_caller_errors_are_never_swallowed(exc, backend, failing):
    import warnings

    failing(exc)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(type(exc)) as raised:
            _twin_runs(backend, steps=1)
    assert raised.value is exc


def test_accelerator_errors_are_sticky_unless_they_only_refuse_this_device():
    from prograd_fast.backends import is_backend_failure

    accel = getattr(torch, "AcceleratorError", None)
    if accel is None:
        pytest.skip("torch has no AcceleratorError")
    assert not is_backend_failure(accel("CUDA error: misaligned address"))
    assert not is_backend_failure(accel("CUDA error: something new"))
    assert is_backend_failure(accel("CUDA error: invalid device function"))
    assert not is_backend_failure(torch.OutOfMemoryError("CUDA out of memory"))


# ------------------------------------- what a capture on the fast path owns (stubbed capture)
def _group3(seed=0, shapes=((4, 8), (33,), (5,))):
    gen = torch.Generator().manual_seed(seed)
    ds = [torch.randn(s, generator=gen) for s in shapes]
    return ([torch.randn(s, generator=gen) for s in shapes], ds, [-d for d in ds])


@needs_interpreter
def test_a_capture_on_the_fast_path_owns_the_eager_table_and_buffers(monkeypatch):
    """Capture with unchanged addresses (``zero_grad(set_to_none=False)``) reuses the table
    an eager step built: from then on the graph reads it, so a later re-bind must upload a
    new one instead of rewriting it, and a layout change must not free what the graph
    writes."""
    capture = _capture_everywhere(monkeypatch)
    capture["on"] = False
    ps, ds, gs = _group3()
    extra, bufs = {}, [None] * 3

    def step(ds, ps=ps, gs=gs, bufs=bufs):
        BACKEND.step(GroupStep(ps, ds, gs, bufs, lr=0.1, momentum=0.9, extra=extra))

    step(ds)
    step(ds)
    plan = extra["triton_plan"]
    table = plan.meta
    captured_rows = table.clone()
    owned = dict(extra["triton_bufs"])
    capture["on"] = True
    step(ds)  # the fast path, inside a capture
    assert extra["triton_plan"] is plan and plan.meta is table
    kept = {id(t) for t in extra["graph_keep"]}
    for name in ("stats_f", "stats_b", "partials", "counter"):
        assert id(owned[name]) in kept, name
    assert id(table) in kept and all(id(b) in kept for b in bufs)
    capture["on"] = False
    step([d.clone() for d in ds])  # eager, new addresses: a re-bind
    assert extra["triton_plan"].meta is not table
    assert torch.equal(table, captured_rows), "the graph's table was rewritten in place"
    # a new layout: new buffers; the captured ones stay alive with the group
    ps2, ds2, gs2 = _group3(1, shapes=((7,), (9, 2)))
    step(ds2, ps2, gs2, [None, None])
    assert extra["triton_bufs"]["stats_f"] is not owned["stats_f"]
    kept = {id(t) for t in extra["graph_keep"]}
    assert all(id(owned[n]) in kept for n in ("stats_f", "stats_b", "partials", "counter"))


def test_the_cuda_backends_buffers_outlive_a_layout_change_after_a_capture(monkeypatch):
    from prograd_fast import _ext
    from prograd_fast.backends import _common
    from prograd_fast.backends import cuda_backend as cb

    class Module:
        CHUNK = 8

        def prograd_sgd(self, *args):
            bufs = [torch.zeros_like(p) if b is None else b for p, b in zip(args[0], args[3])]
            return bufs, args[15] if args[15] is not None else torch.empty(3), 3

    monkeypatch.setattr(_ext, "load", lambda kind: Module())
    flags = {"on": False}
    monkeypatch.setattr(_common, "capturing", lambda device: flags["on"])
    monkeypatch.setattr(cb, "capturing", lambda device: flags["on"])
    meta = torch.device("meta")
    backend, extra = cb.CudaBackend(), {}

    def step(ps):
        backend.step(GroupStep(ps, [torch.empty_like(p) for p in ps], [None] * len(ps),
                               extra.setdefault("bufs", [None] * len(ps)), lr=0.1,
                               momentum=0.9, extra=extra))

    ps = [torch.empty(20, device=meta), torch.empty(3, device=meta)]
    step(ps)  # eager: the buffers are made here
    cache = extra["cuda"]
    made = [cache[n] for n in ("stats_f", "stats_b", "slots", "workspace")]
    flags["on"] = True
    step(ps)  # captured, same layout: no new buffers, but the graph uses these
    flags["on"] = False
    extra["bufs"] = [None]
    step([torch.empty(50, device=meta)])  # a layout change
    assert extra["cuda"]["stats_f"] is not made[0]
    kept = {id(t) for t in extra["cuda"]["graph_keep"]}
    assert all(id(t) in kept for t in made)


# ---------------------------------------- nothing crosses PCIe per replay (stubbed capture)
def test_a_captured_upload_is_copied_outside_the_graph(monkeypatch):
    """Under capture the table is copied now, on a stream that is not capturing, and waited
    for: no host-to-device copy is recorded into the graph (a replay would repeat it)."""
    import contextlib

    from prograd_fast.backends import _common

    state = {"capturing": False, "events": []}
    monkeypatch.setattr(_common, "capturing", lambda device: state["capturing"])
    monkeypatch.setattr(_common, "_pinned_empty", lambda n, dtype: torch.empty(n, dtype=dtype))
    devices = []
    monkeypatch.setattr(_common, "_device_empty",
                        lambda n, dtype, device: devices.append(torch.empty(n, dtype=dtype))
                        or devices[-1])

    @contextlib.contextmanager
    def outside(device):
        was, state["capturing"] = state["capturing"], False
        state["events"].append("outside")
        yield True
        state["events"].append("waited")
        state["capturing"] = was

    monkeypatch.setattr(_common, "outside_capture", outside)
    captured_copies = []
    original = torch.Tensor.copy_

    def spy(self, src, non_blocking=False):
        if state["capturing"] and any(self is d for d in devices):
            captured_copies.append((self, src))
        return original(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    cuda, extra = torch.device("cuda", 0), {}
    _common.upload([1, 2, 3], torch.int64, cuda, extra, "t")
    spare = extra["t_spare"]
    state["capturing"] = True
    out = _common.upload([4, 5, 6], torch.int64, cuda, extra, "t")
    assert captured_copies == [], "a host-to-device copy was captured into the graph"
    assert state["events"] == ["outside", "waited"] and out.tolist() == [4, 5, 6]
    kept = {id(t) for t in extra["graph_keep"]}
    assert id(out) in kept and id(spare) not in kept  # the graph reads no host memory
    assert extra["t_spare"] is spare  # free again once the copy was waited for


def test_outside_capture_relaxes_the_mode_uses_a_side_stream_and_waits(monkeypatch):
    from prograd_fast.backends import _common

    log = []
    modes = {"now": 0}

    def exchange(mode):
        log.append(("mode", mode))
        old, modes["now"] = modes["now"], mode
        return old

    class Stream:
        def __init__(self, device):
            log.append("new stream")

        def synchronize(self):
            log.append("wait")

    class Use:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            log.append("on side")

        def __exit__(self, *exc):
            log.append("off side")

    monkeypatch.setattr(_common, "_exchange_capture_mode", exchange)
    monkeypatch.setattr(_common, "_side_streams", {})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", Use)
    for _ in range(2):
        with _common.outside_capture(torch.device("cuda", 0)) as outside:
            assert outside and modes["now"] == _common._CU_STREAM_CAPTURE_MODE_RELAXED
            log.append("copy")
    assert modes["now"] == 0
    assert log[:6] == [("mode", 2), "new stream", "on side", "copy", "off side", "wait"]
    assert log.count("new stream") == 1 and log[6] == ("mode", 0)
    monkeypatch.setattr(_common, "_exchange_capture_mode", lambda mode: None)
    with _common.outside_capture(torch.device("cuda", 0)) as outside:
        assert outside is False  # no driver: the caller captures the copy instead


# ------------------------------------------- only addresses changed: rows, not the table
def _helper():
    from prograd_fast import _host

    host = _host.module()
    if host is None:
        pytest.skip("the host helper cannot be built here")
    return host


@needs_interpreter
@pytest.mark.parametrize("shapes", [[(16, 32)], [(4, 8), (33,), (5,), (2, 3)]],
                         ids=["one_tensor", "table"])
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_alternating_general_gradients_rebind_only_the_addresses(shapes, granularity,
                                                                 monkeypatch):
    """A fresh general gradient each step (two buffers alternating): after the first steps
    no full check and no table upload runs, and every step equals the reference."""
    _helper()
    gen = torch.Generator().manual_seed(5)
    ps = [torch.randn(s, generator=gen) for s in shapes]
    ds = [torch.randn(s, generator=gen) for s in shapes]
    sets = [[-0.5 * d + 0.1 * torch.randn(d.shape, generator=gen) for d in ds] for _ in range(2)]
    ref_p = [p.clone() for p in ps]
    bufs, ref_b, extra = [None] * len(ps), [None] * len(ps), {}
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, granularity=granularity)
    checks, uploads = [], []
    full_check, upload = BACKEND._full_check, tb.upload
    monkeypatch.setattr(BACKEND, "_full_check", lambda step: checks.append(1) or full_check(step))
    monkeypatch.setattr(tb, "upload", lambda *a, **kw: uploads.append(1) or upload(*a, **kw))
    for i in range(6):
        if i == 3:
            checks.clear(), uploads.clear()
        gs = sets[i % 2]
        BACKEND.step(GroupStep(ps, ds, gs, bufs, extra=extra, **hyper))
        prograd_sgd(ref_p, ds, gs, ref_b, **hyper)
        for a, b in zip(ps + bufs, ref_p + ref_b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert checks == [] and uploads == [], "an address-only change ran the full rebuild"


@needs_interpreter
def test_an_address_change_that_breaks_alignment_or_the_structure_is_checked(monkeypatch):
    _helper()
    gen = torch.Generator().manual_seed(6)
    shapes = [(4, 8), (33,)]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    ds = [torch.randn(s, generator=gen) for s in shapes]
    gs = [-d for d in ds]
    ref_p = [p.clone() for p in ps]
    bufs, ref_b, extra = [None, None], [None, None], {}

    def step(gs):
        BACKEND.step(GroupStep(ps, ds, gs, bufs, lr=0.1, momentum=0.9, extra=extra))
        prograd_sgd(ref_p, ds, gs, ref_b, lr=0.1, momentum=0.9)
        for a, b in zip(ps, ref_p):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    step(gs)
    step(gs)
    # one element off 16-byte alignment: the row's aligned bit goes, the result holds
    odd = torch.empty(34)[1:].copy_(-ds[1])
    step([gs[0], odd])
    rows = extra["triton_plan"].meta.view(-1)
    assert int(rows[BACKEND._k.ROW + 7]) & BACKEND._k.BIT_ALIGNED == 0
    step(gs)
    assert int(rows[BACKEND._k.ROW + 7]) & BACKEND._k.BIT_ALIGNED
    # a dtype the plan was not checked for: the full check refuses it
    reason = BACKEND.try_step(GroupStep(ps, ds, [gs[0], gs[1].double()], bufs, lr=0.1,
                                        momentum=0.9, extra=extra))
    assert isinstance(reason, str) and "dtype" in reason


def test_auto_on_a_gpu_says_once_that_a_fused_backend_cannot_be_built(failing, monkeypatch):
    """On a GPU, a fused backend that "auto" reaches but cannot build or load (no compiler)
    is named once, with the reason; the step runs on the next backend."""
    import warnings

    from prograd_fast import backends

    fake = failing(RuntimeError("never launched"))
    fake.available = lambda: "building the extension failed: nvcc not found"
    monkeypatch.setattr(backends, "_WARN_UNAVAILABLE_ON", frozenset({"cpu"}))
    want_p, _ = _twin_runs("torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_p, _ = _twin_runs("auto")
    mine = [str(w.message) for w in caught if "'cpp' backend failed" in str(w.message)]
    assert len(mine) == 1 and "nvcc not found" in mine[0]
    assert fake.calls == 0
    torch.testing.assert_close(got_p, want_p, rtol=0, atol=0)


def test_auto_never_retries_a_backend_that_failed(failing):
    """A backend recorded as failed in this process is skipped by "auto" (not even tried)."""
    from prograd_fast import backends

    pytest.importorskip("triton")
    fake = failing(_compile_error())
    backends._failed["cpp"] = "CompilationError: unsupported on sm_75"
    p = torch.zeros(3)
    step = GroupStep([p], [torch.ones(3)], [None], [None], lr=0.1)
    backends.run_step("auto", step)
    assert fake.calls == 0 and step.extra["auto_backend"] == "torch"
    torch.testing.assert_close(p, torch.full((3,), -0.1))


class DocstringBackend(Backend):
    """A backend written to ``Backend``'s docstring alone: a name and ``step``."""

    name = "cpp"
    fused = False

    def __init__(self):
        self.steps = 0

    def step(self, step):
        from prograd_fast.functional import prograd_sgd

        self.steps += 1
        return prograd_sgd(step.params, step.grads, step.general_grads, step.momentum_buffers,
                           **step.hyper())


@pytest.mark.parametrize("name", ["cpp", "auto"])
def test_a_backend_written_to_the_docstring_runs_through_the_optimizer(name, monkeypatch):
    """Named, and as "auto"'s first CPU choice: it runs every step, with the reference's
    result (momentum buffers it makes land in the optimizer's state)."""
    from prograd_fast import backends

    mine = DocstringBackend()
    monkeypatch.delenv("PROGRAD_FAST_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_failed", {})
    monkeypatch.setitem(backends._loaded, "cpp", mine)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("cpp", "torch"))
    got_p, got_buf = _twin_runs(name)
    want_p, want_buf = _twin_runs("torch")
    assert mine.steps == 3
    torch.testing.assert_close(got_p, want_p, rtol=0, atol=0)
    torch.testing.assert_close(got_buf, want_buf, rtol=0, atol=0)
