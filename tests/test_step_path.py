"""The GPU step path, checked on the CPU: the Triton kernels in the interpreter (monotonic
ticket, single-program gate, per-tensor alignment), against the reference and a float64
model; the launch cache (every change it must notice, read through
``prograd_fast.backends.cache_stats``); capture-safe uploads and stream bookkeeping with
the CUDA calls stubbed; the prepared launcher; the CUDA backend's Python side with its
extension stubbed.  Sizes (``SMALL_MAX``, ``BLOCK``) are passed to a backend of its own
(``TritonBackend(small_max=..., block=...)``).  What needs a GPU is in
tests/test_gpu_step_path.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prograd_fast.backends import GroupStep, cache_stats
from prograd_fast.backends import _common
from prograd_fast.backends import triton_backend as tb
from prograd_fast.functional import prograd_sgd

BACKEND = tb.BACKEND
if BACKEND.available() is not None:
    pytest.skip(f"triton backend unavailable: {BACKEND.available()}", allow_module_level=True)
from prograd_fast.kernels import prograd_sgd as K  # noqa: E402 (triton imports)

if not K.INTERPRET:
    pytest.skip("these tests run the Triton kernels in the interpreter (CPU tensors)",
                allow_module_level=True)
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ----------------------------------------------------------------------------- helpers
def group(shapes, dtype=torch.float32, seed=0, none_general=()):
    gen = torch.Generator().manual_seed(seed)
    ps, ds, gs = [], [], []
    for i, s in enumerate(shapes):
        d = torch.randn(s, generator=gen, dtype=torch.float64)
        g = -d * (0.5 + torch.rand(s, generator=gen, dtype=torch.float64))  # conflict
        ps.append(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        ds.append(d.to(dtype))
        gs.append(None if i in none_general else g.to(dtype))
    return ps, ds, gs


def f64_params(ps, ds, gs, bufs, *, lr, momentum=0.0, weight_decay=0.0, granularity="global",
               lam=1.0, nesterov=False, maximize=False, dampening=0.0, grad_scale=None,
               found_inf=None):
    """Independent float64 ProGrad + SGD (params after one step; AMP tensors must be 1, 0)."""
    assert grad_scale is None or float(grad_scale) == 1.0
    assert found_inf is None or float(found_inf) == 0.0
    lr = float(lr)
    d64 = [d.double().reshape(-1) for d in ds]
    g64 = [None if g is None else g.double().reshape(-1) for g in gs]
    dots = [0.0 if g is None else float(d @ g) for d, g in zip(d64, g64)]
    nns = [0.0 if g is None else float(g @ g) for g in g64]
    if granularity == "global":
        dots, nns = [math.fsum(dots)] * len(ds), [math.fsum(nns)] * len(ds)
    out = []
    for i, p in enumerate(ps):
        c = lam * dots[i] / nns[i] if dots[i] < 0 and nns[i] > 0 else 0.0
        u = d64[i] if g64[i] is None or c == 0 else d64[i] - c * g64[i]
        u = -u if maximize else u
        p64 = p.double().reshape(-1)
        u = u + weight_decay * p64
        if momentum:
            b = u if bufs[i] is None else momentum * bufs[i].double().reshape(-1) + (1 - dampening) * u
            u = u + momentum * b if nesterov else b
        out.append((p64 - lr * u).reshape(p.shape))
    return out


def check(ps, want, dtype=torch.float32, what=""):
    for i, (a, e) in enumerate(zip(ps, want)):
        e = e.numpy().reshape(-1)
        scale = float(np.abs(e).max(initial=1e-30))
        np.testing.assert_allclose(a.double().numpy().reshape(-1), e, rtol=RTOL[dtype],
                                   atol=RTOL[dtype] * scale, err_msg=f"{what} tensor {i}")


def run(ps, ds, gs, bufs, extra, backend=BACKEND, **hyper):
    """One triton step checked against the reference and the float64 model."""
    ref_p = [p.clone() for p in ps]
    ref_b = [None if b is None else b.clone() for b in bufs]
    want = f64_params(ps, ds, gs, bufs, **hyper)
    stats = backend.step(GroupStep(ps, ds, gs, bufs, extra=extra, **hyper))
    prograd_sgd(ref_p, ds, gs, ref_b, **hyper)
    dtype = ps[0].dtype
    check(ps, want, dtype, "float64")
    check(ps, [p.double() for p in ref_p], dtype, "reference")
    return stats


@pytest.fixture
def poisoned():
    """New memory (momentum buffers made by a step) starts as NaN -- torch's fill of
    uninitialised memory under deterministic mode: the kernels must write every element."""
    was, fill = torch.are_deterministic_algorithms_enabled(), \
        torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_poisoned_memory_is_nan(poisoned):
    assert torch.isnan(torch.empty_like(torch.zeros(3))).all()  # the fixture works here


TWO_LAUNCHES = tb.TritonBackend(small_max=0, block=16)  # reduce + update, many blocks


# ------------------------------------------------------------ the monotonic ticket
def test_ticket_is_monotonic_and_compared_modulo_the_program_count():
    ps, ds, gs = group([(7, 13), (300,), (1,)], seed=1)
    extra, bufs = {}, [None] * 3
    n_parts = None
    for step in range(3):
        run(ps, ds, gs, bufs, extra, backend=TWO_LAUNCHES, lr=0.1, momentum=0.9,
            granularity="tensor")
        assert cache_stats(extra)["launches_per_step"] == 2
        # never reset: each launch adds exactly the program count (more than one here)
        if n_parts is None:
            n_parts = int(extra["triton_bufs"]["counter"])
            assert n_parts > 3  # several chunks per tensor (16-element blocks)
        assert int(extra["triton_bufs"]["counter"]) == (step + 1) * n_parts
    # a counter far along (a long run) still finalizes in the last program of each launch
    extra["triton_bufs"]["counter"].fill_(1000 * n_parts)
    extra["triton_bufs"]["stats_f"].fill_(float("nan"))
    stats = run(ps, ds, gs, bufs, extra, backend=TWO_LAUNCHES, lr=0.1, momentum=0.9,
                granularity="tensor")
    assert bool(torch.isfinite(stats.coef).all()) and bool(stats.conflict.all())
    assert int(extra["triton_bufs"]["counter"]) == 1001 * n_parts


# ---------------------------------------------------- one program only for few chunks
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_many_small_tensors_do_not_run_in_one_program(granularity, poisoned):
    shapes = [(5,)] * 200  # 1000 elements: under SMALL_MAX, but 200 chunks
    ps, ds, gs = group(shapes, seed=2, none_general=(3, 150))
    extra, bufs = {}, [None] * len(ps)
    run(ps, ds, gs, bufs, extra, lr=0.1, momentum=0.9, granularity=granularity)
    assert cache_stats(extra)["launches_per_step"] == 2  # reduce + update over a chunk grid
    run(ps, ds, gs, bufs, extra, lr=0.1, momentum=0.9, granularity=granularity)


def test_a_few_small_tensors_still_run_in_one_program():
    backend = tb.TritonBackend(small_max=8206, fused_max_chunks=3)
    ps, ds, gs = group([(16, 512)] + [(7,)] * 2, seed=3)  # 3 chunks, 8206 elements
    extra = {}
    run(ps, ds, gs, [None] * len(ps), extra, backend=backend, lr=0.1)
    assert cache_stats(extra)["launches_per_step"] == 1
    for shapes in ([(7,)] * 4, [(16, 512), (7,), (8,)]):  # a chunk, an element too many
        ps, ds, gs = group(shapes, seed=3)
        extra = {}
        run(ps, ds, gs, [None] * len(ps), extra, backend=backend, lr=0.1)
        assert cache_stats(extra)["launches_per_step"] == 2, shapes


# ---------------------------------------------------- alignment decided per tensor
def _views(sizes, offsets, dtype, seed):
    """Contiguous tensors starting ``offset`` elements into their own fresh (64-byte
    aligned) buffer: offset 1 of a 4-byte element is 4-byte aligned only."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, off in zip(sizes, offsets):
        buf = torch.randn(n + 8, generator=gen, dtype=torch.float64).to(dtype)
        out.append(buf[off:off + n])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("granularity", ["global", "tensor"])
