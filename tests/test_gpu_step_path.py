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


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="triton backend unavailable")
def test_triton_launches_the_compiled_kernels_directly(monkeypatch):
    from prograd_fast.kernels import prograd_sgd as k

    model = Net().to(DEV)
    opt = pf.ProGradSGD(model.parameters(), backend="triton", **HYPER)
    data = batches(6, seed=5)
    for x, y, zs in data[:3]:
        train_step(model, opt, x, y, zs)
    jit_calls = []
    jit_class = type(k.KERNELS["fused"])
    original = jit_class.run

    def counted(self, *a, **kw):
        jit_calls.append(self)
        return original(self, *a, **kw)

    monkeypatch.setattr(jit_class, "run", counted)
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
