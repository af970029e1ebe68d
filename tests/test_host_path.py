"""The optimizer's host path: the C host helper (csrc/prograd_host.cpp, prograd_fast._host)
against the Python path it shortcuts, and every change the caches it feeds must notice --
state entries replaced, added or removed, load_state_dict, parameters replaced, added or
frozen, pending general gradients -- checked against an independent model of the optimizer
(explicit lists through the functional reference), with the helper and without it
(``PROGRAD_FAST_NO_HOST_HELPER=1``).  Which path ran, and what the launch cache redid, is
read through ``ProGradSGD.cache_stats()``."""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

import prograd_fast as pf
from prograd_fast import _ext, _host, _step
from prograd_fast.backends import GroupStep
from prograd_fast.backends import triton_backend as tb
from prograd_fast.functional import prograd_sgd

BK = _step.BUFFER_KEY


@pytest.fixture(scope="module")
def host():
    reason = _ext.unavailable_reason("host")
    if reason is not None:
        pytest.skip(f"host helper unavailable: {reason}")
    return _ext.load("host")


class Sub(torch.Tensor):
    """A tensor subclass: the helper must leave it to the Python path."""


def tensors(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(4, 3 + i, generator=gen)) for i in range(n)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    gs = [-0.5 * p.grad + 0.1 * torch.randn(p.shape, generator=gen) for p in ps]
    return ps, gs


# ------------------------------------------------------------------ the helper itself
def test_same_items_is_identity_of_every_entry(host):
    ps, _ = tensors()
    state = {p: {} for p in ps}
    keys, values = tuple(state), tuple(state.values())
    assert host.same_items(state, keys, values)
    assert host.same_items(dict(state), keys, values)  # another dict, the same entries
    changes = {
        "replaced": lambda d: d.__setitem__(ps[1], {}),
        "added": lambda d: d.__setitem__(torch.zeros(1), {}),
        "removed": lambda d: d.pop(ps[2]),
        "re-added (order)": lambda d: d.__setitem__(ps[0], d.pop(ps[0])),
        "cleared": lambda d: d.clear(),
    }
    for name, change in changes.items():
        d = dict(state)
        change(d)
        assert not host.same_items(d, keys, values), name
    with pytest.raises(TypeError):
        host.same_items([], keys, values)


def test_same_objects(host):
    ps, _ = tensors()
    ref = tuple(ps)
    assert host.same_objects(ps, ref) and host.same_objects(tuple(ps), ref)
    assert not host.same_objects(ps[:2], ref)
    assert not host.same_objects([ps[0], ps[1], ps[2].detach()], ref)
    assert not host.same_objects(iter(ps), ref)  # not a list or tuple: not the same


def test_matching_accepts_plain_matching_gradients(host):
    ps, gs = tensors()
    gs[1] = None
    assert host.matching(ps, gs) is True
    assert _step.checked_general(ps, gs, host) is gs  # kept as they are, no copy


