"""`prograd-fast protocol` never answers from stale or damaged records: replaced images are
noticed (and the rerun says what is redone), a hand-edited or damaged result.json is tested
again, a corrupt checkpoint is moved aside and the run trained again; a corrupt image or an
unwritable output folder is one line before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import coop_layouts as L
from clip_helpers import tiny_cfg
from prograd_fast import cli

SPLIT = "split_zhou_DescribableTextures.json"


@pytest.fixture
def grid(tmp_path):
    folder = L.make(tmp_path / "data", "dtd")
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(tiny_cfg()))
    argv = ["protocol", "fewshot", "--root", str(tmp_path / "data"), "--model", str(model),
            "--pretrained", "none", "--output-dir", str(tmp_path / "out"), "--epochs", "1",
            "--seeds", "1", "--num-workers", "0", "--no-progress", "--datasets", "dtd",
            "--shots", "2"]
    return folder, argv, tmp_path / "out"


def _cli(argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prograd_fast.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _json(path):
    return json.loads(Path(path).read_text())


def _replace(path: Path, seed: int) -> None:
    """New pixels, and a modification time that surely differs."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 18, 3), dtype=np.uint8)).save(path)
    st = path.stat()
    import os
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _results(out):
    return {p.parent.parent.name + "/" + p.parent.name: _json(p)
            for p in (out / "runs" / "dtd" / "all").glob("*/*/result.json")}


def test_replaced_images_are_noticed_and_the_rerun_says_what_is_redone(grid, capsys):
    folder, argv, out = grid
    argv = argv + ["--methods", "zeroshot", "coop"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    split = _json(folder / SPLIT)
    for i, (rel, _, _) in enumerate(split["test"]):  # every test image, same names
        _replace(folder / "images" / rel, 100 + i)
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "trained 0 run(s); image features: 1 computed, 0 from the cache" in text
    assert text.count("test set(s) dtd/all changed since tested") == 2  # zero-shot and CoOp
    # a replaced training image: the few-shot set is another one, the run is trained again
    run_dirs = sorted((out / "runs" / "dtd" / "all" / "coop").iterdir())
    for rel, _, _ in split["train"]:
        _replace(folder / "images" / rel, 7)
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "trained 1 run(s)" in text
    assert f"coop 2-shot seed 1: training images changed since {run_dirs[0].name}" in text


def test_a_hand_edited_or_damaged_result_is_tested_again_and_the_tables_written(grid, capsys):
    folder, argv, out = grid
    argv = argv + ["--methods", "zeroshot", "prograd"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    true = {k: r["tests"]["dtd/all"] for k, r in _results(out).items()}
    (zs_path,) = (out / "runs" / "dtd" / "all" / "zeroshot").glob("*/result.json")
    (pg_path,) = (out / "runs" / "dtd" / "all" / "prograd").glob("*/result.json")
    zs, pg = _json(zs_path), _json(pg_path)
    zs["tests"]["dtd/all"] = 99.0  # a plausible number: only the digest tells
    zs_path.write_text(json.dumps(zs))
    pg["tests"]["dtd/all"] = "n/a"
    pg_path.write_text(json.dumps(pg))
    proc = _cli(argv, out.parent)
    assert proc.returncode == 0, proc.stderr
    assert f"{zs_path} was changed after the grid wrote it (its digest does not match): testing " \
           f"it again" in proc.stdout
    assert f"{pg_path} was changed after the grid wrote it" in proc.stdout
    assert "trained 0 run(s)" in proc.stdout  # the finished checkpoint is tested, not retrained
    assert {k: r["tests"]["dtd/all"] for k, r in _results(out).items()} == true
    table = _json(out / "fewshot.json")
    cells = {r["method"]: r["cells"] for r in table["rows"] if r["dataset"] == "DTD"}
    assert cells["zeroshot"]["0"]["mean"] == true[next(k for k in true if k.startswith("zeroshot"))]
    # null, a truncated file: the same
    pg_path.write_text(json.dumps({**_json(pg_path), "tests": None}))
    zs_path.write_text(zs_path.read_text()[:30])
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert f"{zs_path} is not valid JSON: testing it again" in text
    assert f"{pg_path} was changed after the grid wrote it" in text
    assert {k: r["tests"]["dtd/all"] for k, r in _results(out).items()} == true


def test_a_corrupt_checkpoint_is_moved_aside_and_the_run_trained_again(grid):
    folder, argv, out = grid
    argv = argv + ["--methods", "coop"]
    assert cli.main(argv) == 0
    (run,) = (out / "runs" / "dtd" / "all" / "coop").iterdir()
    (run / "result.json").unlink()
    (run / "checkpoint.pt").write_bytes(b"\x00 not a checkpoint")
    proc = _cli(argv, out.parent)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "is unreadable" in ln)
    assert line.startswith(f"dtd/all coop 2-shot seed 1: {run / 'checkpoint.pt'} is unreadable (")
    assert line.endswith("; training again") and "Traceback" not in proc.stderr
    (aside,) = run.glob("checkpoint.pt.bad-*")
    assert aside.read_bytes() == b"\x00 not a checkpoint"
    assert "trained 1 run(s)" in proc.stdout and (run / "result.json").exists()


@pytest.mark.parametrize("which", ["test", "train"])
def test_a_corrupt_image_is_one_line_before_any_run(grid, which):
    folder, argv, out = grid
    split = _json(folder / SPLIT)
    # a test image; or every training image of the first class (any 2-shot draw takes one)
    rows = split["test"][:1] if which == "test" else [r for r in split["train"]
                                                      if r[1] == split["train"][0][1]]
    for rel, _, _ in rows:
        bad = folder / "images" / rel
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    proc = _cli(argv + ["--methods", "coop"], out.parent)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ": not a readable image (" in lines[0], proc.stderr
    assert any(lines[0].startswith(f"prograd-fast: error: {folder / 'images' / rel}: ")
               for rel, _, _ in rows)
    assert not out.exists()


def test_an_unwritable_output_folder_and_too_few_shots(grid, capsys):
    folder, argv, out = grid
    (out.parent / "afile").write_text("x")
    bad = [a if a != str(out) else str(out.parent / "afile" / "out") for a in argv]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "afile is not a folder" in err
    # 8 shots of a data set with 4 training images a class: said once, however many seeds
    more = [a if a != "2" else "8" for a in argv] + ["--methods", "coop", "--seeds", "1", "2",
                                                     "--epochs", "0"]
    assert cli.main(more) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warnings == ["prograd-fast: warning: dtd: --shots 8: 4 of 4 classes have fewer "
                        "training images (fewest: 'banded' with 4); they train on all they have, "
                        "as Dassl's few-shot sampler does"]


def test_an_empty_imagenet_class_folder_is_refused(tmp_path):
    from prograd_fast.datasets import DatasetError, load_split

    folder = L.make(tmp_path, "imagenet")
    empty = folder / "images" / "train" / "n01443537"
    for image in empty.iterdir():
        image.unlink()
    with pytest.raises(DatasetError) as info:
        load_split("imagenet", tmp_path)
    assert str(info.value).startswith(f"{empty}: empty class folder: no images")