def test_alignment_is_decided_per_tensor(dtype, granularity, poisoned):
    backend = tb.TritonBackend(block=16)  # several full blocks plus a tail per tensor
    sizes = [1, 97, 64, 33, 4096 + 5, 256]
    offsets = [0, 1, 3, 0, 1, 0]  # misaligned tensors in between aligned ones
    ps = [t.clone() for t in _views(sizes, [0] * 6, dtype, 0)]  # fresh: 16-byte aligned
    ds = _views(sizes, offsets, dtype, 1)
    gs = [-(d.double() * 0.7).to(dtype) for d in ds]
    gs[3] = _views([33], [1], dtype, 2)[0]  # only the general gradient is misaligned
    extra, bufs = {}, [None] * 6
    for _ in range(2):
        run(ps, ds, gs, bufs, extra, backend=backend, lr=0.1, momentum=0.9,
            weight_decay=1e-2, granularity=granularity)
    meta = extra["triton_plan"].meta  # the kernels' offset table: an aligned bit per tensor
    bits = meta[: 6 * K.ROW].view(6, K.ROW)[:, 7]
    aligned = (bits & K.BIT_ALIGNED) != 0
    want = [all(t.data_ptr() % 16 == 0 for t in (ps[i], ds[i], gs[i], bufs[i]))
            for i in range(6)]
    assert aligned.tolist() == want
    assert want == [True, False, False, False, False, True]  # the mix this test is about


