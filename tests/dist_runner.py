"""Multi-process test runs that cannot hang or die silently on a slow, shared machine.

:func:`run_workers` starts ``fn(rank, out_dir, *args)`` in ``nprocs`` spawned processes and
waits for them with a deadline.  Each worker logs its steps with :func:`progress`; when a
worker raises, dies from a signal or exits non-zero, or the deadline passes, the others are
killed and the error gives every rank's last steps (and a raising rank's traceback), so a
failure says where each process was.  A worker that returns leaves with ``os._exit(0)``: its
results are on disk, and skipping the interpreter's teardown avoids c10d / gloo threads
being destroyed in arbitrary order at exit ("terminate called without an active
exception", SIGABRT).  Workers still tear down properly themselves (free DDP / FSDP modules,
barrier, ``destroy_process_group``): see tests/test_distributed.py.

Plain ``multiprocessing`` (spawn), not ``torch.multiprocessing.spawn``: a worker module that
does not import torch starts in a fraction of a second, which keeps the runner's own tests
cheap.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path


class DistributedRunError(AssertionError):
    """A multi-process run failed or timed out; the message holds every rank's progress."""


def progress(out_dir: str | Path, rank: int, step: str) -> None:
    """Append ``step`` (one line) to this rank's progress log, read back when a run fails."""
    with open(Path(out_dir) / f"rank{rank}.progress", "a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {step}\n")


def _entry(fn, rank: int, out_dir: str, args: tuple) -> None:
    try:
        fn(rank, out_dir, *args)
        progress(out_dir, rank, "exit")
        code = 0
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_status(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _report(out_dir: Path, nprocs: int, tail: int = 6) -> str:
    lines = []
    for rank in range(nprocs):
        path = out_dir / f"rank{rank}.progress"
        steps = path.read_text().splitlines()[-tail:] if path.exists() else ["(no progress yet)"]
        lines.append(f"rank {rank}: " + " | ".join(steps))
        error = out_dir / f"rank{rank}.error"
        if error.exists():
            lines.append(error.read_text().rstrip())
    return "\n".join(lines)


def run_workers(fn, args: tuple, nprocs: int, out_dir: str | Path, timeout: float = 300.0) -> None:
    """Run ``fn(rank, out_dir, *args)`` (a module-level function) in ``nprocs`` processes;
    raise :class:`DistributedRunError` with each rank's progress on any failure or after
    ``timeout`` seconds, having killed every process still alive."""
    out_dir = Path(out_dir)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_entry, args=(fn, rank, str(out_dir), args), daemon=True)
             for rank in range(nprocs)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [proc.exitcode for proc in procs]
            bad = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if bad:
                rank, code = bad[0]
                raise DistributedRunError(f"multi-process run failed: rank {rank} "
                                          f"{_exit_status(code)}\n" + _report(out_dir, nprocs))
            if all(code == 0 for code in codes):
                return
            if time.monotonic() >= deadline:
                raise DistributedRunError(f"multi-process run timed out after {timeout:.0f} s:\n"
                                          + _report(out_dir, nprocs))
            multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None],
                                            timeout=min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)


# ---------------------------------------------------------------- workers for the runner's tests
def hang_on_rank_1(rank: int, out_dir: str) -> None:
    progress(out_dir, rank, "waiting forever" if rank == 1 else "finished")
    if rank == 1:
        time.sleep(3600)


def raise_on_rank_1(rank: int, out_dir: str) -> None:
    progress(out_dir, rank, "about to fail" if rank == 1 else "finished")
    if rank == 1:
        raise ValueError("boom on rank 1")


def abort_on_rank_1(rank: int, out_dir: str) -> None:
    progress(out_dir, rank, "about to abort" if rank == 1 else "finished")
    if rank == 1:
        os.abort()
