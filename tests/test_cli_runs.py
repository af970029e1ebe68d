"""`prograd-fast train` as a researcher runs it: one folder per setting, no stale answers, one
line per bad input (corrupt image, empty class, unwritable folder, images not found),
Ctrl-C that says how to resume -- through the real entry point in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clip_helpers import tiny_cfg
from prograd_fast import cli
from test_clip_data import make_tree

TINY = ["--shots", "2", "--batch-size", "4", "--n-ctx", "3", "--no-progress"]


@pytest.fixture
def setup(tmp_path):
    make_tree(tmp_path / "data", per_class=(4, 4, 4), size=18)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_cfg()))
    return tmp_path / "data", cfg, tmp_path


def _cli(*args, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prograd_fast.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prograd-fast: error: "), proc.stderr
    return lines[0]


def _json(path):
    return json.loads(Path(path).read_text())


def test_a_sweep_gets_one_folder_per_setting_and_a_folder_refuses_other_settings(setup, capsys):
    data, cfg, tmp = setup
    loop = " ; ".join(f"{sys.executable} -m prograd_fast.cli train --data data --model tiny.json "
                      f"{' '.join(TINY)} --epochs 1 --lam {lam}" for lam in ("1.0", "0.5"))
    proc = subprocess.run(["bash", "-c", loop], cwd=tmp, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    folders = sorted((p.name for p in (tmp / "runs").iterdir()), key=lambda f: "_lam0.5" in f)
    assert len(folders) == 2 and "_lam0.5_" in folders[1]
    assert folders[1].replace("_lam0.5", "") == folders[0]
    assert folders[0].startswith("data_prograd_2shot_seed1_") and "epochs1" in folders[0]
    lam1, lam05 = (tmp / "runs" / f for f in folders)
    assert _json(lam1 / "settings.json")["options"]["lam"] == 1.0
    assert _json(lam05 / "settings.json")["options"]["lam"] == 0.5
    assert _json(lam05 / "log.json")["config"]["lam"] == 0.5
    before = (lam1 / "result.json").read_text()
    # another method or lambda into an existing folder: refused in one line, nothing written
    base = ["train", "--data", str(data), "--model", str(cfg), *TINY, "--epochs", "1",
            "--output-dir", str(lam1)]
    assert cli.main(base + ["--method", "zeroshot"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run with other settings" in err
    assert "--method 'prograd' there, 'zeroshot' now" in err
    assert cli.main(base + ["--lam", "0.5"]) == 2
    assert "--lam 1.0 there, 0.5 now" in capsys.readouterr().err
    assert (lam1 / "result.json").read_text() == before
    # the same settings on changed data: refused (an explicit folder), or a new default folder
    img = next((data / "train" / "cat").iterdir())
    os.utime(img, (1_000_000, 1_000_000))
    assert cli.main(base) == 2
    err = capsys.readouterr().err
    assert "the data (images, labels, sizes or modification times) changed" in err
    assert (lam1 / "result.json").read_text() == before


def test_corrupt_or_truncated_images_are_one_line_before_anything_is_written(setup, capsys):
    data, cfg, tmp = setup
    make_tree(data, per_class=(2, 2, 2), splits=("val",), size=18)
    bad = data / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    proc = _cli("train", "--data", data, "--model", cfg, *TINY, "--epochs", "1",
                "--output-dir", tmp / "out", cwd=tmp)
    assert f"{bad}: not a readable image" in _one_error_line(proc)
    assert not (tmp / "out").exists()
    bad.unlink()
    # a corrupt validation image (used to crash after the first epoch, leaving an empty folder)
    from PIL import Image
    val = data / "val" / "cat" / "0.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(val, quality=90)
    val.write_bytes(val.read_bytes()[:-200])
    argv = ["train", "--data", str(data), "--model", str(cfg), *TINY, "--epochs", "1",
            "--output-dir", str(tmp / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{val}: not a readable image" in err
    assert not (tmp / "out").exists()


def test_an_empty_class_folder_is_refused_and_too_few_shots_warn_once(setup, capsys):
    data, cfg, tmp = setup
    (data / "train" / "zebra").mkdir()
    proc = _cli("train", "--data", data, "--model", cfg, *TINY, "--epochs", "0",
                "--output-dir", tmp / "out", cwd=tmp)
    line = _one_error_line(proc)
    assert f"{data / 'train' / 'zebra'}: empty class folder" in line
    assert not (tmp / "out").exists()
    (data / "train" / "zebra").rmdir()
    argv = ["train", "--data", str(data), "--model", str(cfg), *TINY, "--epochs", "0",
            "--shots", "16", "--output-dir", str(tmp / "out")]
    assert cli.main(argv) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warnings == ["prograd-fast: warning: --shots 16: 3 of 3 classes have fewer training "
                        "images (fewest: 'cat' with 4); they train on all they have, as Dassl's "
                        "few-shot sampler does"]


def test_an_unwritable_output_folder_is_one_line(setup):
    data, cfg, tmp = setup
    (tmp / "afile").write_text("x")
    proc = _cli("train", "--data", data, "--model", cfg, *TINY, "--epochs", "1",
                "--output-dir", tmp / "afile" / "out", cwd=tmp)
    assert (f"cannot write to --output-dir {tmp / 'afile' / 'out'}: {tmp / 'afile'} is not a "
            f"folder") in _one_error_line(proc)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(setup, capsys):
    data, cfg, tmp = setup
    (tmp / "ro").mkdir(mode=0o555)
    assert cli.main(["train", "--data", str(data), "--model", str(cfg), *TINY, "--epochs", "1",
                     "--output-dir", str(tmp / "ro" / "out")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume(setup):
    data, cfg, tmp = setup
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prograd_fast.cli", "train", "--data", str(data),
                             "--model", str(cfg), *TINY, "--epochs", "100000", "--output-dir",
                             str(tmp / "out")], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("prograd: 3 classes")  # training starts now
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines() == [
        "prograd-fast: interrupted; rerun the same command to resume"]


def test_a_split_json_takes_an_image_root_and_says_where_it_looked(setup, capsys):
    data, cfg, tmp = setup
    def rows(split):
        return [[f"{split}/{c}/{i}.png", y, c] for y, c in enumerate(("cat", "dog", "sea_lion"))
                for i in range(2)]

    (tmp / "splits").mkdir()
    split = tmp / "splits" / "split_zhou_Toy.json"
    split.write_text(json.dumps({"train": rows("train"), "val": [], "test": rows("test")}))
    proc = _cli("train", "--data", split, "--model", cfg, *TINY, "--epochs", "0",
                "--output-dir", tmp / "out", cwd=tmp)
    line = _one_error_line(proc)
    assert (f"its first image 'train/cat/0.png' is not in {tmp / 'splits' / 'images'} and "
            f"{tmp / 'splits'}; --image-root DIR") in line
    argv = ["train", "--data", str(split), "--model", str(cfg), *TINY, "--epochs", "0",
            "--output-dir", str(tmp / "out")]
    assert cli.main(argv + ["--image-root", str(data)]) == 0
    assert "3 classes, 6 training images" in capsys.readouterr().out
    assert cli.main(argv[:2] + [str(data)] + argv[3:] + ["--image-root", str(data)]) == 2
    assert "an image folder is only for a CoOp split JSON" in capsys.readouterr().err


def test_a_hand_edited_result_is_not_reprinted(setup, capsys):
    data, cfg, tmp = setup
    argv = ["train", "--data", str(data), "--model", str(cfg), *TINY, "--epochs", "1",
            "--output-dir", str(tmp / "out")]
    assert cli.main(argv) == 0
    line = next(t for t in capsys.readouterr().out.splitlines() if t.startswith("test accuracy"))
    result = _json(tmp / "out" / "result.json")
    (tmp / "out" / "result.json").write_text(json.dumps({**result, "acc": 99.0}))
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "but no intact result.json: reporting from its checkpoint" in text
    assert "reprinting" not in text
    assert [t for t in text.splitlines() if t.startswith("test accuracy")] == [line]
    assert _json(tmp / "out" / "result.json") == result


def test_no_resume_replaces_the_run_even_when_killed_at_once(setup, capsys, monkeypatch):
    from prograd_fast.clip.trainer import Trainer

    data, cfg, tmp = setup
    argv = ["train", "--data", str(data), "--model", str(cfg), *TINY, "--epochs", "1",
            "--output-dir", str(tmp / "out")]
    assert cli.main(argv) == 0

    def killed(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_epoch", killed)
        assert cli.main(argv + ["--lam", "0.5", "--no-resume"]) == 130
    assert not (tmp / "out" / "result.json").exists()
    assert not (tmp / "out" / "checkpoint.pt").exists()
    capsys.readouterr()
    assert cli.main(argv + ["--lam", "0.5"]) == 0  # trains the new run, not the old one's answer
    text = capsys.readouterr().out
    assert "reprinting" not in text and "resuming" not in text
    assert _json(tmp / "out" / "log.json")["config"]["lam"] == 0.5
    assert (tmp / "out" / "result.json").exists()


def test_other_weights_in_the_same_file_are_another_run(setup, capsys):
    import open_clip
    import torch

    data, cfg, tmp = setup
    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_cfg())
    torch.save(model.state_dict(), tmp / "w.pt")
    argv = ["train", "--data", str(data), "--model", str(cfg), "--pretrained", str(tmp / "w.pt"),
            *TINY, "--epochs", "0", "--method", "zeroshot", "--output-dir", str(tmp / "out")]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0
    assert "reprinting its result" in capsys.readouterr().out
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    torch.save(model.state_dict(), tmp / "w.pt")
    assert cli.main(argv) == 2
    assert "the model's weights changed" in capsys.readouterr().err
