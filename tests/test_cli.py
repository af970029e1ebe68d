"""The prograd-fast command: train on an ImageFolder tree, resume, zero-shot, the demo."""

import csv
import json

import pytest
import torch

from prograd_fast import cli
from prograd_fast.clip import digits as D

from clip_helpers import tiny_cfg
from test_clip_data import make_tree


@pytest.fixture
def tree_and_cfg(tmp_path):
    make_tree(tmp_path / "data", per_class=(4, 4, 4), size=18)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_cfg()))
    return tmp_path / "data", cfg, tmp_path / "out"


def _train(data, cfg, out, *extra):
    return cli.main(["train", "--data", str(data), "--model", str(cfg), "--output-dir", str(out),
                     "--shots", "2", "--batch-size", "4", "--n-ctx", "3", "--no-progress", *extra])


def test_train_prograd_one_epoch_writes_logs_and_resumes(tree_and_cfg, capsys):
    data, cfg, out = tree_and_cfg
    assert _train(data, cfg, out, "--epochs", "1", "--method", "prograd") == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["acc"]) <= 100.0
    assert float(rows[0]["ce"]) > 0 and rows[0]["conflict_rate"] != ""
    assert (out / "curves.png").stat().st_size > 0 and (out / "checkpoint.pt").exists()
    ctx1 = torch.load(out / "checkpoint.pt", weights_only=False)["ctx"]
    # resume: a second epoch continues from the checkpoint
    assert _train(data, cfg, out, "--epochs", "2", "--method", "prograd") == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert not torch.equal(state["ctx"], ctx1)
    log = json.loads((out / "log.json").read_text())
    assert [r["epoch"] for r in log["history"]] == [1, 2]
    assert "test accuracy" in capsys.readouterr().out


def test_train_coop_and_zeroshot_base_to_new(tree_and_cfg):
    data, cfg, out = tree_and_cfg
    assert _train(data, cfg, out / "z", "--method", "zeroshot", "--subsample", "base",
                  "--eval-new") == 0
    res = json.loads((out / "z" / "result.json").read_text())
    assert "new_acc" in res and res["acc"] is not None
    assert _train(data, cfg, out / "c", "--method", "coop", "--epochs", "1",
                  "--precision", "bf16", "--ctx-init", "a photo of a") == 0
    rows = list(csv.DictReader(open(out / "c" / "log.csv")))
    assert rows[0]["conflict_rate"] == ""


@pytest.mark.slow
def test_train_with_a_real_open_clip_model_name(tree_and_cfg):
    """The open_clip name path (random weights: no pretrained tag offline)."""
    data, _, out = tree_and_cfg
    assert cli.main(["train", "--data", str(data), "--model", "ViT-B-32", "--output-dir", str(out),
                     "--shots", "1", "--batch-size", "3", "--epochs", "1", "--n-ctx", "2",
                     "--no-progress", "--templates", "OxfordPets"]) == 0
    res = json.loads((out / "result.json").read_text())
    assert 0.0 <= res["acc"] <= 100.0


def test_train_needs_model_for_external_data(tree_and_cfg):
    data, _, out = tree_and_cfg
    with pytest.raises(SystemExit):
        cli.main(["train", "--data", str(data), "--output-dir", str(out)])


def test_demo_pretrains_once_and_prints_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROGRAD_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(D.PRETRAIN, "steps", 3)
    monkeypatch.setitem(D.PRETRAIN, "batch_size", 16)
    argv = ["demo", "--output-dir", str(tmp_path / "demo"), "--shots", "1", "--seeds", "1",
            "--epochs", "2"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "First run" in text and "ProGrad" in text and "zero-shot" in text
    assert (tmp_path / "demo" / "base_to_new.png").stat().st_size > 0
    rows = json.loads((tmp_path / "demo" / "base_to_new.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"zero-shot", "CoOp", "ProGrad"}
    assert len(list((tmp_path / "cache").glob("digits_tiny_clip_*.pt"))) == 1
    assert cli.main(argv) == 0
    assert "First run" not in capsys.readouterr().out  # loaded from the cache
