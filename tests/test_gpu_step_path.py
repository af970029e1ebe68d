"""The GPU step path on a CUDA device (issue 10); every test skips cleanly without one.

CUDA-graph capture of multi-tensor groups after ``zero_grad(set_to_none=True)`` replayed
against eager, a tensor lr steered by a scheduler through replays, the cooperative launch's
fallback when refused, buffers warmed up on a side stream, no allocation after the first
step, the prepared Triton launcher, AMP and ``torch.compile``.  ``benchmarks/device_check.sh``
runs this file first on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

import prograd_fast as pf
from prograd_fast.amp import ProGradGradScaler
from prograd_fast.backends import GroupStep, get_backend

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

GPU_BACKENDS = [name for name in ("triton", "cuda") if get_backend(name).available() is None]
if not GPU_BACKENDS:
    pytest.skip("no CUDA backend can run here: " + "; ".join(
        f"{n}: {get_backend(n).available()}" for n in ("triton", "cuda")), allow_module_level=True)
DEV = "cuda"
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, lam=1.0)


class Net(torch.nn.Module):
    """Four parameter tensors (awkward sizes): a multi-tensor group; ``hidden=17`` keeps it
    under 16K elements (one Triton program, the CUDA single block), ``hidden=700`` takes the
    reduce + update launches (Triton ticket, CUDA two-pass or cooperative)."""

    def __init__(self, hidden=17):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(33, hidden)
        self.b = torch.nn.Linear(hidden, 5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def batches(n, seed=1, rows=32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 33, generator=g).to(DEV),
             torch.randint(0, 5, (rows,), generator=g).to(DEV),
             (3 * torch.randn(rows, 5, generator=g)).to(DEV)) for _ in range(n)]


def train_step(model, opt, x, y, zs):
    ce, kl = pf.prograd_losses(model(x), zs, y)
    pf.backward(opt, ce, kl)
    opt.step()


def twins(backend, hidden=17, **hyper):
    models = [Net(hidden).to(DEV), Net(hidden).to(DEV)]
    opts = [pf.ProGradSGD(m.parameters(), backend=backend, **{**HYPER, **hyper}) for m in models]
    return models, opts


def assert_same_params(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def capture(model, opt, static, warmup_batches, scheduler=None):
    """The standard pattern: warm up on a side stream, zero_grad(set_to_none=True), capture
    forward + both backward passes + step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y, zs in warmup_batches:
            opt.zero_grad(set_to_none=True)
            train_step(model, opt, x, y, zs)
            if scheduler is not None:
                scheduler.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        train_step(model, opt, *static)
    return graph


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("granularity", ["global", "tensor"])
@pytest.mark.parametrize("hidden", [17, 700], ids=["one_launch", "two_launches"])
def test_capture_after_set_to_none_replays_like_eager(backend, granularity, hidden):
    (eager, graphed), (opt_e, opt_g) = twins(backend, hidden, granularity=granularity)
    data = batches(8)
    warm, rest = data[:3], data[3:]
    static = tuple(t.clone() for t in rest[0])
    graph = capture(graphed, opt_g, static, warm)
    for x, y, zs in warm:
        opt_e.zero_grad(set_to_none=True)
        train_step(eager, opt_e, x, y, zs)
    for x, y, zs in rest:
        for s, t in zip(static, (x, y, zs)):
            s.copy_(t)
        graph.replay()
        opt_e.zero_grad(set_to_none=True)
        train_step(eager, opt_e, x, y, zs)
    torch.cuda.synchronize()
    assert_same_params(eager, graphed)
    for a, b in zip(opt_e.stats(), opt_g.stats()):
        torch.testing.assert_close(a["coef"], b["coef"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensor_lr_and_scheduler_steer_the_replays(backend):
    (eager, graphed), (opt_e, opt_g) = twins(backend, lr=torch.tensor(0.1, device=DEV))
    sched_e = torch.optim.lr_scheduler.StepLR(opt_e, step_size=1, gamma=0.7)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=1, gamma=0.7)
    data = batches(7, seed=2)
    warm, rest = data[:2], data[2:]
    static = tuple(t.clone() for t in rest[0])
    graph = capture(graphed, opt_g, static, warm, sched_g)
    for x, y, zs in warm:
        opt_e.zero_grad(set_to_none=True)
        train_step(eager, opt_e, x, y, zs)
        sched_e.step()
    for x, y, zs in rest:
        for s, t in zip(static, (x, y, zs)):
            s.copy_(t)
        graph.replay()
        sched_g.step()  # writes the lr tensor in place: the replays read it
        opt_e.zero_grad(set_to_none=True)
        train_step(eager, opt_e, x, y, zs)
        sched_e.step()
    torch.cuda.synchronize()
    assert float(opt_g.param_groups[0]["lr"]) < 0.1 * 0.7 ** 5
    assert_same_params(eager, graphed)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_cpu_tensor_lr_is_refused_under_capture(backend):
    model = Net().to(DEV)
    opt = pf.ProGradSGD(model.parameters(), backend=backend, **{**HYPER, "lr": torch.tensor(0.1)})
    x, y, zs = batches(1)[0]
    train_step(model, opt, x, y, zs)  # eager: read on the host, no device copy
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="baked into the CUDA graph"):
        with torch.cuda.graph(graph):
            train_step(model, opt, x, y, zs)