# -------------------------------------------- the launch cache notices every change
class Builds:
    """Plans built and re-bound (after the full check or address-only) since the last
    ``take``, from the group cache's public counters."""

    def __init__(self, extra):
        self.extra, self.last = extra, (0, 0)

    def take(self):
        c = cache_stats(self.extra)
        now = (c["plans_built"], c["rebinds"] + c["address_rebinds"])
        out, self.last = (now[0] - self.last[0], now[1] - self.last[1]), now
        return out


HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("shapes", [[(4, 8)], [(4, 8), (33,), (5,)]], ids=["one", "three"])
def test_every_change_that_matters_rebuilds_or_rebinds(shapes, host_mode):
    """Same tensors: nothing is redone.  Each change below must be noticed, and the step's
    result must still equal the reference and the float64 model (with the host helper's
    fingerprint and with the Python keys)."""
    ps, ds, gs = group(shapes, seed=5)
    n = len(ps)
    extra, bufs = {}, [None] * n
    counts = Builds(extra)
    run(ps, ds, gs, bufs, extra, **HYPER)          # builds (and makes buffers)
    run(ps, ds, gs, bufs, extra, **HYPER)          # buffers now exist: re-bound
    counts.take()
    run(ps, ds, gs, bufs, extra, **HYPER)
    assert counts.take() == (0, 0), "an unchanged group must reuse its plan as is"

    def changed(kind, expect_build, **hyper):
        run(ps, ds, gs, bufs, extra, **{**HYPER, **hyper})
        builds, binds = counts.take()
        assert builds + binds >= 1, kind
        if expect_build:
            assert builds == 1, kind
        run(ps, ds, gs, bufs, extra, **{**HYPER, **hyper})  # and settles again
        assert counts.take() == (0, 0), kind

    # new addresses, same structure: re-bound, compiled kernels kept
    ds[:] = [d.clone() for d in ds]
    changed("new domain gradients", False)
    gs[:] = [g.clone() for g in gs]
    changed("new general gradients", False)
    ps[0].data = ps[0].data.clone()  # a parameter's storage replaced (same object)
    changed("parameter storage", False)
    bufs[:] = [b.clone() for b in bufs]  # e.g. load_state_dict
    changed("momentum buffers", False)
    gs[0] = None
    changed("a general gradient missing", False)
    gs[0] = -ds[0] * 0.5
    changed("it is back", False)
    # structure
    changed("nesterov", True, nesterov=True)
    changed("maximize", True, maximize=True)
    changed("weight decay off", True, weight_decay=0.0)
    changed("granularity", True, granularity="tensor")
    changed("tensor lr", True, lr=torch.tensor(0.02))
    changed("float64 tensor lr", True, lr=torch.tensor(0.02, dtype=torch.float64))
    changed("no momentum", True, momentum=0.0)
    # AMP tensors appear, change dtype, disappear
    changed("AMP tensors", True, grad_scale=torch.ones(1), found_inf=torch.zeros(1))
    changed("float64 scale", True, grad_scale=torch.ones(1, dtype=torch.float64),
            found_inf=torch.zeros(1))
    changed("AMP gone", True)