REFUSED = {
    "shape": lambda p, g: g.reshape(-1),
    "dtype": lambda p, g: g.double(),
    "device": lambda p, g: torch.empty_like(g, device="meta"),
    "sparse": lambda p, g: g.to_sparse(),
    "complex parameter": None,
    "subclass": lambda p, g: g.as_subclass(Sub),
    "requires grad": lambda p, g: g.clone().requires_grad_(),
    "not a tensor": lambda p, g: 1.0,
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_matching_leaves_the_rest_to_python(host, case):
    """Anything but a plain matching gradient goes to the Python path, which raises the
    clear error or detaches."""
    ps, gs = tensors()
    if case == "complex parameter":
        ps[2] = torch.nn.Parameter(torch.randn(ps[2].shape, dtype=torch.complex64))
        gs[2] = torch.randn(ps[2].shape, dtype=torch.complex64)
    else:
        gs[2] = REFUSED[case](ps[2], gs[2])
    assert host.matching(ps, gs) is False
    assert host.matching(ps, gs[:2]) is False  # lists that do not align
    assert host.matching(tuple(ps), gs) is False  # not a list


def _python_gather(ps, sds, generals, momentum):
    state = {p: sd for p, sd in zip(ps, sds) if sd is not None}
    return _step.gather(state, ps, generals, momentum)


def _state(ps, gs, layout):
    """State dicts (buffers where the layout says "b") and the pending general gradients
    (where it says "g")."""
    sds, generals = [], []
    for i, kind in enumerate(layout):
        generals.append(gs[i] if kind is not None and "g" in kind else None)
        sds.append(None if kind is None else
                   ({BK: torch.randn(ps[i].shape)} if "b" in kind else {}))
    return sds, generals


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("layout,no_grad", [
    (["gb", "gb", "gb"], ()),
    (["g", "b", None], ()),
    (["gb", "gb", "gb"], (1,)),
    (["g", "gb", ""], (0, 1, 2)),
])
@pytest.mark.parametrize("pending", [True, False])
def test_gather_equals_the_python_gather(host, momentum, layout, no_grad, pending):
    ps, gs = tensors(seed=3)
    for i in no_grad:
        ps[i].grad = None
    sds, generals = _state(ps, gs, layout)
    generals = generals if pending else None
    before = [dict(sd) if sd is not None else None for sd in sds]
    got = host.gather(ps, sds if momentum else None, generals, momentum, BK)
    want = _python_gather(ps, sds, generals, momentum)
    assert sds == before  # the state is only read
    if want is None:
        assert got == ()
        return
    assert got[4] is want[4]
    for a, b in zip(got[:4], want[:4]):
        assert len(a) == len(b) and all(x is y for x, y in zip(a, b))
    assert (got[0] is ps) == (not no_grad)


@pytest.mark.parametrize("case", ["subclass param", "sparse grad", "complex grad",
                                  "state not a dict", "odd general", "odd buffer",
                                  "generals not aligned"])
def test_gather_leaves_the_unusual_to_python_untouched(host, case):
    ps, gs = tensors(seed=4)
    sds = [{BK: torch.zeros(p.shape)} for p in ps]
    generals = list(gs)
    if case == "subclass param":
        ps[1] = torch.nn.Parameter(torch.randn(4, 4)).as_subclass(Sub)
        ps[1].grad = torch.randn(4, 4)
    elif case == "sparse grad":
        ps[1].grad = ps[1].grad.to_sparse()
    elif case == "complex grad":
        ps[1] = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
        ps[1].grad = torch.randn(3, dtype=torch.complex64)
    elif case == "state not a dict":
        sds[1] = [(BK, gs[1])]
    elif case == "odd general":
        generals[1] = gs[1].as_subclass(Sub)
    elif case == "odd buffer":
        sds[1][BK] = "buffer"
    else:
        generals = generals[:2]
    before = [dict(sd) if isinstance(sd, dict) else sd for sd in sds]
    assert host.gather(ps, sds, generals, True, BK) is NotImplemented
    assert sds == before


def test_gather_leaves_a_tuple_of_parameters_to_python(host):
    ps, gs = tensors(seed=4)
    assert host.gather(tuple(ps), [{}, {}, {}], list(gs), True, BK) is NotImplemented


def test_a_group_changed_between_storing_and_stepping_is_a_clear_error():
    ps, gs = tensors(seed=5)
    opt = pf.ProGradSGD(ps, lr=0.1)
    opt.store_general_grads(gs)
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(RuntimeError, match="changed between store_general_grads"):
        opt.step()


def _fp(host, ps, ds, gs, bs):
    return host.fingerprint(ps, ds, gs, bs)


def test_fingerprint_changes_with_everything_a_launch_depends_on(host):
    """Equal fingerprints must mean the same memory seen the same way: each change below,
    many at the very same address, must change it."""
    base = torch.zeros(64)
    ps = [torch.randn(8, 4), torch.randn(16)]
    ds = [torch.randn(8, 4), torch.randn(16)]
    gs = [torch.randn(8, 4), base[:16]]
    bs = [torch.randn(8, 4), torch.randn(16)]
    ref = _fp(host, ps, ds, gs, bs)
    assert isinstance(ref, bytes) and len(ref) == 2 * 8 * host.WORDS
    assert _fp(host, list(ps), list(ds), list(gs), list(bs)) == ref  # other lists, same tensors
    assert _fp(host, ps, [d.view_as(d) for d in ds], gs, bs) == ref  # same memory, same view

    def differs(what, **repl):
        lists = dict(ps=list(ps), ds=list(ds), gs=list(gs), bs=list(bs))
        for name, (i, t) in repl.items():
            lists[name][i] = t
        assert _fp(host, lists["ps"], lists["ds"], lists["gs"], lists["bs"]) != ref, what

    differs("parameter address", ps=(1, ps[1].clone()))
    differs("gradient address", ds=(0, ds[0].clone()))
    differs("general address", gs=(1, base[16:32]))
    differs("general missing", gs=(0, None))
    differs("buffer address", bs=(1, bs[1].clone()))
    differs("buffer missing", bs=(0, None))
    differs("fewer elements, same address", ps=(1, ps[1][:8]))
    differs("parameter dtype, same address", ps=(1, ps[1].view(torch.int32)))
    differs("general dtype, same address", gs=(1, base[:32].view(torch.bfloat16)[:16]))
    differs("buffer dtype, same address", bs=(1, bs[1].view(torch.int32)))
    differs("transposed gradient, same address", ds=(0, ds[0].view(4, 8).t()))
    differs("general of another shape, same elements", gs=(0, gs[0].reshape(4, 8)))
    differs("gradient on another device", ds=(1, torch.empty(16, device="meta")))
    differs("lazy negation, same address", gs=(1, torch._neg_view(gs[1])))
    assert _fp(host, ps, ds, gs, ()) != ref  # no momentum: the buffers are not part of it


def test_fingerprint_is_none_for_what_it_cannot_read(host):
    ps = [torch.randn(4)]
    ds = [torch.randn(4)]
    assert _fp(host, ps, ds, [None], [None]) is not None
    assert _fp(host, [ps[0].as_subclass(Sub)], ds, [None], [None]) is None
    assert _fp(host, ps, [ds[0].to_sparse()], [None], [None]) is None
    assert _fp(host, ps, [None], [None], [None]) is None
    assert _fp(host, ps, ds, [None, None], [None]) is None
    assert _fp(host, [], [], [], []) is None
    assert _fp(host, iter(ps), ds, [None], [None]) is None


# ------------------------------------------------------------ through the optimizer
class Model:
    """An independent ProGradSGD: explicit lists of parameters (copies), momentum buffers
    and pending general gradients, stepped with the functional reference."""

    def __init__(self, params, **hyper):
        self.ps = [p.detach().clone() for p in params]
        self.bufs = [None] * len(params)
        self.hyper = hyper

    def step(self, grads, generals):
        idx = [i for i, d in enumerate(grads) if d is not None]
        bufs = [self.bufs[i] for i in idx]
        ps = [self.ps[i] for i in idx]
        prograd_sgd(ps, [grads[i] for i in idx], [generals[i] for i in idx], bufs,
                    **self.hyper)
        for i, b in zip(idx, bufs):
            self.bufs[i] = b


HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


def _close(opt_params, model, what):
    for i, (p, q) in enumerate(zip(opt_params, model.ps)):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6, msg=f"{what}: {i}")


