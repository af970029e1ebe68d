"""The prograd-fast command: train on an ImageFolder tree, resume, zero-shot, the demo."""

import csv
import json
import re
import subprocess
import sys

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


def test_train_prograd_writes_logs_resumes_when_interrupted_and_reprints(tree_and_cfg, capsys,
                                                                         monkeypatch):
    from prograd_fast.clip.trainer import Trainer

    data, cfg, out = tree_and_cfg
    real, calls = Trainer._epoch, []

    def epoch(self):  # Ctrl-C in the second epoch
        calls.append(self.epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "_epoch", epoch)
    assert _train(data, cfg, out, "--epochs", "2", "--method", "prograd") == 130
    err = capsys.readouterr().err
    assert err == "prograd-fast: interrupted; rerun the same command to resume\n"
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert len(rows) == 1
    assert float(rows[0]["ce"]) > 0 and rows[0]["conflict_rate"] != ""
    assert (out / "curves.png").stat().st_size > 0 and not (out / "result.json").exists()
    ctx1 = torch.load(out / "checkpoint.pt", weights_only=False)["ctx"]
    # the same command resumes: the second epoch continues from the checkpoint
    assert _train(data, cfg, out, "--epochs", "2", "--method", "prograd") == 0
    text = capsys.readouterr().out
    assert f"resuming the run in {out} (same settings) from the checkpoint of epoch 1 of 2" in text
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and len(state["history"]) == 2 and calls == [0, 1, 1]
    assert not torch.equal(state["ctx"], ctx1)
    log = json.loads((out / "log.json").read_text())
    assert [r["epoch"] for r in log["history"]] == [1, 2]
    line = next(t for t in text.splitlines() if t.startswith("test accuracy"))
    # and once more: the finished run's result, reprinted without training or testing
    assert _train(data, cfg, out, "--epochs", "2", "--method", "prograd") == 0
    text = capsys.readouterr().out
    assert "finished, with the same settings: reprinting its result" in text
    assert [t for t in text.splitlines() if t.startswith("test accuracy")] == [line]
    assert calls == [0, 1, 1]


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