def _f64_check(ps_before, ds, gs, ps_after, lr, momentum):
    """First step from no buffer, global granularity, against float64."""
    d = torch.cat([t.double().flatten() for t in ds])
    g = torch.cat([t.double().flatten() for t in gs])
    dot, nn = float(d @ g), float(g @ g)
    coef = dot / nn if dot < 0 and nn > 0 else 0.0
    for p0, dd, gg, p1 in zip(ps_before, ds, gs, ps_after):
        u = dd.double() - coef * gg.double()
        torch.testing.assert_close(p1.double(), p0.double() - lr * u, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="cuda backend unavailable")
def test_cooperative_launch_refused_falls_back_to_two_passes(monkeypatch):
    from prograd_fast import _ext

    module = _ext.load("cuda")
    monkeypatch.setenv("PROGRAD_FAST_CUDA_PLAN", "auto")
    gen = torch.Generator(device=DEV).manual_seed(3)
    shapes = [(100 * 32768 + 7,), (100 * 32768,)]  # 201 chunks: more than an H200 holds
    ps = [torch.randn(s, device=DEV, generator=gen) for s in shapes]
    ds = [torch.randn(s, device=DEV, generator=gen) for s in shapes]
    gs = [-0.5 * d + 0.1 * torch.randn(d.shape, device=DEV, generator=gen) for d in ds]
    before = [p.clone() for p in ps]
    module.set_coop_capacity_override(10 ** 6)  # the occupancy query "says" it fits
    try:
        st = GroupStep(ps, ds, gs, [None, None], lr=0.1, momentum=0.9, extra={})
        get_backend("cuda").step(st)
        torch.cuda.synchronize()  # no sticky error left behind
    finally:
        module.set_coop_capacity_override(-1)
    assert st.extra["cuda"]["plan"] == 3, "the refused cooperative launch ran two passes"
    _f64_check(before, ds, gs, ps, 0.1, 0.9)
    assert torch.ones(3, device=DEV).sum().item() == 3.0  # the context is healthy


