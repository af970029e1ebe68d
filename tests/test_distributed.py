"""torch.distributed: DDP and FSDP2 (gloo, 2 processes on the CPU) give the single-process
result on the concatenated batch; the stock two-backward pattern under DDP does not.

The processes run under tests/dist_runner.py: a deadline, collective timeouts, a clean
teardown (modules freed, barrier, destroy_process_group, no interpreter teardown), and a
failure report giving each rank's last steps, so a slow shared machine cannot hang or
abort CI silently."""

from __future__ import annotations

import gc
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import dist_runner
import prograd_fast as pf
from dist_runner import DistributedRunError, progress, run_workers
from hardening_cases import batch, losses, tiny_model

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD, N, STEPS = 2, 16, 3
# Generous for a loaded 2-core machine (the run takes ~15-40 s there); a hang fails with
# every rank's progress instead of blocking CI.
RUN_TIMEOUT, COLLECTIVE_TIMEOUT = 600.0, timedelta(seconds=300)
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, lam=1.0)
DT = torch.float64  # exact comparison: float64 all the way (gloo reduces float64)


def _shard(x, rank):
    n = x.shape[0] // WORLD
    return x[rank * n:(rank + 1) * n]


def _train(model, opt, rank, how):
    """STEPS steps; ``rank=None``: single process on the whole batch."""
    for step in range(STEPS):
        x, y, zs = batch(step, N, DT)
        if rank is not None:
            x, y, zs = _shard(x, rank), _shard(y, rank), _shard(zs, rank)
        opt.zero_grad()
        if how != "accum":
            ce, kl = losses(model, x, y, zs)
        if how == "backward":
            pf.backward(opt, ce, kl)
        elif how == "helper":  # general grads by hand, then the documented helper
            from prograd_fast.distributed import all_reduce_general_grads
            params = list(model.parameters())
            opt.store_general_grads(list(torch.autograd.grad(kl, params, retain_graph=True)))
            all_reduce_general_grads(opt)
            ce.backward()
        elif how == "accum":  # two micro-batches; DDP's no_sync and no all-reduce on the first
            import contextlib
            half = x.shape[0] // 2
            for i, last in ((0, False), (1, True)):
                sl = slice(i * half, (i + 1) * half)
                ctx = contextlib.nullcontext() if last else model.no_sync()
                with ctx:
                    ce, kl = losses(model, x[sl], y[sl], zs[sl])
                    pf.backward(opt, ce / 2, kl / 2, all_reduce=None if last else False)
        elif how == "two_backward":  # the stock pattern: DDP ignores the second backward
            kl.backward(retain_graph=True)
            opt.store_general_grads()
            ce.backward()
        opt.step()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _result(model, opt):
    params = [_full(p.detach()).clone() for p in model.parameters()]
    bufs = [_full(opt.state[p]["momentum_buffer"]).clone() for p in model.parameters()]
    stats = {k: v.clone() for k, v in opt.stats()[0].items()}
    return params, bufs, stats