@pytest.mark.parametrize("shapes", [[(1000,)], [(40,), (9,)]], ids=["one", "two"])
def test_asking_unsupported_first_changes_nothing(shapes, poisoned, host_mode):
    """A caller may ask ``unsupported`` before stepping: the question must not make
    momentum buffers (the step would then take them for old ones and read garbage)."""
    ps, ds, gs = group(shapes, seed=11)
    extra, bufs = {}, [None] * len(ps)
    for _ in range(2):
        step = GroupStep(ps, ds, gs, bufs, extra=extra, lr=0.1, momentum=0.9)
        assert BACKEND.unsupported(step) is None
        assert bufs == [None] * len(ps) or all(b is not None for b in bufs)
        want = f64_params(ps, ds, gs, bufs, lr=0.1, momentum=0.9)
        BACKEND.step(step)
        check(ps, want)


def test_a_dtype_change_at_the_same_address_is_refused(host_mode):
    """A general gradient of another dtype at the very address of the last one (a view
    of the same storage) must not reuse the plan: the kernels would read fp32 from bf16."""
    base = torch.randn(64, dtype=torch.bfloat16)
    p = [torch.randn(16)]
    d = [torch.randn(16)]
    extra = {}
    g32 = base.view(torch.float32)[:16]
    BACKEND.step(GroupStep(p, d, [g32], [None], lr=0.1, extra=extra))
    g16 = base[:16]
    assert g16.data_ptr() == g32.data_ptr()
    with pytest.raises(RuntimeError, match="mixed dtypes"):
        BACKEND.step(GroupStep(p, d, [g16], [None], lr=0.1, extra=extra))


def test_a_layout_change_at_the_same_address_is_refused(host_mode):
    p = [torch.randn(8, 8)]
    d = [torch.randn(8, 8)]
    extra = {}
    BACKEND.step(GroupStep(p, d, [None], [None], lr=0.1, extra=extra))
    d_t = d[0].t()  # same storage, same shape, transposed
    assert d_t.data_ptr() == d[0].data_ptr()
    with pytest.raises(RuntimeError, match="non-contiguous"):
        BACKEND.step(GroupStep(p, [d_t], [None], [None], lr=0.1, extra=extra))
    p[0].data = p[0].data.t()  # the parameter itself, same address
    with pytest.raises(RuntimeError, match="non-contiguous"):
        BACKEND.step(GroupStep(p, d, [None], [None], lr=0.1, extra=extra))


def test_a_size_change_is_noticed(host_mode):
    ps, ds, gs = group([(40,), (9,)], seed=7)
    extra = {}
    run(ps, ds, gs, [None, None], extra, lr=0.1)
    ps[1].data = ps[1].data[:5].clone()  # same object, fewer elements
    ds[1], gs[1] = ds[1][:5].clone(), gs[1][:5].clone()
    run(ps, ds, gs, [None, None], extra, lr=0.1)
    assert cache_stats(extra)["plans_built"] == 2  # a new layout: a new plan


def test_copies_of_the_cache_start_empty():
    """deepcopy / pickle of an optimizer keep the group caches; a plan (compiled kernels,
    addresses) must not travel: the copy builds its own."""
    import copy
    import pickle

    ps, ds, gs = group([(4, 8)], seed=8)
    extra = {}
    run(ps, ds, gs, [None], extra, lr=0.1)
    run(ps, ds, gs, [None], extra, lr=0.1)
    assert cache_stats(extra)["plans_built"] == 1
    for clone in (copy.deepcopy(extra), pickle.loads(pickle.dumps(extra))):
        assert cache_stats(clone)["launches_per_step"] == 0  # no plan travelled
        run(ps, ds, gs, [None], clone, lr=0.1)  # the same tensors: the copy builds its own
        assert cache_stats(clone)["plans_built"] == 2


# --------------------------------------------------- the prepared launcher
class FakeCompiled:
    def __init__(self):
        self.function, self.packed_metadata, self.calls = 42, ("meta",), []

    def run(self, *args):
        self.calls.append(args)

    def launch_metadata(self, grid, stream, *args):
        return ("launch metadata", grid, stream, args[0])