@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="cuda backend unavailable")
def test_cooperative_plan_is_not_used_under_capture(monkeypatch):
    monkeypatch.setenv("PROGRAD_FAST_CUDA_PLAN", "auto")
    ps = [torch.randn(4 * 32768, device=DEV), torch.randn(5, device=DEV)]  # coop-sized
    ds = [torch.randn_like(p) for p in ps]
    gs = [-0.5 * d for d in ds]
    extra, bufs = {}, [None, None]
    for _ in range(2):
        get_backend("cuda").step(GroupStep(ps, ds, gs, bufs, lr=0.1, momentum=0.9, extra=extra))
    assert extra["cuda"]["plan"] == 2  # eager: cooperative
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        get_backend("cuda").step(GroupStep(ps, ds, gs, bufs, lr=0.1, momentum=0.9, extra=extra))
    assert extra["cuda"]["plan"] == 3
    graph.replay()
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_buffers_warmed_up_on_a_side_stream_are_recorded_on_the_next(backend, monkeypatch):
    recorded = []
    original = torch.Tensor.record_stream

    def spy(self, stream):
        recorded.append((self.data_ptr(), stream.cuda_stream))
        return original(self, stream)

    monkeypatch.setattr(torch.Tensor, "record_stream", spy)
    (eager, model), (opt_e, opt) = twins(backend)
    data = batches(4, seed=4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        train_step(model, opt, *data[0])
    torch.cuda.current_stream().wait_stream(side)
    for x, y, zs in data[1:]:
        train_step(model, opt, x, y, zs)
    for x, y, zs in data:
        train_step(eager, opt_e, x, y, zs)
    torch.cuda.synchronize()
    assert_same_params(eager, model)
    cache = opt._backend_cache[0]
    if backend == "triton":
        owned = {t.data_ptr() for t in cache["triton_plan"].owned}
    else:
        owned = {cache["cuda"][name].data_ptr() for name in ("stats_f", "stats_b", "slots")}
    default = torch.cuda.current_stream().cuda_stream
    assert owned <= {ptr for ptr, s in recorded if s == default}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_allocation_after_the_first_steps(backend):
    model = Net().to(DEV)
    opt = pf.ProGradSGD(model.parameters(), backend=backend, **HYPER)
    grads = [torch.randn_like(p) for p in model.parameters()]
    generals = [-0.5 * g for g in grads]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    for _ in range(3):
        opt.store_general_grads(generals)
        opt.step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(5):
        opt.store_general_grads(generals)
        opt.step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


def _count_jit_calls(monkeypatch) -> list:
    """The Triton kernels that went through the JIT's binder (``JITFunction.run``) from now on."""
    from prograd_fast.kernels import prograd_sgd as k

    calls = []
    jit_class = type(k.KERNELS["fused"])
    original = jit_class.run

    def counted(self, *a, **kw):
        calls.append(self)
        return original(self, *a, **kw)

    monkeypatch.setattr(jit_class, "run", counted)
    return calls


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="triton backend unavailable")
def test_triton_launches_the_compiled_kernels_directly(monkeypatch):
    model = Net().to(DEV)
    opt = pf.ProGradSGD(model.parameters(), backend="triton", **HYPER)
    data = batches(6, seed=5)
    for x, y, zs in data[:3]:
        train_step(model, opt, x, y, zs)
    jit_calls = _count_jit_calls(monkeypatch)
    for x, y, zs in data[3:]:
        train_step(model, opt, x, y, zs)
    torch.cuda.synchronize()
    plan = opt._backend_cache[0]["triton_plan"]
    assert all(launcher.compiled is not None for launcher in plan.launchers)
    assert jit_calls == [], "steady steps must not go through Triton's binder"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_autocast_with_scaler_matches_the_reference(backend, dtype):
    runs = {}
    for name in (backend, "torch"):
        model = Net().to(DEV)
        opt = pf.ProGradSGD(model.parameters(), backend=name, **HYPER)
        scaler = ProGradGradScaler(DEV, init_scale=2.0 ** 12, growth_interval=1000)
        skipped = []
        for i, (x, y, zs) in enumerate(batches(4, seed=6)):
            if i == 2:
                x = x.clone()
                x[0, 0] = float("inf")
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype):
                ce, kl = pf.prograd_losses(model(x), zs, y)
            pf.backward(opt, scaler.scale(ce), scaler.scale(kl))
            scaler.step(opt)
            scaler.update()
            skipped.append(bool(opt.stats()[0]["skipped"]))
        runs[name] = (model, skipped)
    assert runs[backend][1] == runs["torch"][1] == [False, False, True, False]
    assert_same_params(runs[backend][0], runs["torch"][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compiled_model_with_the_fused_step_matches_eager(backend):
    (eager, compiled_model), (opt_e, opt_c) = twins(backend)
    fwd = torch.compile(compiled_model)
    for x, y, zs in batches(4, seed=7):
        for model, opt, f in ((eager, opt_e, eager), (compiled_model, opt_c, fwd)):
            opt.zero_grad(set_to_none=True)
            ce, kl = pf.prograd_losses(f(x), zs, y)
            pf.backward(opt, ce, kl)
            opt.step()
    torch.cuda.synchronize()
    assert_same_params(eager, compiled_model, rtol=1e-4, atol=1e-5)


def _add_launch_hook(hook):
    """Install a Triton launch-enter hook (a chain in Triton 3.8, one callable in 3.6);
    returns the undo."""
    from triton import knobs

    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        return lambda: chain.remove(hook)
    knobs.runtime.launch_enter_hook = hook
    return lambda: setattr(knobs.runtime, "launch_enter_hook", chain)


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="triton backend unavailable")
@pytest.mark.parametrize("hidden", [17, 700], ids=["one_launch", "two_launches"])
def test_a_launch_hook_sees_the_compiled_kernels_and_changes_nothing(hidden, monkeypatch):
    """A profiler's launch hook (Proton): the steps equal torch's, the hook sees every
    launch, and nothing goes back through Triton's JIT (which would recompile with the
    packed addresses as i64 integers)."""
    (fused, ref), (opt_f, opt_r) = twins("triton", hidden)
    opt_r.param_groups[0]["backend"] = "torch"
    data = batches(6, seed=8)
    for x, y, zs in data[:2]:
        for model, opt in ((fused, opt_f), (ref, opt_r)):
            train_step(model, opt, x, y, zs)
    jit_calls, seen = _count_jit_calls(monkeypatch), []
    undo = _add_launch_hook(lambda metadata: seen.append(metadata.get()["name"]))
    try:
        for x, y, zs in data[2:]:
            for model, opt in ((fused, opt_f), (ref, opt_r)):
                train_step(model, opt, x, y, zs)
        torch.cuda.synchronize()
    finally:
        undo()
    assert jit_calls == [], "a launch hook must not send the launch back through the JIT"
    launches = len(opt_f._backend_cache[0]["triton_plan"].launchers)
    assert len([n for n in seen if "kernel" in n]) >= 4 * launches
    assert_same_params(fused, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["torch"])
def test_a_first_step_under_capture_is_refused(backend):
    from prograd_fast.backends._common import CaptureError

    model = Net().to(DEV)
    opt = pf.ProGradSGD(model.parameters(), backend=backend, **HYPER)
    x, y, zs = batches(1, seed=10)[0]
    ce, kl = pf.prograd_losses(model(x), zs, y)
    pf.backward(opt, ce, kl)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(CaptureError, match="take one eager step before capturing"):
        with torch.cuda.graph(graph):
            opt.step()
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("hidden", [17, 700], ids=["one_launch", "two_launches"])
def test_a_capture_on_the_fast_path_survives_eager_rebinds(backend, hidden):
    """Capture with the .grad tensors the eager steps used (the fast path reads the eagerly
    built table), then an eager step on new .grad addresses (a re-bind), then a replay: the
    replay must still read its own table."""
    (model, ref), (opt, opt_r) = twins(backend, hidden)
    opt_r.param_groups[0]["backend"] = "torch"
    data = batches(5, seed=11)
    static = data[0]
    for m, o in ((model, opt), (ref, opt_r)):
        for x, y, zs in data[1:3]:  # on the current stream: the table belongs to it
            o.zero_grad(set_to_none=False)
            train_step(m, o, x, y, zs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autograd's warm-up before a capture (no step)
        opt.zero_grad(set_to_none=False)
        pf.prograd_losses(model(static[0]), static[2], static[1])[0].backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.zero_grad(set_to_none=False)
        train_step(model, opt, *static)
    captured_grads = [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    train_step(model, opt, *data[3])  # new .grad tensors: a re-bind, eagerly
    for p, g in zip(model.parameters(), captured_grads):
        p.grad = g
    graph.replay()
    for batch in (data[3], static):
        opt_r.zero_grad(set_to_none=False)
        train_step(ref, opt_r, *batch)
    torch.cuda.synchronize()
    assert_same_params(model, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_replays_copy_nothing_from_the_host(backend):
    """The standard capture (new .grad addresses inside it: the table or slots are uploaded
    while capturing) replays without any host-to-device copy."""
    model = Net(700).to(DEV)
    opt = pf.ProGradSGD(model.parameters(), backend=backend, **HYPER)
    data = batches(4, seed=12)
    graph = capture(model, opt, data[0], data[1:3])
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    if not any("kernel" in n.lower() or "prograd" in n.lower() for n in names):
        pytest.skip("the profiler does not trace the kernels of graph replays here")
    assert not [n for n in names if "HtoD" in n], "a replay copied from the host"


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="triton backend unavailable")
@pytest.mark.parametrize("hidden", [17, 700], ids=["one_launch", "two_launches"])
def test_alternating_general_gradients_rewrite_only_the_address_rows(hidden, monkeypatch):
    """General gradients at new addresses every step (two sets in turn): with the host
    helper the table's address rows are rewritten, without the full check, and every step
    equals torch's."""
    from prograd_fast import _host
    from prograd_fast.backends import triton_backend as tb

    if _host.module() is None:
        pytest.skip("the host helper cannot be built here")
    (model, ref), (opt, opt_r) = twins("triton", hidden)
    opt_r.param_groups[0]["backend"] = "torch"
    gen = torch.Generator().manual_seed(13)
    sets = [[torch.randn(p.shape, generator=gen).to(DEV) for p in model.parameters()]
            for _ in range(2)]
    checks = []
    full_check = tb.BACKEND._full_check
    for i in range(6):
        if i == 3:
            monkeypatch.setattr(tb.BACKEND, "_full_check",
                                lambda step: checks.append(1) or full_check(step))
        for m, o in ((model, opt), (ref, opt_r)):
            for p, g in zip(m.parameters(), sets[i % 2]):
                p.grad = -0.3 * g + 0.01 * i
            o.store_general_grads(sets[i % 2])
            o.step()
    torch.cuda.synchronize()
    assert checks == []
    assert_same_params(model, ref, rtol=1e-4, atol=1e-5)