def _skip_unavailable(backend):
    reason = pf.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


SHAPES = [(5, 3), (17,), (1,)]  # awkward sizes: odd, prime, one element


def _fused_backend() -> str:
    """A fused backend that runs here (its groups get the helper from their second step)."""
    for name in ("cpp", "triton"):
        if pf.available_backends()[name] is None:
            return name
    pytest.skip("no fused backend runs here")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_state_and_parameter_changes_are_seen(backend, host_mode):
    _skip_unavailable(backend)
    if backend == "torch" and host_mode == "c":
        pytest.skip("the torch backend never takes the helper: the python case covers it")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = pf.ProGradSGD(params, backend=backend, **HYPER)
    model = Model(params, **HYPER)

    def rand(shape):
        return torch.randn(shape, generator=gen)

    def step(what, grads=None, generals=None, in_place=False):
        ps = opt.param_groups[0]["params"]
        grads = grads or [rand(p.shape) for p in ps]
        generals = generals or [-0.7 * d if d is not None else rand(p.shape)
                                for p, d in zip(ps, grads)]
        for p, d in zip(ps, grads):
            if in_place:  # the very same .grad tensors, new values
                p.grad.copy_(d)
            else:
                p.grad = d
        opt.store_general_grads(generals)
        opt.step()
        model.step(grads, generals)
        _close(ps, model, what)

    for s in range(3):
        step(f"plain step {s}")
    counts = opt.cache_stats()  # the path under test (the first step is always Python's)
    assert counts["host_helper_steps"] == (2 if host_mode == "c" else 0)
    assert counts["python_host_steps"] == (1 if host_mode == "c" else 3)
    p0, p1, p2 = params
    step("gradients written in place", in_place=True)
    opt.state[p0] = {BK: rand(p0.shape)}  # an entry replaced
    model.bufs[0] = opt.state[p0][BK].clone()
    step("state entry replaced")
    opt.state[p1][BK] = rand(p1.shape)  # a buffer replaced in place
    model.bufs[1] = opt.state[p1][BK].clone()
    step("momentum buffer replaced")
    del opt.state[p2]  # an entry removed: momentum starts again
    model.bufs[2] = None
    step("state entry removed")
    p0.data = rand(p0.shape)  # the parameter's tensor replaced (same Parameter object)
    model.ps[0] = p0.detach().clone()
    step("p.data replaced")
    saved = copy.deepcopy(opt.state_dict())  # a checkpoint (state_dict() holds the live buffers)
    model_saved = [b.clone() for b in model.bufs]
    step("before load_state_dict")
    opt.load_state_dict(saved)
    model.bufs = model_saved
    step("load_state_dict")
    step("frozen parameter", grads=[rand(p0.shape), None, rand(p2.shape)])
    opt.store_general_grads([rand(p.shape) for p in params])
    opt.zero_grad(set_to_none=True)  # drops the pending general gradients too
    assert all(p.grad is None for p in params) and not opt.has_general_grads()
    step("after zero_grad(set_to_none=True)")
    q = torch.nn.Parameter(rand(p1.shape))
    opt.param_groups[0]["params"][1] = q  # a parameter replaced in the group's list
    model.ps[1], model.bufs[1] = q.detach().clone(), None
    step("parameter replaced")
    assert opt.param_groups[0]["params"][1] is q
    opt.state.clear()  # everything forgotten
    model.bufs = [None] * 3
    step("state cleared")
    for s in range(2):
        step(f"settled {s}")
    assert opt.cache_stats()["python_host_steps"] == (1 if host_mode == "c" else 16)


