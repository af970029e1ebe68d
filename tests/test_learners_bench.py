"""The prompt-learner benchmark (``benchmarks/learners_bench.py``) keeps working: its tiny
mode times official KgCoOp against KgCoOp + ProGrad end to end and writes its JSON and
BENCHMARKS.md section; the official model and ours hold the same weights (same logits);
a method not registered yet is listed, not measured.  Skips without the vendored sources."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from vendor_sources import vendor_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import learners_bench as bench  # noqa: E402

OTHER_TEXT = "# Benchmarks\n\nkept as it is\n"


@pytest.fixture
def vendor() -> Path:
    path = vendor_dir()
    missing = [a for a in (bench.MULTIMODAL, bench.DASSL, bench.KGCOOP) if not (path / a).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found in {path}")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Where the official sources are unpacked, once for this module."""
    return tmp_path_factory.mktemp("learners_bench")


def test_tiny_kgcoop_runs_end_to_end_and_writes_its_section(vendor, work, tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(OTHER_TEXT + "<!-- prograd-bench:learners:begin -->\nold\n"
                  "<!-- prograd-bench:learners:end -->\ntail\n")
    out = tmp_path / "learners.json"
    before = {m for m in sys.modules if m.split(".")[0] in ("clip", "dassl", "trainers")}
    rc = bench.main(["--tiny", "--methods", "kgcoop", "--rounds", "1", "--vendor", str(vendor),
                     "--work", str(work), "--json", str(out), "--write", str(md)])
    assert rc == 0
    data = json.loads(out.read_text())
    row, = data["rows"]
    assert row["method"] == "kgcoop" and row["status"] == "measured" and row["target"] == 0.3
    assert row["official_ms"] > 0 and row["ours_ms"] > 0
    assert row["ratio"] == pytest.approx(row["ours_ms"] / row["official_ms"])
    assert row["met"] == (row["ratio"] <= 0.3)
    assert data["classes"] == 6 and data["batch"] == 4 and data["dtype"] == "float32"
    assert data["torch"] == torch.__version__ and data["device"]
    text = md.read_text()
    assert text.startswith(OTHER_TEXT) and text.endswith("tail\n") and "\nold\n" not in text
    assert "| kgcoop |" in text and "--tiny --methods kgcoop" in text
    # the official trees' modules are gone again, the fp32 patches undone
    assert {m for m in sys.modules if m.split(".")[0] in ("clip", "dassl", "trainers")} == before
    assert torch.ones(1).half().dtype == torch.float16
    # the section renders again from the JSON alone
    again = tmp_path / "again.md"
    again.write_text(OTHER_TEXT)
    assert bench.main(["--render", str(out), "--write", str(again)]) == 0
    assert again.read_text().split("<!--", 1)[1] == text.split("<!--", 1)[1].replace("tail\n", "")


def test_the_official_model_and_ours_hold_the_same_weights(vendor, work):
    scale, names = bench.TINY, bench.classnames(5)
    official = bench.load_official(vendor, work, ["kgcoop"])
    state = bench.base_state(official, scale)
    theirs, _ = bench.build_official(official, "kgcoop", scale, state, names)
    ours, _ = bench.build_ours("kgcoop", scale, state, names)
    images, _ = bench.batch(scale, len(names), 3)
    with torch.no_grad(), bench.fp32_official():
        expected, _ = theirs(images)
        mine, _ = ours(images)
    assert float((mine - expected).norm() / expected.norm()) <= 1e-5
    assert len(set(names)) == 5 and len({len(n.split()) for n in names}) > 1


def test_a_method_not_registered_yet_is_listed_not_measured(vendor, tmp_path, monkeypatch,
                                                              capsys):
    from prograd_fast.methods import METHODS

    monkeypatch.delitem(METHODS, "kgcoop+prograd")
    out = tmp_path / "learners.json"
    assert bench.main(["--tiny", "--methods", "kgcoop", "--vendor", str(vendor),
                       "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    row, = json.loads(out.read_text())["rows"]
    assert row["status"] == "not registered yet" and row["ratio"] is None
    assert "| kgcoop | - | - | - | <= 0.3x | not registered yet |" in capsys.readouterr().out
    assert not (tmp_path / "work").exists()  # nothing unpacked or built for it


def test_a_step_that_would_not_fit_in_memory_is_skipped_with_the_reason(vendor, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(bench, "available_gb", lambda: 0.1)
    out = tmp_path / "learners.json"
    assert bench.main(["--tiny", "--methods", "kgcoop", "--vendor", str(vendor),
                       "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    row, = json.loads(out.read_text())["rows"]
    assert row["status"] == "skipped: its official step needs about 1 GB of memory, 0 GB available"
    assert not (tmp_path / "work").exists()
    # the official CoCoOp step keeps every class prompt of every image for its backward
    full = bench.official_memory_gb("cocoop", bench.FULL, 100, 4)
    assert full > 15 and bench.official_memory_gb("cocoop", bench.FULL, 100, 1) < full / 3
    assert bench.official_memory_gb("kgcoop", bench.FULL, 100, 4) < full / 3


def test_the_deep_prompt_tree_builds_on_the_same_weights_as_open_clip(vendor, work):
    """The MaPLe repository's CLIP (CoCoOp's design) and open_clip encode images and the
    official prompts alike: the weights reach both through their own loaders."""
    scale, names = bench.TINY, bench.classnames(4)
    official = bench.load_official(vendor, work, ["cocoop"])
    state = bench.base_state(official, scale)
    theirs, _ = bench.build_official(official, "cocoop", scale, state, names)
    clip = bench.open_clip_model(scale, state)
    images, _ = bench.batch(scale, len(names), 2)
    with torch.no_grad(), bench.fp32_official():
        expected = theirs.image_encoder(images)
        learner = theirs.prompt_learner
        prompts = torch.cat([learner.token_prefix, learner.ctx.expand(len(names), -1, -1),
                             learner.token_suffix], dim=1)
        expected_text = theirs.text_encoder(prompts, theirs.tokenized_prompts)
    with torch.no_grad():
        mine = clip.encode_image(images)
        mine_text = clip.encode_text(theirs.tokenized_prompts)  # ctx = "a photo of a"'s tokens
    assert float((mine - expected).norm() / expected.norm()) <= 1e-5
    assert float((mine_text - expected_text).norm() / expected_text.norm()) <= 1e-5