class FakeKernel:
    arg_names = ["x_ptr", "n", "lr", "grad_scale", "BLOCK"]

    def __init__(self):
        self.jit_calls, self.compiled = [], FakeCompiled()

    def __getitem__(self, grid):
        def call(*args, num_warps):
            self.jit_calls.append((grid, args, num_warps))
            return self.compiled
        return call


def test_launcher_compiles_once_then_launches_the_compiled_kernel(monkeypatch):
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 777)
    kernel = FakeKernel()
    x = torch.zeros(4)
    launcher = K.Launcher(kernel, 3, dict(x_ptr=x, n=4, lr=0.1, grad_scale=None, BLOCK=16),
                          torch.device("cuda", 0))
    launcher()
    assert len(kernel.jit_calls) == 1 and kernel.jit_calls[0][1][0] is x
    # pointer arguments became addresses: the consumed tensors are not held
    assert launcher.args[0] == x.data_ptr()
    scale = torch.ones(1)
    launcher.set("lr", 0.2)
    launcher.set("grad_scale", scale)
    launcher()
    launcher()
    assert len(kernel.jit_calls) == 1 and len(kernel.compiled.calls) == 2
    assert kernel.compiled.calls[0] == (3, 1, 1, 777, 42, ("meta",), None, None, None,
                                        x.data_ptr(), 4, 0.2, scale, 16)
    y = torch.zeros(4)
    launcher.bind(x_ptr=y)
    launcher()
    assert kernel.compiled.calls[-1][9] == y.data_ptr()
    # a profiler's launch hook: the compiled kernel still, with the hooks and the metadata
    # Triton's entry point would give them (never the JIT again: the pointers are integers
    # by now, it would compile an i64 kernel)
    from triton import knobs

    def hook(*args):
        return None

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launcher()
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.jit_calls) == 1
    assert kernel.compiled.calls[-1] == (3, 1, 1, 777, 42, ("meta",),
                                         ("launch metadata", (3,), 777, y.data_ptr()),
                                         enter, leave, y.data_ptr(), 4, 0.2, scale, 16)
    with pytest.raises(ValueError, match="do not match"):
        K.Launcher(kernel, 1, dict(x_ptr=x), torch.device("cuda", 0))


@pytest.mark.parametrize("small_max,kernels", [(10**9, ("fused",)), (0, ("reduce", "update"))])
def test_the_kernels_take_exactly_the_arguments_the_backend_packs(small_max, kernels):
    ps, ds, gs = group([(4, 8), (3,)], seed=9)
    extra = {}
    tb.TritonBackend(small_max=small_max).step(
        GroupStep(ps, ds, gs, [None, None], lr=0.1, momentum=0.9, extra=extra))
    assert cache_stats(extra)["launches_per_step"] == len(kernels)
    launchers = extra["triton_plan"].launchers
    assert tuple(launcher.kernel for launcher in launchers) == \
        tuple(K.KERNELS[name] for name in kernels)
    for launcher in launchers:  # every parameter, in the kernel's order (checked at build)
        assert launcher.names == tuple(launcher.kernel.arg_names)


# ------------------------------------- uploads under capture (CUDA calls stubbed)
class FakeCuda:
    """Stand-ins for pinned and device allocations (CPU tensors that remember what they
    are), and a switch for "the current stream is capturing"."""

    def __init__(self, monkeypatch):
        self.capturing = False
        self.pinned, self.device = [], []
        monkeypatch.setattr(_common, "capturing", lambda device: self.capturing)
        monkeypatch.setattr(_common, "_pinned_empty", self._pinned)
        monkeypatch.setattr(_common, "_device_empty", self._device)
        # no driver to relax the capture mode: captured copies (see the next tests)
        monkeypatch.setattr(_common, "_exchange_capture_mode", lambda mode: None)

    def _pinned(self, n, dtype):
        if self.capturing:
            self.pinned_during_capture = True
        t = torch.empty(n, dtype=dtype)
        self.pinned.append(t)
        return t

    def _device(self, n, dtype, device):
        t = torch.empty(n, dtype=dtype)
        self.device.append(t)
        return t