def test_added_group_and_general_gradients_of_other_steps(host_mode):
    gen = torch.Generator().manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(6, generator=gen)) for _ in range(2)]
    b = [torch.nn.Parameter(torch.randn(4, generator=gen))]
    opt = pf.ProGradSGD(a, backend=_fused_backend(), **HYPER)
    model_a = Model(a, **HYPER)
    d = [torch.randn(6, generator=gen) for _ in a]
    g = [-x for x in d]
    for p, x in zip(a, d):
        p.grad = x
    opt.store_general_grads(g)
    opt.step()
    model_a.step(d, g)
    opt.add_param_group({"params": b})
    model_b = Model(b, **HYPER)
    d2 = [torch.randn(6, generator=gen) for _ in a] + [torch.randn(4, generator=gen)]
    g2 = [-0.5 * x for x in d2]
    for p, x in zip(a + b, d2):
        p.grad = x
    opt.store_general_grads(g2[:2] + [None])
    opt.store_general_grads([None, g2[1], g2[2]])  # stored twice: accumulates
    torch.testing.assert_close(g2[1], -d2[1])  # added in place into the first one stored
    opt.step()
    model_a.step(d2[:2], [g2[0], g2[1]])
    model_b.step(d2[2:], [g2[2]])
    _close(a, model_a, "group 0")
    _close(b, model_b, "added group")
    assert not opt.has_general_grads()
    with pytest.warns(UserWarning, match="without general gradients"):
        opt.step()  # no general gradients now: plain SGD, nothing stale
    model_a.step(d2[:2], [None, None])
    model_b.step(d2[2:], [None])
    _close(a, model_a, "plain SGD step 0")
    _close(b, model_b, "plain SGD step 1")
    assert opt.cache_stats()["host_helper_steps"] == (4 if host_mode == "c" else 0)


@pytest.mark.parametrize("case,exc,match", [
    ("shape", RuntimeError, "does not match"),
    ("dtype", RuntimeError, "dtype"),
    ("sparse", RuntimeError, "sparse"),
    ("type", TypeError, "tensors or None"),
])
def test_bad_general_gradients_raise_and_store_nothing(case, exc, match, host_mode):
    params, gs = tensors(seed=6)
    opt = pf.ProGradSGD(params, lr=0.1)
    opt.store_general_grads(gs)
    opt.step()  # a fused backend ran (auto: cpp, or torch): the helper is on in "c" mode
    opt.store_general_grads(gs)  # the helper's path now (in "c" mode)
    opt.zero_grad(set_to_none=False)
    bad = list(gs)
    bad[1] = {"shape": gs[1].reshape(-1), "dtype": gs[1].double(),
              "sparse": gs[1].to_sparse(), "type": 3}[case]
    with pytest.raises(exc, match=match):
        opt.store_general_grads(bad)
    assert not opt.has_general_grads()


