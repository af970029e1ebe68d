"""benchmarks/gpu_learners.py, the device check of the prompt learners, runs on the CPU.

The GPU machine runs it once per device check (benchmarks/device_check.sh), so its CPU mode
(fp32 and bf16 against float64), its failure on a wrong step and its rehearsal (stopped at
its first CUDA call) are kept working here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prograd_fast.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_learners.py"
CPU = ["--device", "cpu", "--tiny", "--backend", "torch"]
TINY = [*CPU, "--budget-s", "600"]


def run(args: list[str], out: Path, **env) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", **env))
    path = out / "gpu_learners.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return proc, rows


def prograd_learners() -> list[str]:
    return [n for n, m in METHODS.items() if m.learner is not None and m.prograd]


def test_cpu_run_checks_every_prograd_learner(tmp_path):
    proc, rows = run([*TINY, "--iters", "0"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rows[0]["kind"] == "meta" and rows[0]["torch"] == torch.__version__
    assert {"kgcoop+prograd", "cocoop+prograd"} <= set(prograd_learners())
    for method in prograd_learners():
        checks = {r["check"]: r for r in rows if r.get("method") == method and r["kind"] == "check"}
        assert set(checks) == {"fp32", "bf16"}, (method, proc.stdout)
        for row in checks.values():
            assert row["status"] == "PASS" and row["finite"] and row["rel_err"] <= row["tol"]
            assert row["fired"] and row["ref_fired"]  # the projection is exercised
        assert checks["fp32"]["rel_err"] < 1e-4  # fp32 rounding, far inside its tolerance
        assert f"PASS  {method}" in proc.stdout
    assert not any(r["kind"] == "time" for r in rows)  # --iters 0: no timing


def test_timing_rows(tmp_path):
    method = prograd_learners()[0]
    proc, rows = run([*TINY, "--iters", "1", "--methods", method], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    times = [r for r in rows if r["kind"] == "time"]
    assert [(r["method"], r["check"], r["iters"]) for r in times] == [
        (method, "fp32", 1), (method, "bf16", 1)]
    assert all(r["ms_per_step"] > 0 for r in times)
    assert proc.stdout.count(f"time  {method}") == 2


def test_a_wrong_device_step_fails(tmp_path):
    """1% too large an update (``--perturb``) is caught by the fp32 check: exit status 1."""
    method = prograd_learners()[0]
    proc, rows = run([*TINY, "--iters", "0", "--methods", method, "--perturb", "0.01"], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fp32 = next(r for r in rows if r.get("check") == "fp32")
    assert fp32["status"] == "FAIL" and 0.005 < fp32["rel_err"] < 0.02
    assert f"FAIL  {method}" in proc.stdout
    assert not any(r["kind"] == "time" for r in rows)


def test_budget_spent_skips_with_a_line(tmp_path):
    proc, rows = run([*CPU, "--budget-s", "0", "--iters", "0"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    skipped = [r for r in rows if r["kind"] == "skip"]
    assert [r["method"] for r in skipped] == prograd_learners()
    assert proc.stdout.count("SKIP  ") == len(skipped) and "--budget-s raises it" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a CUDA device")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    proc, rows = run([], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device here; skipped" in proc.stdout and rows == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal fakes a CUDA device")
def test_rehearsal_reaches_the_first_cuda_call(tmp_path):
    """As in device_check.sh's rehearsal: everything up to the first CUDA call runs."""
    proc, rows = run(["--tiny"], tmp_path, PROGRAD_FAST_REHEARSAL="1",
                     PYTHONPATH=str(ROOT / "benchmarks" / "rehearsal"))
    assert proc.returncode == 86, proc.stdout + proc.stderr
    assert f"REHEARSAL STOP before the first CUDA call: {SCRIPT}:" in proc.stdout
    assert "in check_method" in proc.stdout
    assert rows[0]["kind"] == "meta" and len(rows) == 1