def _run_case(rank, wrap, how, granularity):
    """One case, in its own frame: its DDP / FSDP2 module (which holds the process group)
    is freed on return, before the group is destroyed."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = tiny_model(DT)
    if wrap == "ddp":
        module = DDP(model)
        params = module.parameters()
    else:
        from torch.distributed.fsdp import fully_shard
        module = fully_shard(model)
        params = model.parameters()
    opt = pf.ProGradSGD(params, granularity=granularity, **HYPER)
    _train(module, opt, rank, how)
    return _result(model, opt)


def _worker(rank, out_dir, cases):
    """A rank: every case, results saved atomically, then a clean teardown.  An exception
    propagates (dist_runner reports it and stops the other rank, which would otherwise
    wait in a collective); collectives time out after COLLECTIVE_TIMEOUT instead of hanging."""
    progress(out_dir, rank, "init")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}",
                            rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    results = {}
    for name, wrap, how, granularity in cases:
        progress(out_dir, rank, f"case {name}")
        results[name] = _run_case(rank, wrap, how, granularity)
    gc.collect()
    tmp = os.path.join(out_dir, f"rank{rank}.tmp")
    torch.save(results, tmp)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pt"))
    progress(out_dir, rank, "saved; teardown")
    dist.barrier()  # nobody closes its connections while a peer still talks
    dist.destroy_process_group()
    progress(out_dir, rank, "done")


CASES = [
    ("ddp-backward-global", "ddp", "backward", "global"),
    ("ddp-backward-tensor", "ddp", "backward", "tensor"),
    ("ddp-helper-global", "ddp", "helper", "global"),
    ("ddp-accum-global", "ddp", "accum", "global"),
    ("ddp-two_backward", "ddp", "two_backward", "global"),
    ("fsdp2-backward-global", "fsdp2", "backward", "global"),
    ("fsdp2-backward-tensor", "fsdp2", "backward", "tensor"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_workers(_worker, (CASES,), WORLD, out, timeout=RUN_TIMEOUT)
    for rank in range(WORLD):  # every rank went through the whole teardown
        steps = [line.split(" ", 1)[1] for line in (out / f"rank{rank}.progress").read_text().splitlines()]
        assert steps[-3:] == ["saved; teardown", "done", "exit"], steps
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single(granularity):
    model = tiny_model(DT)
    opt = pf.ProGradSGD(model.parameters(), granularity=granularity, **HYPER)
    _train(model, opt, None, "backward")
    return _result(model, opt)


def _assert_equal_results(got, ref):
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for key in ("coef", "dot", "general_norm_sq", "domain_norm_sq", "conflict"):
        torch.testing.assert_close(got[2][key], ref[2][key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,wrap,how,granularity",
                         [c for c in CASES if c[2] != "two_backward"], ids=lambda v: str(v))
def test_equals_single_process_on_concatenated_batch(runs, name, wrap, how, granularity):
    ref = _single(granularity)
    for rank in range(WORLD):
        got = runs[rank][name]
        assert not isinstance(got, str), got
        _assert_equal_results(got, ref)


def test_single_process_run_projects():
    """Guard: the compared runs hit conflicts, so the projection (and its reduction) matters."""
    model = tiny_model(DT)
    opt = pf.ProGradSGD(model.parameters(), **HYPER)
    hits = 0
    for step in range(STEPS):
        x, y, zs = batch(step, N, DT)
        opt.zero_grad()
        pf.backward(opt, *losses(model, x, y, zs))
        opt.step()
        hits += int(opt.stats()[0]["conflict"])
    assert hits >= 1


def test_stock_two_backward_pattern_is_not_reduced_by_ddp(runs):
    """Documented pitfall: DDP reduces only the first backward after a forward; the second
    (here the domain gradient) stays local, so the processes drift apart."""
    a, b = runs[0]["ddp-two_backward"], runs[1]["ddp-two_backward"]
    assert not isinstance(a, str), a
    assert any(not torch.allclose(x, y) for x, y in zip(a[0], b[0]))


def test_all_reduce_is_a_noop_without_process_group():
    from prograd_fast.distributed import all_reduce_general_grads
    model = tiny_model()
    opt = pf.ProGradSGD(model.parameters(), lr=0.1)
    g = [torch.randn_like(p) for p in model.parameters()]
    opt.store_general_grads(g)
    all_reduce_general_grads(opt)
    from prograd_fast.amp import pending_general_grads
    assert all(x.data_ptr() == y.data_ptr() for x, y in zip(pending_general_grads(opt), g))


# ------------------------------------------------------------------ the runner itself
def test_runner_reports_a_hung_rank_with_its_progress(tmp_path):
    start = time.monotonic()
    with pytest.raises(DistributedRunError,
                       match=r"timed out after 15 s(.|\n)*rank 1: .*waiting forever"):
        run_workers(dist_runner.hang_on_rank_1, (), 2, tmp_path, timeout=15)
    assert time.monotonic() - start < 45  # killed, not waited for


@pytest.mark.parametrize("worker,match", [
    ("raise_on_rank_1", r"rank 1 exited with status 1(.|\n)*about to fail(.|\n)*ValueError: boom"),
    ("abort_on_rank_1", r"rank 1 was killed by SIGABRT(.|\n)*about to abort"),
])
def test_runner_reports_a_failing_rank(tmp_path, worker, match):
    with pytest.raises(DistributedRunError, match=match):
        run_workers(getattr(dist_runner, worker), (), 2, tmp_path, timeout=120)