def test_general_gradients_that_require_grad_are_detached(host_mode):
    """Stored general gradients that are part of an autograd graph (``create_graph``) are
    kept detached: the optimizer does not keep the graph, and what it holds, alive."""
    params, gs = tensors(seed=7)
    opt = pf.ProGradSGD(params, lr=0.1)
    opt.store_general_grads(gs)
    opt.step()  # a fused backend ran (auto: cpp, or torch): the helper is on in "c" mode
    leaves = [g.clone().requires_grad_() for g in gs]
    alive = [weakref.ref(x) for x in leaves]
    opt.store_general_grads([x * 2 for x in leaves])
    del leaves
    gc.collect()
    assert [r() for r in alive] == [None] * len(alive)
    assert opt.has_general_grads()


def _changes(opt, before):
    now = opt.cache_stats()
    return {k: v - before[k] for k, v in now.items() if v != before[k]}


def test_the_helper_path_is_the_one_taken(host_mode):
    """With the helper, an unchanged step is gathered in C and redoes nothing (no full
    check, no re-bind: else the targets are not met); a step where only an address changed
    is re-bound without the full check; any other change runs the full check.  Without
    the helper, the Python path gathers every step and an address change is checked in
    full before the re-bind."""
    if tb.BACKEND.available() is not None:
        pytest.skip(f"triton: {tb.BACKEND.available()}")
    c = host_mode == "c"
    params, gs = tensors(seed=8)
    opt = pf.ProGradSGD(params, lr=0.1, momentum=0.9, backend="triton")
    for _ in range(3):
        opt.store_general_grads(gs)
        opt.step()
    before = opt.cache_stats()
    opt.store_general_grads(gs)
    opt.step()
    assert _changes(opt, before) == {"host_helper_steps" if c else "python_host_steps": 1}
    before = opt.cache_stats()
    params[1].grad = params[1].grad.clone()  # only a new address
    opt.store_general_grads(gs)
    opt.step()
    if c:  # re-bound, no full check
        assert _changes(opt, before) == {"host_helper_steps": 1, "address_rebinds": 1}
    else:  # checked in full, then re-bound (the table rewritten)
        assert _changes(opt, before) == {"python_host_steps": 1, "full_checks": 1,
                                         "rebinds": 1, "table_uploads": 1}
    before = opt.cache_stats()
    params[1].grad = params[1].grad.t().contiguous().t()  # not contiguous: checked in full
    opt.store_general_grads(gs)
    with pytest.raises(pf.BackendUnavailableError, match="non-contiguous"):
        opt.step()
    assert _changes(opt, before) == {"host_helper_steps" if c else "python_host_steps": 1,
                                     "full_checks": 1}


def test_triton_refuses_a_dtype_change_at_the_same_address(host_mode):
    """A later parameter (or momentum buffer) viewed as another dtype keeps its address:
    the launch cache must notice, with the helper (fingerprint) and without (Python keys)."""
    if tb.BACKEND.available() is not None:
        pytest.skip(f"triton: {tb.BACKEND.available()}")
    ps = [torch.randn(8), torch.randn(12)]
    ds = [torch.randn(8), torch.randn(12)]
    extra = {}
    bufs = [None, None]
    for _ in range(3):
        tb.BACKEND.step(GroupStep(ps, ds, [None, None], bufs, lr=0.1, momentum=0.9,
                                  extra=extra))
    with pytest.raises(RuntimeError, match="mixed dtypes"):
        tb.BACKEND.step(GroupStep([ps[0], ps[1].view(torch.int32)], ds, [None, None], bufs,
                                  lr=0.1, momentum=0.9, extra=extra))
    with pytest.raises(RuntimeError, match="mixed dtypes"):
        tb.BACKEND.step(GroupStep(ps, ds, [None, None], [bufs[0], bufs[1].view(torch.int32)],
                                  lr=0.1, momentum=0.9, extra=extra))