def test_uploads_come_from_pinned_memory_and_capture_uses_the_spare(monkeypatch):
    fake = FakeCuda(monkeypatch)
    copies = []
    original = torch.Tensor.copy_

    def spy(self, src, non_blocking=False):
        copies.append((self, src, non_blocking))
        return original(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    cuda = torch.device("cuda", 0)
    extra = {}
    out = _common.upload([1, 2, 3], torch.int64, cuda, extra, "t")
    assert out.tolist() == [1, 2, 3] and out is fake.device[0]
    # the device copy's source is a pinned buffer, asynchronous (no pageable copy, no sync)
    assert copies[-1] == (out, fake.pinned[0], True)
    spare = extra["t_spare"]
    assert spare is fake.pinned[1] and spare.numel() == 3
    fake.capturing = True
    n_pinned = len(fake.pinned)
    out2 = _common.upload([4, 5, 6], torch.int64, cuda, extra, "t")
    assert len(fake.pinned) == n_pinned, "no host allocation while capturing"
    assert copies[-1] == (out2, spare, True) and out2.tolist() == [4, 5, 6]
    # what the graph copies from and into lives as long as the group
    assert any(t is spare for t in extra["graph_keep"])
    assert any(t is out2 for t in extra["graph_keep"])
    assert "t_spare" not in extra  # never filled again
    fake.capturing = False
    out3 = _common.upload([7, 8, 9], torch.int64, cuda, extra, "t", into=out)
    assert out3 is out and out.tolist() == [7, 8, 9] and spare.tolist() == [4, 5, 6]


def test_a_plan_rebuilt_while_capturing_keeps_what_the_graph_uses(monkeypatch):
    """The standard capture pattern gives the gradients new addresses inside the capture:
    the table is uploaded anew (never into a table an eager step rewrites) and every buffer
    the captured launches touch is kept."""
    flags = {"capturing": False}
    monkeypatch.setattr(tb, "capturing", lambda device: flags["capturing"])
    ps, ds, gs = group([(4, 8), (33,), (5,)], seed=10)
    extra, bufs = {}, [None] * 3
    run(ps, ds, gs, bufs, extra, lr=0.1, momentum=0.9)
    run(ps, ds, gs, bufs, extra, lr=0.1, momentum=0.9)
    eager_table = extra["triton_plan"].meta
    flags["capturing"] = True
    ds2 = [d.clone() for d in ds]  # "backward inside the capture": new addresses
    uploads = cache_stats(extra)["table_uploads"]
    run(ps, ds2, gs, bufs, extra, lr=0.1, momentum=0.9)
    assert cache_stats(extra)["table_uploads"] == uploads + 1
    plan = extra["triton_plan"]
    assert plan.meta is not eager_table
    kept = {id(t) for t in extra["graph_keep"]}
    assert all(id(t) in kept for t in plan.owned) and id(plan.meta) in kept
    assert plan.meta_stream is None  # a captured table is never rewritten
    flags["capturing"] = False
    captured_table = plan.meta
    run(ps, ds, gs, bufs, extra, lr=0.1, momentum=0.9)  # eager again, other addresses
    assert extra["triton_plan"].meta is not captured_table


def test_a_cpu_tensor_lr_is_refused_while_capturing(monkeypatch):
    plan = tb._Plan()
    plan.cpu_lr, plan.device = True, torch.device("cuda", 0)
    monkeypatch.setattr(tb, "capturing", lambda device: True)
    step = GroupStep([torch.zeros(1)], [torch.zeros(1)], [None], [None],
                     lr=torch.tensor(0.1))
    with pytest.raises(RuntimeError, match="baked into the CUDA graph"):
        BACKEND._launch(plan, step)


# ------------------------------------------------------ streams (stubbed)
def test_buffers_are_recorded_on_each_new_stream_once(monkeypatch):
    streams = iter([1, 1, 2, 2, 1, 3])
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: next(streams))
    current = {"stream": None}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    flags = {"capturing": False}
    monkeypatch.setattr(_common, "capturing", lambda device: flags["capturing"])
    recorded = []

    class Buf:
        def __init__(self, name):
            self.name = name

        def record_stream(self, s):
            recorded.append((self.name, s))

    plan = tb._Plan()
    plan.owned = [Buf("stats"), Buf("table")]
    extra = {}
    device = torch.device("cuda", 0)
    for s in (1, 1, 2, 2):
        current["stream"] = f"S{s}"
        BACKEND._streams(plan, extra, device)
    assert recorded == [("stats", "S1"), ("table", "S1"), ("stats", "S2"), ("table", "S2")]
    recorded.clear()
    flags["capturing"] = True  # capture: nothing recorded (kept alive instead)
    BACKEND._streams(plan, extra, device)
    assert recorded == []
    flags["capturing"] = False
    current["stream"] = "S3"
    BACKEND._streams(plan, extra, device)
    assert recorded == [("stats", "S3"), ("table", "S3")]


