"""benchmarks/gpu_kernels_bench.py without a GPU: what it measures first (the fused backends
and torch's fused SGD; the compile peer last) and that every row is on disk as soon as it is
measured, so a run killed by its time limit keeps the numbers it had."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_kernels_bench as gkb  # noqa: E402


def test_fused_backends_first_compile_last():
    order = gkb.plan(gkb.GPU_SCENARIOS, torch.device("cuda"), "tensor")  # nothing runs
    phases = [phase for phase, *_ in order]
    assert phases == sorted(phases, key=gkb.PHASES.index)
    first = [(scen, name) for phase, scen, name, _ in order[:3]]
    assert first == [("coop 16x512", "prograd_fast-triton"), ("coop 16x512", "prograd_fast-cuda"),
                     ("coop 16x512", "torch_sgd")]
    compiles = [name for _, _, name, _ in order if name == "compile"]
    assert len(compiles) == len(gkb.GPU_SCENARIOS)
    assert [name for _, _, name, _ in order[-len(compiles):]] == compiles
    fused = {(scen, name) for phase, scen, name, _ in order if phase == "fused"}
    for scen in gkb.GPU_SCENARIOS:  # what each verdict needs comes before the rest
        assert {(scen, "prograd_fast-triton"), (scen, "prograd_fast-cuda"),
                (scen, "torch_sgd")} <= fused


def test_plan_mode_prints_the_order(capsys):
    assert gkb.main(["--plan", "--device", "cuda"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fused") and "prograd_fast-triton" in lines[0]
    assert lines[-1].startswith("compile")


class _Runner:
    def __init__(self, *args, **kwargs):
        self.opt = types.SimpleNamespace(_backend_cache=[{"cuda": {"plan": 1}}])

    def __call__(self):
        pass


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """The bench on a CPU with nothing built and a stubbed timer."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gkb, "ProGradRunner", _Runner)
    monkeypatch.setattr(gkb, "ForeachRunner", _Runner)
    monkeypatch.setattr(gkb, "SGDRunner", _Runner)
    monkeypatch.setattr(gkb, "available_backends", lambda: {})
    monkeypatch.setattr(gkb, "copy_bandwidth", lambda device: 1e10)
    monkeypatch.setattr(gkb, "cpu_ratios", lambda *a: None)
    return tmp_path / "gpu_kernels_bench.jsonl"


def _rows_on_disk(path):
    items = [json.loads(line) for line in path.read_text().splitlines()]
    return [item for item in items if "meta" not in item]


def test_each_row_is_on_disk_before_the_next_is_measured(stubbed, monkeypatch):
    on_disk = []

    def timer(fn, device, budget_s, quick, warmup=3, rounds=5):
        on_disk.append(len(_rows_on_disk(stubbed)))
        if len(on_disk) == 4:
            raise KeyboardInterrupt  # the step's time limit kills the run here
        return 10.0, None, 3

    monkeypatch.setattr(gkb, "time_runner", timer)
    with pytest.raises(KeyboardInterrupt):
        gkb.main(["--device", "cpu"])
    assert on_disk == [0, 1, 2, 3]
    rows = _rows_on_disk(stubbed)
    assert len(rows) == 3 and all(r["wall_us"] == 10.0 for r in rows)
    assert rows[0]["impl"] == "prograd_fast-cpp"  # the fused backend first
    meta = [json.loads(line)["meta"] for line in stubbed.read_text().splitlines()[:2]]
    assert "torch" in meta[0] and meta[1]["bandwidth_Bps"] == 1e10  # facts before the GPU's


def test_no_measurement_starts_past_the_budget(stubbed, monkeypatch):
    monkeypatch.setattr(gkb, "time_runner", lambda *a, **k: pytest.fail("measured past budget"))
    assert gkb.main(["--device", "cpu", "--budget-s", "0.5"]) == 0
    rows = _rows_on_disk(stubbed)
    assert rows and all("time budget" in r["skipped"] for r in rows)
    final = json.loads((stubbed.parent / "gpu_kernels_bench.json").read_text())
    assert final["results"] == rows


def test_each_verdict_is_printed_as_soon_as_its_rows_exist(stubbed, monkeypatch, capsys):
    """On CUDA (stubbed): the CoOp verdict comes right after CoOp's fused rows, before
    anything else is measured."""
    fake_peers = types.SimpleNamespace(
        PEERS=dict.fromkeys(("paper_style", "foreach", "torch_sgd", "compile")),
        make_problem=lambda *a, **k: None,
        build=lambda name, problem: types.SimpleNamespace(step=lambda: None))
    monkeypatch.setattr(gkb, "peers", fake_peers)
    monkeypatch.setattr(gkb, "_device_name", lambda device: "Stub GPU")
    monkeypatch.setattr(gkb, "make_group", lambda *a, **k: ([], [], []))
    monkeypatch.setattr(gkb, "GPU_SCENARIOS", {k: gkb.GPU_SCENARIOS[k]
                                               for k in ("coop 16x512", "maple 27 / 3.6M")})
    seen = []

    def timer(fn, device, budget_s, quick, warmup=3, rounds=5):
        seen.append(capsys.readouterr().out)  # what was printed before this measurement
        return (20.0 if len(seen) == 3 else 10.0), 9.0, 3  # the third is torch_sgd

    monkeypatch.setattr(gkb, "time_runner", timer)
    assert gkb.main(["--device", "cuda", "--compile-reserve-s", "0"]) == 0
    assert not any("VERDICT" in out for out in seen[:3])
    assert "VERDICT PASS coop 16x512: 0.500x torch fused SGD" in seen[3]
    assert "(prograd_fast-triton 10.0 us, torch_sgd 20.0 us; cuda plan=small 10.0 us)" in seen[3]
    assert "[Stub GPU, copy 10 GB/s]" in seen[3]