def test_triton_refuses_an_amp_scale_that_grew(host_mode):
    """The AMP tensors' size is part of the options the plan was checked for."""
    if tb.BACKEND.available() is not None:
        pytest.skip(f"triton: {tb.BACKEND.available()}")
    ps, ds = [torch.randn(8)], [torch.randn(8)]
    extra = {}
    for _ in range(2):
        tb.BACKEND.step(GroupStep(ps, ds, [None], [None], lr=0.1, grad_scale=torch.ones(1),
                                  found_inf=torch.zeros(1), extra=extra))
    with pytest.raises(RuntimeError, match="grad_scale must be a one-element tensor"):
        tb.BACKEND.step(GroupStep(ps, ds, [None], [None], lr=0.1, grad_scale=torch.ones(2),
                                  found_inf=torch.zeros(1), extra=extra))


def test_triton_refuses_a_lazy_negation_bit(host_mode):
    """The kernels read memory as it is: a negated view (same address) must not pass."""
    if tb.BACKEND.available() is not None:
        pytest.skip(f"triton: {tb.BACKEND.available()}")
    ps, ds, gs = [torch.randn(8)], [torch.randn(8)], [torch.randn(8)]
    extra = {}
    for _ in range(2):
        tb.BACKEND.step(GroupStep(ps, ds, gs, [None], lr=0.1, extra=extra))
    with pytest.raises(RuntimeError, match="negation"):
        tb.BACKEND.step(GroupStep(ps, ds, [torch._neg_view(gs[0])], [None], lr=0.1,
                                  extra=extra))


# ---------------------------------------------------- the two paths give the same results
def _train(backend, shapes, seed=0):
    """A short run touching every host-path case: awkward sizes, a frozen parameter, general
    gradients stored twice, zero_grad(set_to_none=True), a state_dict round trip into a new
    optimizer, add_param_group.  Returns every parameter and the final state_dict."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = pf.ProGradSGD(params, backend=backend, **HYPER)

    def step(opt, ps, frozen=()):
        opt.zero_grad(set_to_none=True)
        for i, p in enumerate(ps):
            if i not in frozen:
                p.grad = torch.randn(p.shape, generator=gen)
        for _ in range(2):  # stored twice: the second adds to the first (not a multiple)
            opt.store_general_grads([torch.randn(p.shape, generator=gen) for p in ps])
        opt.step()

    for s in range(4):
        step(opt, params, frozen=(1,) if s == 2 else ())
    saved = copy.deepcopy(opt.state_dict())
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = pf.ProGradSGD(clones, backend=backend, **HYPER)
    opt.load_state_dict(saved)
    step(opt, clones)
    extra = torch.nn.Parameter(torch.randn(3, generator=gen))
    opt.add_param_group({"params": [extra]})
    for _ in range(2):
        step(opt, clones + [extra])
    helper = opt.cache_stats()["host_helper_steps"]
    assert (helper > 0) == (_host.module() is not None)  # the path asked for ran
    return params + clones + [extra], opt.state_dict()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_helper_and_python_paths_give_identical_results(backend, monkeypatch):
    """The same run with the helper and with it opted out: bit-identical parameters and
    state."""
    _skip_unavailable(backend)
    _host.forget()
    if _host.module() is None:
        pytest.skip("the host helper cannot be built here")
    shapes = [(16, 5), (7,), (1,), (33, 3)]
    with_helper, state_c = _train(backend, shapes)
    monkeypatch.setenv(_host.NO_HELPER_ENV, "1")
    _host.forget()
    try:
        python, state_py = _train(backend, shapes)
    finally:
        _host.forget()
    for a, b in zip(with_helper, python):
        assert torch.equal(a, b)
    assert state_c["param_groups"] == state_py["param_groups"]
    assert state_c["state"].keys() == state_py["state"].keys()
    for key, entry in state_c["state"].items():
        assert entry.keys() == state_py["state"][key].keys()
        for name, value in entry.items():
            assert torch.equal(value, state_py["state"][key][name]), (key, name)


# ------------------------------------------------------------------ when it is built
_FRESH_PROCESS = """
import logging, sys
import torch
import prograd_fast as pf
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
backend = sys.argv[1]
ps = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
opt = pf.ProGradSGD(ps, lr=0.1, momentum=0.9, backend=backend)
for _ in range(3):
    for p in ps:
        p.grad = torch.randn(4, 3)
    opt.store_general_grads([-p.grad for p in ps])
    opt.step()