# ------------------------------------- the CUDA backend's Python side (stubbed)
class FakeCudaModule:
    CHUNK = 8

    def __init__(self):
        self.calls = []

    def prograd_sgd(self, *args):
        self.calls.append(args)
        bufs = [torch.zeros_like(p) if b is None else b for p, b in zip(args[0], args[3])]
        return bufs, args[15] if args[15] is not None else torch.empty(3), 3


def test_cuda_backend_makes_its_buffers_once_per_layout(monkeypatch):
    from prograd_fast import _ext
    from prograd_fast.backends import cuda_backend as cb

    module = FakeCudaModule()
    monkeypatch.setattr(_ext, "load", lambda kind: module)  # the extension, stubbed
    meta = torch.device("meta")
    ps = [torch.empty(20, device=meta), torch.empty(3, device=meta)]
    extra = {}
    backend = cb.CudaBackend()
    stats = []
    for _ in range(3):
        step = GroupStep(ps, [torch.empty_like(p) for p in ps], [None, None], [None, None],
                         lr=torch.tensor(0.1), momentum=0.9, granularity="tensor", extra=extra)
        stats.append(backend.step(step))
    assert cache_stats(extra)["table_uploads"] == 1  # the slot starts, once per layout
    first, last = module.calls[0], module.calls[-1]
    # one start per tensor plus the total (the values: test_cuda_slot_starts_match_...)
    assert first[16].shape == (len(cb.slot_starts([20, 3], 8)),) == (3,)
    assert all(s is stats[0] for s in stats)  # the same views, written in place
    assert first[16] is last[16] and first[17] is last[17] and first[18] is last[18]
    assert first[17].numel() == 5 * 2 and first[18].numel() == 3
    # a CPU tensor lr is read on the host (no device copy per step)...
    assert last[4] == pytest.approx(0.1) and last[5] is None
    # ...and refused while capturing, where its value would be baked in
    monkeypatch.setattr(cb, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="baked into the CUDA graph"):
        backend.step(GroupStep(ps, [torch.empty_like(p) for p in ps], [None, None],
                               [None, None], lr=torch.tensor(0.1), extra=extra))


def test_cuda_slot_starts_match_the_kernel_chunking():
    from prograd_fast.backends.cuda_backend import slot_starts

    assert slot_starts([0, 1, 32768, 32769, 5], 32768) == [0, 0, 1, 2, 4, 5]


# --------------------------------------------- the optimizer's step wrapper
def _tiny_opt(backend="torch"):
    import prograd_fast as pf

    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    return p, pf.ProGradSGD([p], lr=0.1, momentum=0.9, backend=backend)


def test_step_wrapper_profiles_and_runs_hooks_like_torch():
    """The cheap wrapper must keep what torch's does: the profiler label, global and
    per-optimizer hooks, grad mode off inside the step and restored after."""
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    p, opt = _tiny_opt()
    with torch.profiler.profile() as prof:
        opt.store_general_grads([-p.grad])
        opt.step()
    assert any(e.name == "Optimizer.step#ProGradSGD.step" for e in prof.events())
    seen = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append("global post")),
               opt.register_step_pre_hook(lambda o, a, k: seen.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: seen.append("post"))]
    try:
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert seen == ["global pre", "pre", "post", "global post"]
    seen.clear()
    modes = []

    def closure():
        modes.append(torch.is_grad_enabled())
        return torch.zeros(())

    before = p.detach().clone()
    opt.step(closure)
    assert modes == [True] and torch.is_grad_enabled() and not seen
    assert not torch.equal(before, p.detach())  # stepped, no autograd error on a leaf
    with torch.no_grad():
        opt.step()
        assert not torch.is_grad_enabled()  # restored to what it was
    assert torch.is_grad_enabled()
