"""The benchmark peers compute what the reference computes, and the benchmarks never rot.

Every implementation in ``benchmarks/peers.py`` is stepped a few times and compared with
``prograd_fast.functional.prograd_sgd`` and with an independent float64 computation written
here, on problems where some tensors conflict and some do not, so a benchmark never compares
implementations doing different work.  The suites are collected in a subprocess and the
optimizer suite runs at tiny sizes, and the report is built from its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prograd_fast.functional import prograd_sgd

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
import report  # noqa: E402
import scenarios  # noqa: E402

HYPER = dict(lr=0.05, momentum=0.9, weight_decay=0.01, lam=0.7)
SHAPES = [(1,), (3, 7), (13,), (2, 5, 3), (31,)]  # awkward sizes, mixed ranks
STEPS = 3


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy().reshape(-1)


def np_steps(problem: peers.Problem, steps: int, project: bool = True) -> tuple[list, list]:
    """float64 ProGrad (or plain, ``project=False``) + SGD with momentum and weight decay."""
    h = problem.hyper
    ps = [_f64(p) for p in problem.params]
    ds = [_f64(d) for d in problem.domain]
    gs = [_f64(g) for g in problem.general]
    if problem.granularity == "global":
        dot, nn = sum(float(d @ g) for d, g in zip(ds, gs)), sum(float(g @ g) for g in gs)
        coefs = [h["lam"] * dot / nn if dot < 0 < nn else 0.0] * len(ds)
    else:
        coefs = [h["lam"] * float(d @ g) / float(g @ g) if float(d @ g) < 0 < float(g @ g) else 0.0
                 for d, g in zip(ds, gs)]
    us = [d - c * g if project else d for d, g, c in zip(ds, gs, coefs)]
    bufs = [None] * len(ps)
    for _ in range(steps):
        for i, u in enumerate(us):
            u = u + h["weight_decay"] * ps[i]
            bufs[i] = u.copy() if bufs[i] is None else h["momentum"] * bufs[i] + u
            ps[i] = ps[i] - h["lr"] * bufs[i]
    return ps, bufs


def reference_steps(problem: peers.Problem, steps: int, project: bool = True):
    hyper = dict(problem.hyper)
    lam = hyper.pop("lam")
    bufs = [None] * len(problem.params)
    generals = problem.general if project else [None] * len(problem.general)
    for _ in range(steps):
        prograd_sgd(problem.params, problem.domain, generals, bufs, lam=lam,
                    granularity=problem.granularity, **hyper)
    return problem.params, bufs


def _tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def _problem(dtype, granularity, shapes=SHAPES, conflict="mixed"):
    return peers.make_problem(shapes, "cpu", dtype, granularity, seed=11, conflict=conflict,
                              hyper=HYPER)


def _build_or_skip(name: str, problem: peers.Problem) -> peers.Implementation:
    try:
        return peers.build(name, problem)
    except peers.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("conflict", ["all", "mixed"])
def test_make_problem_conflict_pattern(conflict):
    problem = peers.make_problem(SHAPES, "cpu", torch.float32, seed=3, conflict=conflict)
    for i, (p, d, g) in enumerate(zip(problem.params, problem.domain, problem.general)):
        assert p.shape == d.shape == g.shape == torch.Size(SHAPES[i])
        dot = float(_f64(d) @ _f64(g))
        aligned = conflict == "mixed" and i % 2 == 1
        expected = (0.5 if aligned else -0.5) * float(_f64(g) @ _f64(g))
        assert dot == pytest.approx(expected, rel=1e-4, abs=1e-5), (i, dot)


def test_benchmark_scenarios_take_the_projection_path():
    """The benchmark data must conflict, or the peers would skip the work being measured."""
    for scenario in scenarios.scenarios("tiny"):
        problem = peers.make_problem(scenario.shapes, "cpu", torch.float32, seed=0)
        for d, g in zip(problem.domain, problem.general):
            assert float(_f64(d) @ _f64(g)) < 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("name", [n for n in peers.implementation_names()
                                  if n not in ("torch_sgd", "compile")])
def test_peer_matches_reference_and_float64(name, granularity, dtype):
    if name == "paper_style" and granularity == "global":
        pytest.skip("the official loop is per tensor by construction")
    problem = _problem(dtype, granularity)
    originals = [t.clone() for t in problem.domain + problem.general]
    impl = _build_or_skip(name, problem)
    for _ in range(STEPS):
        impl.step()
    expected_p, expected_b = reference_steps(_problem(dtype, granularity), STEPS)
    np_p, np_b = np_steps(_problem(torch.float64, granularity), STEPS)
    bufs = impl.momentum_buffers()
    for i, p in enumerate(problem.params):
        torch.testing.assert_close(p, expected_p[i], **_tol(dtype))
        torch.testing.assert_close(bufs[i], expected_b[i], **_tol(dtype))
        np.testing.assert_allclose(_f64(p), np_p[i], **_tol(dtype))
        np.testing.assert_allclose(_f64(bufs[i]), np_b[i], **_tol(dtype))
    # Gradients are inputs: an implementation that modified them would change later rounds.
    for before, after in zip(originals, problem.domain + problem.general):
        assert torch.equal(before, after)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_compile_peer_matches_reference(granularity):
    shapes = [(5,), (3, 7), (2,)]
    problem = _problem(torch.float32, granularity, shapes)
    impl = _build_or_skip("compile", problem)
    assert impl.info["compile_s"] > 0
    for _ in range(STEPS - 2):  # building ran an eager step and the compiling step
        impl.step()
    expected_p, expected_b = reference_steps(_problem(torch.float32, granularity, shapes), STEPS)
    np_p, _ = np_steps(_problem(torch.float64, granularity, shapes), STEPS)
    for i, p in enumerate(problem.params):
        torch.testing.assert_close(p, expected_p[i], rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(impl.momentum_buffers()[i], expected_b[i], rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(_f64(p), np_p[i], rtol=2e-5, atol=2e-5)


def test_torch_sgd_peer_is_plain_sgd():
    problem = _problem(torch.float64, "tensor")
    impl = peers.build("torch_sgd", problem)
    for _ in range(STEPS):
        impl.step()
    fresh = _problem(torch.float64, "tensor")
    expected_p, expected_b = reference_steps(fresh, STEPS, project=False)
    np_p, _ = np_steps(_problem(torch.float64, "tensor"), STEPS, project=False)
    for i, p in enumerate(problem.params):
        torch.testing.assert_close(p, expected_p[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(impl.momentum_buffers()[i], expected_b[i],
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(_f64(p), np_p[i], rtol=1e-12, atol=1e-12)


def test_unknown_implementation_and_bad_options():
    problem = _problem(torch.float32, "tensor")
    with pytest.raises(ValueError, match="unknown implementation"):
        peers.build("prograd_fast-nope", problem)
    with pytest.raises(ValueError, match="conflict"):
        peers.make_problem(SHAPES, "cpu", conflict="some")


def test_scenarios_match_design_sizes():
    full = {s.name: s for s in scenarios.scenarios("full")}
    assert (full["coop"].tensors, full["coop"].elements) == (1, 16 * 512)
    assert full["maple"].tensors == 27 and 3.5e6 < full["maple"].elements < 3.7e6
    assert full["classctx"].elements == 1000 * 16 * 512
    assert full["dense64M"].elements == 64 * 2**20 and full["dense256M"].elements == 256 * 2**20
    for scale in ("cpu", "tiny"):  # every scale has the same scenario names, in order
        assert [s.name for s in scenarios.scenarios(scale)] == list(full)
    assert scenarios.bytes_per_step(10) == 320
    assert scenarios.bytes_per_step(10, torch.float16) == 160


def _bench_env(**extra) -> dict:
    env = dict(os.environ, PROGRAD_BENCH_SCALE="tiny", PROGRAD_BENCH_DEVICE="cpu", **extra)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def test_benchmarks_collect():
    """Every benchmark file imports and collects (the CI guard against rot)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=ROOT, env=_bench_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for scenario in scenarios.scenarios("tiny"):
        for impl in peers.implementation_names():
            assert f"test_optimizer_step[{scenario.name}-{impl}]" in out.stdout