counts = opt.cache_stats()
print("STEPS", counts["python_host_steps"], counts["host_helper_steps"])
"""


def _fresh_process(tmp_path, backend, **env):
    """Three steps in a new Python process with an empty extension cache (nothing built
    before): its output (the host path's log, the step counts) and the files built."""
    build = tmp_path / "build"
    build.mkdir()
    environ = {**os.environ, "PROGRAD_FAST_BUILD_DIR": str(build), "TRITON_INTERPRET": "1",
               **env}
    if _host.NO_HELPER_ENV not in env:
        environ.pop(_host.NO_HELPER_ENV, None)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_FRESH_PROCESS), backend],
                         capture_output=True, text=True, env=environ, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, sorted(p.name for p in build.rglob("*") if "host" in p.name)


def test_the_torch_backend_never_builds_the_helper(tmp_path):
    """A backend="torch" user never waits for a compiler: the helper is not built."""
    stdout, built = _fresh_process(tmp_path, "torch")
    assert built == []
    assert "STEPS 3 0" in stdout


@pytest.mark.parametrize("env", [_host.NO_HELPER_ENV, _ext.NO_BUILD_ENV])
def test_opting_out_or_no_build_means_the_python_path(env, tmp_path):
    """Opted out, or no build allowed: a fused backend's optimizer runs the Python host
    path, says so once in the log, and builds nothing."""
    if tb.BACKEND.available() is not None:
        pytest.skip(f"triton: {tb.BACKEND.available()}")
    stdout, built = _fresh_process(tmp_path, "triton", **{env: "1"})
    assert built == []
    assert stdout.count("Python host path") == 1
    assert "STEPS 3 0" in stdout


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_fused_backend_takes_the_helper_after_its_first_step(backend, host):
    """The helper serves an optimizer once a fused backend ran one of its groups: the first
    step is gathered by the Python path, the next ones by the helper."""
    _skip_unavailable(backend)
    _host.forget()
    assert _host.module() is host
    params, gs = tensors(seed=10)
    opt = pf.ProGradSGD(params, lr=0.1, backend=backend)
    counts = []
    for _ in range(3):
        opt.store_general_grads(gs)
        opt.step()
        c = opt.cache_stats()
        counts.append((c["python_host_steps"], c["host_helper_steps"]))
    assert counts == [(1, 0), (1, 1), (1, 2)]


def test_an_empty_group_is_skipped_on_both_paths(host_mode):
    params, gs = tensors(seed=12)
    opt = pf.ProGradSGD(params, lr=0.1, backend=_fused_backend())
    opt.add_param_group({"params": []})
    for _ in range(3):
        opt.store_general_grads(gs)
        opt.step()
    assert opt.stats()[1] is None
    counts = opt.cache_stats()  # one group step per step: the empty group is not counted
    assert counts["python_host_steps"] + counts["host_helper_steps"] == 3


@pytest.mark.parametrize("shapes", [[(16, 5)], [(16, 5), (7,)]], ids=["one", "two"])
def test_momentum_reset_on_two_steps_in_a_row(shapes, host_mode):
    """A plan bound with momentum buffers it made itself (first step: ``buf = update``)
    must not be launched again as it is: when the next step again has no buffers at the
    very same addresses (the user dropped them again), the new ones must still reach the
    state, and the step after that must use them."""
    _skip_unavailable("triton")
    gen = torch.Generator().manual_seed(13)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.zeros(p.shape)
    generals = [torch.zeros(p.shape) for p in params]
    opt = pf.ProGradSGD(params, backend="triton", **HYPER)
    model = Model(params, **HYPER)
    for s in range(6):
        if s in (2, 3):  # momentum reset twice in a row
            for p in params:
                opt.state[p].pop(BK)
            model.bufs = [None] * len(params)
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, d, g in zip(params, grads, generals):  # the same tensors (addresses), new values
            p.grad.copy_(d)
            g.copy_(-0.5 * d + 0.1 * torch.randn(p.shape, generator=gen))
        opt.store_general_grads(generals)
        opt.step()
        model.step(grads, generals)
        _close(params, model, f"step {s}")
        assert all(BK in opt.state[p] for p in params), s