@pytest.fixture
def fast_digits(tmp_path, monkeypatch):
    """The embedded digits model, pretrained for 3 steps into a temporary cache."""
    monkeypatch.setenv("PROGRAD_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(D.PRETRAIN, "steps", 3)
    monkeypatch.setitem(D.PRETRAIN, "batch_size", 16)
    monkeypatch.chdir(tmp_path)


def test_train_with_its_defaults_runs(fast_digits, tmp_path, capsys):
    """`prograd-fast train` with every default (digits, the digits model, its context, 16
    shots, ...) but the epoch count, cut to 1 for CI time (the defaults used to fail before
    the first step)."""
    assert cli.main(["train", "--epochs", "1"]) == 0
    out = tmp_path / "runs" / "digits_prograd_16shot_seed1_epochs1"  # the option not at its default
    result = json.loads((out / "result.json").read_text())
    assert 0.0 <= result["acc"] <= 100.0
    assert "prompt length" in capsys.readouterr().out


def _error_line(capsys, argv) -> str:
    """``main(argv)`` must fail with exit status 2 and exactly one line on stderr."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prograd-fast: error: ") and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_and_exit_2(tree_and_cfg, fast_digits, tmp_path, capsys):
    data, cfg, out = tree_and_cfg
    base = ["train", "--output-dir", str(out), "--no-progress", "--epochs", "1"]
    assert "--model is required" in _error_line(capsys, base + ["--data", str(data)])
    assert "does not exist" in _error_line(capsys, base + ["--data", str(tmp_path / "nowhere"),
                                                           "--model", str(cfg)])
    assert "not an ImageFolder" in _error_line(capsys, base + ["--data", str(tmp_path),
                                                               "--model", str(cfg)])
    assert "unknown --model 'ViT-Z-99'" in _error_line(capsys, base + ["--data", str(data),
                                                                        "--model", "ViT-Z-99"])
    assert "cannot load --model 'local-dir:" in _error_line(
        capsys, base + ["--data", str(data), "--model", f"local-dir:{tmp_path / 'nowhere'}"])
    (tmp_path / "bad.json").write_text("{not json")
    assert "cannot load --model" in _error_line(capsys, base + ["--data", str(data),
                                                                "--model", str(tmp_path / "bad.json")])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert "with --pretrained" in _error_line(capsys, base + ["--data", str(data), "--model", str(cfg),
                                                              "--pretrained", str(tmp_path / "garbage.pt")])
    assert "prompts do not fit in 16 tokens" in _error_line(capsys, base + ["--n-ctx", "16"])
    assert "unknown template" in _error_line(capsys, base + ["--data", str(data), "--model", str(cfg),
                                                             "--templates", "NoSuchSet"])
    assert "--eval-new needs --subsample base" in _error_line(capsys, base + ["--eval-new"])
    assert "--lam must be in [0, 1]" in _error_line(capsys, base + ["--lam", "2"])
    assert "--backend 'cuda' cannot run here" in _error_line(capsys, base + ["--backend", "cuda"])
    ckpt_dir = tmp_path / "broken"
    ckpt_dir.mkdir()
    (ckpt_dir / "checkpoint.pt").write_bytes(b"\x00truncated")
    err = _error_line(capsys, ["train", "--output-dir", str(ckpt_dir), "--no-progress",
                               "--data", str(data), "--model", str(cfg), "--n-ctx", "2"])
    assert "cannot resume from" in err and "--no-resume" in err


@pytest.mark.parametrize("extra,message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--momentum", "-0.5"], "--momentum must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0"),
    (["--class-specific", "--subsample", "base", "--eval-new"], "--eval-new cannot transfer"),
    (["--device", "nowhere"], "--device 'nowhere'"),
])
def test_more_bad_inputs_are_refused_before_training(tree_and_cfg, capsys, extra, message):
    """Refused up front in one line, not by a traceback (a negative lr / momentum / weight
    decay in ProGradSGD, temperature 0 at the first loss, a class-specific context after the
    whole training run, when --eval-new transfers it)."""
    data, cfg, out = tree_and_cfg
    argv = ["train", "--output-dir", str(out), "--no-progress", "--epochs", "1", "--data",
            str(data), "--model", str(cfg), "--n-ctx", "2", *extra]
    assert message in _error_line(capsys, argv)
    assert not (out / "checkpoint.pt").exists()


def test_console_script_exit_status_and_stderr(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "prograd_fast.cli", "train", "--data",
                           str(tmp_path / "missing"), "--model", "ViT-B-16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"prograd-fast: error: --data {str(tmp_path / 'missing')!r} does not exist (an ImageFolder "
        f"root, a CoOp split_*.json or a folder holding one, or 'digits')"]


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


def test_share_prefix_choices_are_the_encoders_layouts():
    from prograd_fast.clip.shared_prefix import LAYOUTS

    assert cli.SHARE_PREFIX_CHOICES == ("auto", "off", *LAYOUTS)


def test_share_prefix_option_changes_the_encoding_not_the_result(tree_and_cfg, capsys):
    """--share-prefix only chooses how the text tower runs: one epoch of ProGrad lands on the
    same context (to rounding) with the prefix shared (two layouts) and with it off."""
    data, cfg, out = tree_and_cfg
    ctx, lines = {}, {}
    for choice in ("off", "auto", "packed"):
        assert _train(data, cfg, out / choice, "--epochs", "1", "--method", "prograd",
                      "--share-prefix", choice) == 0
        ctx[choice] = torch.load(out / choice / "checkpoint.pt", weights_only=False)["ctx"]
        lines[choice] = capsys.readouterr().out.splitlines()[0]
    assert "shared prefix off: share_prefix=False" in lines["off"]
    assert "first 4 shared by all classes, encoded once, bucketed suffixes" in lines["auto"]
    assert "packed suffixes" in lines["packed"]
    assert not torch.equal(ctx["off"], torch.zeros_like(ctx["off"]))
    torch.testing.assert_close(ctx["auto"], ctx["off"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ctx["packed"], ctx["off"], rtol=1e-4, atol=1e-5)
    # nothing to share with the class name in front: the start-up line says why
    assert _train(data, cfg, out / "front", "--epochs", "1", "--method", "coop",
                  "--class-token-position", "front", "--share-prefix", "padded") == 0
    assert "shared prefix off: class token in front" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["kgcoop", "kgcoop+prograd"])
def test_train_method_kgcoop_builds_its_learner(tree_and_cfg, monkeypatch, capsys, method):
    from prograd_fast.clip.trainer import Trainer

    data, cfg, out = tree_and_cfg
    seen = []
    real = Trainer.__init__
    monkeypatch.setattr(Trainer, "__init__",
                        lambda self, model, *a, **k: (seen.append(model), real(self, model, *a, **k))[1])
    assert cli.main(["train", "--data", str(data), "--model", str(cfg), "--output-dir", str(out),
                     "--shots", "2", "--batch-size", "4", "--no-progress", "--epochs", "1",
                     "--method", method, "--kg-weight", "2.5"]) == 0
    learner = seen[0].prompt_learner
    assert type(learner).__name__ == "KgCoOpLearner" and learner.kg_weight == 2.5
    assert learner.n_ctx == 4 and learner.ctx_init == "a photo of a"  # KgCoOp's own prompt
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert (rows[0]["conflict_rate"] == "") == (method == "kgcoop")
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0  # tested again as the CoOp prompt it is
    acc = json.loads((out / "result.json").read_text())["acc"]
    printed = re.findall(r"accuracy ([0-9.]+)%", capsys.readouterr().out)
    assert float(printed[-1]) == pytest.approx(acc, abs=0.01)
    assert cli.main(["train", "--data", str(data), "--model", str(cfg), "--method", method,
                     "--kg-weight", "-1"]) != 0
    assert "--kg-weight must be >= 0, got -1.0" in capsys.readouterr().err