@pytest.mark.slow
def test_optimizer_suite_runs_tiny_and_report_renders(tmp_path):
    """The optimizer suite runs end to end at tiny sizes and the report renders its JSON."""
    json_path, md, plots = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md", tmp_path / "plots"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_bench_optim.py", "-q",
         "-p", "no:cacheprovider", "--benchmark-only", "--benchmark-min-rounds=1",
         "--benchmark-max-time=0.001", "--benchmark-warmup=off", f"--benchmark-json={json_path}",
         "-k", "not compile or coop"],
        cwd=ROOT, env=_bench_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(json_path.read_text())
    ran = {b["param"] for b in data["benchmarks"]}
    assert "coop-compile" in ran and "maple-paper_style" in ran and "dense256M-torch_sgd" in ran
    md.write_text("# Benchmarks\n\nprose kept\n")
    assert report.main([str(json_path), "--output", str(md), "--plot-dir", str(plots)]) == 0
    text = md.read_text()
    assert "prose kept" in text and text.count(report.BEGIN.format("cpu")) == 1
    for b in data["benchmarks"]:
        scenario, impl = b["extra_info"]["scenario"], b["extra_info"]["implementation"]
        assert f"| {scenario} | {impl} | " in text
    assert (plots / "optimizer_step_cpu.png").stat().st_size > 1000
    # A second run replaces the section instead of appending another.
    assert report.main([str(json_path), "--output", str(md), "--no-plot"]) == 0
    assert md.read_text().count(report.BEGIN.format("cpu")) == 1


