"""benchmarks/device_check.sh and its pieces, on the CPU: the script parses, its dry run
exits 0 with a clear "no CUDA device" verdict per target, its GPU steps walk without a typo
(plan-only mode), and the verdicts and the BENCHMARKS.md section come out right."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import device_verdicts as dv  # noqa: E402

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="bash and coreutils timeout needed")


def _run(tmp_path, **env):
    full = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), **env)
    full.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=600)


@needs_bash
def test_the_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@needs_bash
@pytest.mark.slow
def test_dry_run_exits_0_with_a_no_cuda_verdict_per_target(tmp_path):
    proc = _run(tmp_path, DEVICE_CHECK_DRY_RUN="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "no CUDA device" in out
    verdicts = [line for line in out.splitlines() if line.startswith("VERDICT")]
    assert verdicts == dv.no_device_lines(), verdicts
    assert "sanitize driver done: 0 failed" in out  # the driver ran its Triton cases
    assert (tmp_path / "out" / "device_check.log").exists()


@needs_bash
def test_plan_only_walks_every_gpu_step(tmp_path):
    proc = _run(tmp_path, DEVICE_CHECK_PLAN_ONLY="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    steps = [line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  plan ")]
    for name in ("build", "test_gpu_step_path", "gpu_kernels_bench", "verdicts",
                 "test_cuda_build", "memcheck", "racecheck", "gpu_hardening.py",
                 "gpu_e2e.py", "test_triton_backend"):
        assert any(name in s for s in steps), (name, steps)
    assert "FAIL" not in out


BW = 4.0e12  # bytes/s, as measured in the run
M = 2**20


def _row(scenario, impl, wall, elements=1):
    return dict(scenario=scenario, impl=impl, wall_us=wall, device_us=wall * 0.9,
                tensors=1, elements=elements, iters=10)


def _results():
    # floors at 4 TB/s: 8.2M (1000x16x512) x 32 B = 65.5 us; 64M x 32 B = 536.9 us,
    # x 24 B = 402.7 us; 256M x 32 B = 2147.5 us
    return [
        _row("coop 16x512", "prograd_fast-triton", 14.0),
        _row("coop 16x512", "prograd_fast-cuda plan=small", 12.0),
        _row("coop 16x512", "prograd_fast-cuda[coop]", 5.0),  # forced plans are not judged
        _row("coop 16x512", "torch_sgd", 23.0),
        _row("maple 27 / 3.6M", "prograd_fast-triton", 61.0),
        _row("maple 27 / 3.6M", "prograd_fast-cuda plan=two_pass", 55.0),
        _row("maple 27 / 3.6M", "torch_sgd", 50.0),
        dict(scenario="classctx 8.2M", impl="prograd_fast-triton", skipped="no CUDA device"),
        _row("dense 64M", "prograd_fast-triton", 560.0, elements=64 * M),
        _row("dense 64M", "prograd_fast-cuda plan=coop", 410.0, elements=64 * M),
        _row("dense 256M", "prograd_fast-cuda plan=two_pass", 2300.0, elements=256 * M),
    ]


def test_verdicts_are_ratios_to_what_the_same_run_measured():
    lines = dv.verdict_lines(_results(), BW, "NVIDIA H100 80GB HBM3")
    assert len(lines) == len(dv.TARGETS)
    coop, maple, classctx, d64, d256 = lines
    # CoOp: best fused 12.0 us / torch fused SGD 23.0 us = 0.522 <= 0.6
    assert coop.startswith("VERDICT PASS coop 16x512: 0.522x torch fused SGD <= 0.6x")
    assert "prograd_fast-cuda plan=small 12.0 us, torch_sgd 23.0 us" in coop
    assert "triton 14.0 us" in coop and "cuda[coop]" not in coop
    # 27 tensors: 55 / 50 = 1.1 > 1.0
    assert maple.startswith("VERDICT FAIL maple 27 / 3.6M: 1.100x torch fused SGD <= 1x")
    assert classctx.startswith("VERDICT NOT RUN classctx 8.2M") and "no CUDA device" in classctx
    # 64M: the single-pass coop plan is judged on 24 B/element: 410 / 402.65 = 1.018
    assert d64.startswith("VERDICT PASS dense 64M: 1.018x the copy floor <= 1.03x")
    assert "floor 403 us = 24 B/elem" in d64
    # 256M two passes: 2300 / 2147.5 = 1.071
    assert d256.startswith("VERDICT FAIL dense 256M: 1.071x the copy floor")
    assert "32 B/elem" in d256
    for line in lines:
        assert line.endswith("[NVIDIA H100 80GB HBM3, copy 4000 GB/s]"), line


def test_the_same_times_pass_on_a_faster_sgd_and_fail_on_a_slower_card_floor():
    """Targets follow the card: a ratio, never an absolute number of microseconds."""
    rows = _results()
    slow_card = dv.verdict_lines(rows, BW / 2, "slow card")  # floors double
    assert slow_card[3].startswith("VERDICT PASS dense 64M: 0.509x")
    rows = [dict(r, wall_us=15.0) if r["impl"] == "torch_sgd" and "coop" in r["scenario"] else r
            for r in rows]
    assert dv.verdict_lines(rows, BW, "x")[0].startswith("VERDICT FAIL coop 16x512: 0.800x")


def test_a_ratio_target_without_torch_sgd_is_not_run():
    rows = [r for r in _results() if r["impl"] != "torch_sgd"]
    coop = dv.verdict_lines(rows, BW, "card")[0]
    assert coop.startswith("VERDICT NOT RUN coop 16x512") and "fused SGD was not timed" in coop
    assert dv.verdict_lines(_results(), None, "card")[3].startswith("VERDICT NOT RUN dense 64M")


def test_bytes_per_element_by_plan():
    assert dv.bytes_per_element("prograd_fast-triton") == 32
    assert dv.bytes_per_element("prograd_fast-cuda plan=two_pass") == 32
    assert dv.bytes_per_element("prograd_fast-cuda plan=coop") == 24
    assert dv.bytes_per_element("prograd_fast-cuda[small]") == 24


def test_rows_written_one_by_one_are_read_back_even_when_cut_short(tmp_path):
    path = tmp_path / "gpu_kernels_bench.jsonl"
    meta = dict(device_name="NVIDIA H200", bandwidth_Bps=BW, torch="2.11")
    rows = _results()[:4]
    path.write_text("\n".join([json.dumps(dict(meta=meta))] + [json.dumps(r) for r in rows])
                    + '\n{"scenario": "maple 27 / 3.6M", "impl": "prograd_')  # killed here
    data = dv.load(path)
    assert data["device_name"] == "NVIDIA H200" and data["results"] == rows
    assert dv.verdict_lines(data["results"], data["bandwidth_Bps"],
                            data["device_name"])[0].startswith("VERDICT PASS coop 16x512")


def test_the_section_is_written_between_its_markers(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nprose\n\n<!-- prograd-bench:cpu:begin -->\ncpu\n"
                  "<!-- prograd-bench:cpu:end -->\n")
    data = dict(device="cuda", device_name="NVIDIA H200", torch="2.11", triton="3.6",
                date="2026-11-29", bandwidth_Bps=BW, granularity="tensor",
                results=_results())
    results = tmp_path / "r.json"
    results.write_text(json.dumps(data))
    assert dv.main([str(results), "--write", str(md)]) == 0
    text = md.read_text()
    assert "prose" in text and "<!-- prograd-bench:cpu:end -->" in text
    assert text.count("<!-- prograd-bench:gpu-check:begin -->") == 1
    assert "NVIDIA H200" in text and "VERDICT PASS coop 16x512" in text
    assert "| dense 64M | prograd_fast-triton | 560.0 | 504.0 | 536.9 | 1.04 |" in text
    dv.main([str(results), "--write", str(md)])  # replaced, not appended
    assert md.read_text().count("<!-- prograd-bench:gpu-check:begin -->") == 1


def test_host_report_renders_targets_and_the_paired_ratio(tmp_path):
    import host_report

    def bench(name, median, **extra):
        return dict(name=name, stats=dict(median=median * 1e-6, iqr=1e-6),
                    options=dict(timer="process_time"), extra_info=extra)

    data = dict(datetime="2026-11-29", machine_info=dict(prograd_bench=dict(
        device_name="cpu", cpu_count=2, torch_threads=1, torch="2.x", triton="3.x",
        python="3.11")), benchmarks=[
        bench("test_host_path[coop-c]", 7.5, target_us=8.0, tensors=1, host="c",
              paired_python_over_c=2.5),
        bench("test_host_path[maple27-c]", 25.0, target_us=20.0, tensors=27, host="c"),
        bench("test_host_path[maple27-python]", 90.0, tensors=27, host="python"),
        bench("test_whole_step[cpp]", 12.0, paired_over_torch_fused=0.8),
        bench("test_host_path_alternating[coop-c-cpu]", 9.0, target_ratio=1.5,
              paired_alternating_over_stable=1.3),
        bench("test_host_path_alternating[maple27-c-cpu]", 40.0, target_ratio=1.5,
              paired_alternating_over_stable=2.0)])
    text = host_report.render(data, "cmd")
    assert "| test_host_path[coop-c] | 7.5 us | 1.0 us | 8 us | PASS | paired Python path / C " \
        "helper = 2.5x" in text
    assert "| test_host_path[maple27-c] | 25.0 us | 1.0 us | 20 us | FAIL |" in text
    assert "| test_host_path[maple27-python] | 90.0 us | 1.0 us |  |  | Python path (no helper" in text
    assert "PASS | paired cpp / torch fused SGD = 0.80x" in text
    assert "| test_host_path_alternating[coop-c-cpu] | 9.0 us | 1.0 us |  | PASS | paired " \
        "alternating / stable addresses = 1.30x (target <= 1.5x)" in text
    assert "| test_host_path_alternating[maple27-c-cpu] | 40.0 us | 1.0 us |  | FAIL |" in text


def test_rehearsal_hook_stops_a_process_at_its_first_cuda_call(tmp_path):
    """benchmarks/rehearsal/sitecustomize.py: a GPU path runs up to its first CUDA call."""
    script = tmp_path / "gpu_script.py"
    script.write_text("import torch\nassert torch.cuda.is_available()\nx = torch.ones(2)\n"
                      "print('before', flush=True)\ny = torch.ones(2, device='cuda')\n"
                      "print('after')\n")
    stops = tmp_path / "stops"
    env = dict(os.environ, PROGRAD_FAST_REHEARSAL="1", PROGRAD_FAST_REHEARSAL_STOPS=str(stops),
               PYTHONPATH=str(ROOT / "benchmarks" / "rehearsal"))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 86, proc.stdout + proc.stderr
    assert "before" in proc.stdout and "after" not in proc.stdout
    assert f"REHEARSAL STOP before the first CUDA call: {script}:5" in proc.stdout
    assert stops.read_text().endswith(f"{script}:5 in <module>\n")  # seen under pytest too
    env.pop("PROGRAD_FAST_REHEARSAL")  # without the switch the hook does nothing
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == str(torch_cuda_available())


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
