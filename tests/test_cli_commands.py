"""The commands as a researcher runs them, through the real entry point in a subprocess:
evaluation at the end unless asked (and on the val split when asked), one line per epoch,
``prograd-fast eval`` of a saved prompt, --help that says what and the default once, the
protocol's settings and a caption that says how its table was made, plots that say when
matplotlib is missing."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys

import pytest

import coop_layouts as L
from clip_helpers import tiny_cfg
from prograd_fast import cli
from test_clip_data import make_tree

EVAL_STEP = re.compile(r"(\w+) accuracy ([0-9.]+)%")


def run_cli(*argv, no_matplotlib: bool = False) -> subprocess.CompletedProcess:
    """``prograd-fast ARGV`` in a fresh interpreter (``no_matplotlib``: as if not installed)."""
    hide = "sys.modules['matplotlib'] = None; " if no_matplotlib else ""
    code = f"import sys; {hide}from prograd_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmds")
    make_tree(base / "data", per_class=(4, 4, 4), size=18)
    cfg = base / "tiny.json"
    cfg.write_text(json.dumps(tiny_cfg()))
    return base / "data", cfg, base


def _train(tree, out, *extra, progress: bool = False, **kw):
    data, cfg, _ = tree
    return run_cli("train", "--data", data, "--model", cfg, "--output-dir", out, "--shots", 2,
                   "--batch-size", 4, "--n-ctx", 3, *([] if progress else ["--no-progress"]),
                   *extra, **kw)


def _log(out):
    return list(csv.DictReader(open(out / "log.csv")))


def test_train_tests_after_the_last_epoch_and_prints_one_line_per_epoch(tree):
    out = tree[2] / "end"
    proc = _train(tree, out, "--epochs", 2, no_matplotlib=True)
    assert proc.returncode == 0, proc.stderr
    rows = _log(out)
    assert [r["acc"] != "" for r in rows] == [False, True]  # as CoOp: the last epoch only
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    for ln, row in zip(lines, rows):
        assert f"CE loss {float(row['ce']):.4f}" in ln and f"KL {float(row['kl']):.4f}" in ln
        assert "conflicts " in ln and f"lr {float(row['lr']):.3g}" in ln
        assert re.search(r", [0-9.]+ s", ln)
    assert "test acc" not in lines[0] and f"test acc {float(rows[1]['acc']):.2f}%" in lines[1]
    # no matplotlib: the last line says there is no plot and why, not a path that is not there
    assert "no plot: it needs matplotlib" in proc.stdout.splitlines()[-1]
    assert not (out / "curves.png").exists()


def test_train_eval_every_and_the_val_split(tree):
    out = tree[2] / "every"
    proc = _train(tree, out, "--epochs", 3, "--eval-every", 2, progress=True)
    assert proc.returncode == 0, proc.stderr
    assert [r["acc"] != "" for r in _log(out)] == [False, True, True]
    # the bars (stderr) are cleared; each epoch leaves its line behind on stdout
    assert "prograd epoch 3/3" in proc.stderr
    assert [ln[:9] for ln in proc.stdout.splitlines()[1:4]] == [f"epoch {i}/3" for i in (1, 2, 3)]
    out = tree[2] / "val"
    proc = _train(tree, out, "--epochs", 2, "--eval-every", 1, "--eval-split", "val",
                  "--pretrained", "none")  # 'none': random weights, as in protocol
    assert proc.returncode == 0, proc.stderr
    rows = _log(out)
    assert [r["val_acc"] != "" for r in rows] == [True, True]
    assert [r["acc"] != "" for r in rows] == [False, True]
    assert "val acc" in proc.stdout.splitlines()[1]
    proc = _train(tree, tree[2] / "neg", "--eval-every", -1)
    assert proc.returncode == 2 and "--eval-every must be >= 0" in proc.stderr


def _accuracy(proc) -> float:
    assert proc.returncode == 0, proc.stderr
    return float(EVAL_STEP.findall(proc.stdout)[-1][1])


def test_eval_reports_what_train_reported(tree):
    """A saved prompt (the run folder or its checkpoint) tested again: base classes as train
    tested them, new classes as --eval-new did; a zero-shot run folder too."""
    out = tree[2] / "b2n"
    assert _train(tree, out, "--epochs", 1, "--subsample", "base", "--eval-new").returncode == 0
    res = json.loads((out / "result.json").read_text())
    assert _accuracy(run_cli("eval", out)) == pytest.approx(res["acc"], abs=0.01)
    new = run_cli("eval", out / "checkpoint.pt", "--classes", "new")
    assert _accuracy(new) == pytest.approx(res["new_acc"], abs=0.01)
    assert "(new classes, 1 classes, 4 test images)" in new.stdout
    zs = tree[2] / "zs"
    assert _train(tree, zs, "--method", "zeroshot").returncode == 0
    zres = json.loads((zs / "result.json").read_text())
    assert _accuracy(run_cli("eval", zs)) == pytest.approx(zres["acc"], abs=0.01)
    bad = run_cli("eval", tree[2] / "nowhere")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


def _sub_parsers(parser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_says_what_it_does_and_its_default_once():
    parser = cli.build_parser()
    for name, sub in _sub_parsers(parser).items():
        fmt = sub.formatter_class(prog=name)
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = fmt._expand_help(action)
            flag = action.option_strings[0]
            assert len(text) > 10, f"{name} {flag} says nothing"
            assert text.lower().count("default") <= 1, f"{name} {flag}: two defaults: {text}"
            if action.default not in (None, False) and action.nargs != 0:
                assert "default" in text.lower(), f"{name} {flag} does not say its default"
    subs = _sub_parsers(parser)
    helps = {n: next(a.help for a in subs[n]._actions if "--pretrained" in a.option_strings)
             for n in ("train", "protocol")}
    assert helps["train"] == helps["protocol"]  # the same meaning, 'none' included
    workers = next(a for a in subs["protocol"]._actions if "--num-workers" in a.option_strings)
    assert workers.default <= len(os.sched_getaffinity(0))


def test_help_through_the_console_command():
    top = run_cli("--help")
    assert top.returncode == 0 and "``" not in top.stdout
    for command in ("demo", "train", "eval", "protocol"):
        assert re.search(rf"^  {command}\s+\S", top.stdout, re.M), command
    demo = run_cli("demo", "--help")
    assert "pretrains a tiny CLIP" in demo.stdout and "(default: 1 4 16)" in demo.stdout
    train = run_cli("train", "--help").stdout
    assert "(default: None)" not in train and "--eval-every" in train


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("grid")
    for name in ("dtd", "caltech101"):
        L.make(base / "data", name)
    model = base / "tiny.json"
    model.write_text(json.dumps(tiny_cfg()))
    return base / "data", model, base


def _protocol(env, protocol, out, *extra, **kw):
    root, model, _ = env
    return run_cli("protocol", protocol, "--root", root, "--model", model, "--pretrained", "none",
                   "--output-dir", out, "--num-workers", 0, "--no-progress", *extra, **kw)


def test_protocol_caption_and_meta_record_what_differs_from_the_official_configs(coop_root):
    out = coop_root[2] / "fewshot"
    proc = _protocol(coop_root, "fewshot", out, "--datasets", "dtd", "--methods", "coop",
                     "--shots", 1, "--seeds", 1, 1, "--epochs", 1, "--lr", 0.01,
                     "--cache-train-features", "--n-ctx", 4, "--class-token-position", "middle",
                     no_matplotlib=True)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "fewshot.json").read_text())["meta"]
    assert meta["seeds"] == "1" and meta["setting"] == "prograd"
    differs = meta["differs from the official configs"]
    assert set(differs) == {"model", "pretrained", "shots", "epochs", "lr", "precision",
                            "training inputs", "n-ctx", "class-token-position"}
    assert differs["lr"] == "0.01 (official: 0.002)"
    assert differs["shots"] == "1 (official: 1 2 4 8 16)"
    caption = (out / "fewshot.md").read_text().splitlines()[0]
    assert "seeds 1," in caption and "differs from the official configs: " in caption
    for key in differs:
        assert f"{key} {differs[key]}" in caption
    wrote = next(ln for ln in proc.stdout.splitlines() if ln.startswith("wrote "))
    assert "no plot: it needs matplotlib" in wrote and "fewshot.png" not in wrote


def test_eval_of_a_run_on_a_named_data_set_and_on_another_one(coop_root):
    root, model, base = coop_root
    out = base / "named"
    proc = run_cli("train", "--dataset", "caltech101", "--root", root, "--model", model,
                   "--shots", 2, "--epochs", 1, "--n-ctx", 2, "--no-progress", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "result.json").read_text())
    again = run_cli("eval", out)  # the run's data set and root, from what train recorded
    assert _accuracy(again) == pytest.approx(res["acc"], abs=0.01) and " on caltech101 " in again.stdout
    other = run_cli("eval", out, "--dataset", "dtd", "--root", root)
    assert 0.0 <= _accuracy(other) <= 100.0 and " on dtd (all classes" in other.stdout


def test_protocol_setting_cocoop_and_its_refusals(coop_root):
    out = coop_root[2] / "cocoop"
    proc = _protocol(coop_root, "base2new", out, "--setting", "cocoop", "--datasets", "dtd",
                     "--methods", "coop", "--seeds", 1, "--epochs", 1, "--precision", "fp16")
    assert proc.returncode == 0, proc.stderr
    runs = [p.name for p in (out / "runs" / "dtd" / "base" / "coop").iterdir()]
    assert len(runs) == 1 and runs[0].startswith("shots16-seed1-ep1-")  # CoCoOp's 16 shots
    settings = json.loads((out / "runs/dtd/base/coop" / runs[0] / "settings.json").read_text())
    assert settings["prompt"]["ctx_init"] == "a photo of a"
    meta = json.loads((out / "base2new.json").read_text())["meta"]
    assert meta["setting"] == "cocoop" and "precision" not in meta["differs from the official configs"]
    bad = _protocol(coop_root, "base2new", out, "--datasets", "dtd", "--csc")
    assert bad.returncode == 2 and "--csc" in bad.stderr and bad.stderr.count("\n") == 1
    # an ablation whose prompt cannot be built: one line naming the run, not a traceback
    short = _protocol(coop_root, "fewshot", coop_root[2] / "short", "--datasets", "dtd",
                      "--methods", "prograd", "--shots", 1, "--seeds", 1, "--epochs", 1,
                      "--n-ctx", 1)
    assert short.returncode == 2 and short.stderr.count("\n") == 1, short.stderr
    assert "dtd/all prograd 1-shot seed 1: n_ctx (1) is smaller than" in short.stderr