def _fake(name, scenario, impl, median, elements=1000, kind="optimizer_step"):
    return {"name": name, "group": scenario, "param": f"{scenario}-{impl}",
            "stats": {"median": median, "iqr": 0.0, "rounds": 5},
            "extra_info": {"kind": kind, "scenario": scenario, "implementation": impl,
                           "elements": elements, "tensors": 1, "bytes_per_step": 32 * elements,
                           "gbs": 32 * elements / median / 1e9,
                           "copy_fraction": 32 * elements / median / 1e9 / 10.0}}


def test_report_ratios_and_sections(tmp_path):
    medians = {"paper_style": 4e-3, "torch_sgd": 5e-4, "prograd_fast-torch": 1e-3}
    loop_us = {"paper_style": 3000.0, "torch_sgd": 100.0, "prograd_fast-torch": 150.0}
    benches = [_fake("t", "dense", impl, m) for impl, m in medians.items()]
    for bench in benches:
        bench["extra_info"]["device_us"] = loop_us[bench["extra_info"]["implementation"]]
    benches.append(_fake("e2e", "coop_e2e", "paper_style", 0.2, kind="e2e"))
    benches.append(_fake("e2e", "coop_e2e", "prograd_fast", 0.05, kind="e2e"))
    benches.append(_fake("e2e", "coop_e2e", "coop_fast", 0.04, kind="e2e"))
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": benches, "machine_info": {
        "prograd_bench": {"bench_device": "cpu", "copy_gbs": 10.0, "torch": "x"}}}))
    (run,) = report.gather([str(path)])
    text = report.render_section(run, None, "cmd")
    row = next(line for line in text.splitlines() if "| dense | prograd_fast-torch |" in line)
    cells = [c.strip() for c in row.split("|")]
    assert cells[5] == report.fmt_ratio(medians["paper_style"] / medians["prograd_fast-torch"])
    assert cells[6] == report.fmt_ratio(medians["prograd_fast-torch"] / medians["torch_sgd"])
    loop = text.split("CUDA events", 1)[1]
    loop_row = next(line for line in loop.splitlines() if line.startswith("| dense |"))
    assert f"{report.fmt_ratio(3000 / 150)} (prograd_fast-torch)" in loop_row
    assert report.fmt_ratio(150 / 100) in loop_row
    e2e = next(line for line in text.splitlines() if "| coop_e2e | prograd_fast |" in line)
    assert f"| {report.fmt_ratio(0.2 / 0.05)} | {report.fmt_ratio(0.05 / 0.04)} |" in e2e
    doc = report.replace_section("# B\n", "cpu", "first")
    doc = report.replace_section(doc + "\ntail\n", "cpu", "second")
    assert "second" in doc and "first" not in doc and doc.rstrip().endswith("tail")


def test_disagreement_accepts_the_same_math_and_catches_what_timing_would_hide():
    problem = _problem(torch.float32, "tensor")
    before = [p.clone() for p in problem.params]
    expected = peers.reference_state(problem, 2)
    for p, b in zip(problem.params, before):  # the reference works on a copy
        assert torch.equal(p, b)
    impl = peers.build("foreach", problem)
    impl.step()
    impl.step()
    assert peers.disagreement(impl, expected, rtol=2e-5, atol=2e-5) is None
    bufs = impl.momentum_buffers()
    # A shift along g of coefficient size (a wrong or missing projection) is caught ...
    bufs[0].add_(problem.general[0], alpha=0.3)
    assert "general gradient" in (peers.disagreement(impl, expected, 2e-5, 2e-5) or "")
    bufs[0].sub_(problem.general[0], alpha=0.3)
    # ... while one of reduction-rounding size is tolerated.
    bufs[0].add_(problem.general[0], alpha=1e-3)
    assert peers.disagreement(impl, expected, 2e-5, 2e-5) is None
    bufs[0].sub_(problem.general[0], alpha=1e-3)
    # An unwritten or wrong tail element and a NaN are caught.
    last = problem.params[-1].view(-1)
    last[-1] += 1e-3
    assert "param 4: " in (peers.disagreement(impl, expected, 2e-5, 2e-5) or "")
    last[-1] -= 1e-3
    bufs[1].view(-1)[0] = float("nan")
    assert "buffer 1" in (peers.disagreement(impl, expected, 2e-5, 2e-5) or "")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", [n for n in peers.implementation_names() if n != "compile"])
def test_peers_in_half_precision_past_the_fp16_range(name, dtype, tol):
    """Half-precision groups whose squared norms pass 65504 (fp16's largest value): every
    implementation must still agree with the float64 reference (reductions in fp32)."""
    def make() -> peers.Problem:
        return peers.make_problem([(70001,), (3,)], "cpu", dtype, "tensor", seed=5,
                                  conflict="mixed", hyper=HYPER)

    impl = _build_or_skip(name, make())
    impl.step()
    impl.step()
    expected = peers.reference_state(make(), 2, impl.granularity, impl.projects)
    assert peers.disagreement(impl, expected, rtol=tol, atol=tol) is None
