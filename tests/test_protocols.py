"""The protocol grid end to end on a tiny random open_clip model and tiny synthetic data sets
in CoOp's layouts: every protocol, tables in three formats and plots, finished runs skipped,
a killed run resumed, cached features equal to encoding the images, one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import coop_layouts as L
from clip_helpers import tiny_cfg
from prograd_fast import cli
from prograd_fast.clip.data import ImageDataset, subsample_classes
from prograd_fast.clip.trainer import Trainer, evaluate
from prograd_fast.protocols import GridOptions, GridRunner, official_schedule, plan

SOURCE_AND_TARGETS = ["imagenet", "oxford_pets", "eurosat", *L.ALL[-4:]]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("protocols")
    root = base / "data"
    for name in ["caltech101", "dtd", "fgvc_aircraft", *SOURCE_AND_TARGETS]:
        L.make(root, name)
    model = base / "tiny.json"
    model.write_text(json.dumps(tiny_cfg()))
    return root, model, base


def _main(env, protocol, out, *extra):
    root, model, _ = env
    return cli.main(["protocol", protocol, "--root", str(root), "--model", str(model),
                     "--pretrained", "none", "--output-dir", str(out), "--epochs", "1",
                     "--seeds", "1", "--num-workers", "0", "--no-progress", *extra])


def _json(path):
    return json.loads(Path(path).read_text())


def _no_temp_files(out):
    return not [p for p in Path(out).rglob("*") if p.name.endswith(".tmp")]


def test_fewshot_grid_tables_plots_and_rerun_skips(env, capsys):
    out = env[2] / "fewshot"
    assert _main(env, "fewshot", out, "--datasets", "caltech101", "dtd", "--shots", "1", "2") == 0
    table = _json(out / "fewshot.json")
    assert table["columns"] == ["0", "1", "2"]
    rows = {(r["dataset"], r["method"]): r for r in table["rows"]}
    assert set(rows) == {(d, m) for d in ("Caltech101", "DTD", "Average")
                         for m in ("zeroshot", "coop", "prograd")}
    assert set(rows[("DTD", "prograd")]["cells"]) == {"1", "2"}
    assert set(rows[("DTD", "zeroshot")]["cells"]) == {"0"}
    avg = rows[("Average", "coop")]["cells"]["2"]["mean"]
    assert avg == pytest.approx((rows[("DTD", "coop")]["cells"]["2"]["mean"]
                                 + rows[("Caltech101", "coop")]["cells"]["2"]["mean"]) / 2)
    assert len(table["runs"]) == 2 * (1 + 2 * 2)
    md = (out / "fewshot.md").read_text()
    assert "| Data set | Method | zero-shot | 1 shot | 2 shots |" in md and "| DTD | ProGrad |" in md
    assert list(csv.reader(open(out / "fewshot.csv")))[0][:4] == ["dataset", "method", "0", "0_std"]
    assert (out / "fewshot.png").read_bytes()[:4] == b"\x89PNG"
    assert "trained 8 run(s); image features: 2 computed, 0 from the cache" in capsys.readouterr().out
    # a rerun skips every finished run and rewrites the same table
    before = (out / "fewshot.json").read_text()
    assert _main(env, "fewshot", out, "--datasets", "caltech101", "dtd", "--shots", "1", "2") == 0
    assert "trained 0 run(s); image features: 0 computed, 0 from the cache" in capsys.readouterr().out
    assert (out / "fewshot.json").read_text() == before
    assert _no_temp_files(out)


def test_base2new_cached_features_equal_image_encoding(env, tmp_path):
    root, model, _ = env
    opts = GridOptions("base2new", str(root), datasets=["fgvc_aircraft"], seeds=[2],
                       model=str(model), pretrained=None, output_dir=str(tmp_path), epochs=2,
                       num_workers=0, progress=False)
    runner = GridRunner(opts, log=lambda *a: None)
    results = dict(runner.run())
    zs, prograd = (next(r for r in results if r.method == m) for m in ("zeroshot", "prograd"))
    assert results[zs]["tests"].keys() == {"fgvc_aircraft/base", "fgvc_aircraft/new"}
    # the same numbers from images, encoded again, with the learned context from the checkpoint
    _, full, _ = runner._split("fgvc_aircraft")
    new = subsample_classes(full, "new")
    from prograd_fast.clip import PromptedCLIP
    from prograd_fast.clip.trainer import transfer_context
    from prograd_fast.protocols import method_prompt
    loader = torch.utils.data.DataLoader(ImageDataset(new.test, runner.test_tf), batch_size=5)
    teacher = PromptedCLIP(runner.clip, new.classnames, tokenizer=runner.tokenizer,
                           **method_prompt("zeroshot", "FGVCAircraft"))
    assert evaluate(teacher, loader, zeroshot=True) == results[zs]["tests"]["fgvc_aircraft/new"]
    base = subsample_classes(full, "base")
    trained = PromptedCLIP(runner.clip, base.classnames, tokenizer=runner.tokenizer,
                           **method_prompt("prograd", "FGVCAircraft"))
    state = torch.load(runner.run_dir(prograd) / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2
    with torch.no_grad():
        trained.prompt_learner.ctx.copy_(state["ctx"])
    moved = transfer_context(trained, new.classnames, tokenizer=runner.tokenizer)
    assert evaluate(moved, loader) == results[prograd]["tests"]["fgvc_aircraft/new"]
    feats, _ = runner._test_features("fgvc_aircraft")
    images = torch.stack([ImageDataset(full.test, runner.test_tf)[i][0] for i in range(len(full.test))])
    torch.testing.assert_close(feats, trained.encode_image(images), rtol=1e-5, atol=1e-6)
    # H and the average row
    table = _json(tmp_path / "base2new.json") if (tmp_path / "base2new.json").exists() else None
    assert table is None  # GridRunner alone writes runs, not tables
    from prograd_fast.protocols import build_table
    t = build_table("base2new", list(results.items()))
    row = next(r for r in t["rows"] if r["method"] == "prograd" and r["dataset"] == "FGVCAircraft")
    b, n = row["cells"]["base"]["mean"], row["cells"]["new"]["mean"]
    assert row["cells"]["H"]["mean"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)


@pytest.mark.parametrize("protocol,targets", [("xd", ["oxford_pets", "eurosat"]),
                                              ("dg", L.ALL[-4:])])
def test_xd_and_dg_train_on_imagenet_once_and_test_targets(env, protocol, targets, capsys):
    out = env[2] / "transfer"  # shared: dg reuses the ImageNet runs xd trained
    assert _main(env, protocol, out, "--datasets", *targets) == 0
    text = capsys.readouterr().out
    table = _json(out / f"{protocol}.json")
    titles = {"oxford_pets": "OxfordPets", "eurosat": "EuroSAT", "imagenetv2": "ImageNet-V2",
              "imagenet_sketch": "ImageNet-Sketch", "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R"}
    assert table["columns"] == ["ImageNet"] + [titles[t] for t in targets] + ["Average"]
    for row in table["rows"]:
        vals = [row["cells"][titles[t]]["mean"] for t in targets]
        assert row["cells"]["Average"]["mean"] == pytest.approx(sum(vals) / len(vals))
    assert "| ImageNet | ProGrad |" in (out / f"{protocol}.md").read_text()
    if protocol == "dg":  # the ImageNet prompts came from the xd grid: tested, not retrained
        assert "trained 0 run(s)" in text


def test_killed_run_resumes_from_its_checkpoint(env, monkeypatch, capsys):
    out = env[2] / "killed"
    calls = []
    real = Trainer._epoch

    def epoch(self):
        calls.append(self.config.method)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed in the middle of the second run's second epoch
        return real(self)

    monkeypatch.setattr(Trainer, "_epoch", epoch)
    args = ("--datasets", "dtd", "--methods", "coop", "prograd", "--shots", "2", "--epochs", "2")
    assert _main(env, "fewshot", out, *args) == 130  # Ctrl-C: one line, no traceback
    assert capsys.readouterr().err.endswith("interrupted; rerun the same command to resume\n")
    runs = sorted((out / "runs" / "dtd" / "all").glob("*/*"))
    assert [(r / "result.json").exists() for r in runs] == [True, False]
    assert torch.load(runs[1] / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert _no_temp_files(out) and not (out / "fewshot.md").exists()
    calls.clear()
    assert _main(env, "fewshot", out, *args) == 0
    assert calls == ["prograd"]  # coop skipped; prograd ran its last epoch only
    log = _json(runs[1] / "log.json")
    assert [r["epoch"] for r in log["history"]] == [1, 2]


def test_training_features_are_opt_in(env, capsys):
    out = env[2] / "trainfeat"
    assert _main(env, "fewshot", out, "--datasets", "dtd", "--methods", "prograd", "--shots", "2",
                 "--cache-train-features") == 0
    assert "image features: 2 computed" in capsys.readouterr().out  # the test set and the 2-shot set
    run = next((out / "runs" / "dtd" / "all" / "prograd").iterdir())
    assert _json(run / "settings.json")["inputs"] == "features"
    assert _json(run / "log.json")["config"]["inputs"] == "features"


def test_plan_and_official_schedule():
    runs = plan("base2new", ["oxford_pets"], ["zeroshot", "prograd"], None, [1, 2])
    assert [(r.method, r.shots, r.seed) for r in runs] == [("zeroshot", 0, 0), ("prograd", 4, 1),
                                                           ("prograd", 4, 2)]
    assert runs[0].tests == ("oxford_pets/base", "oxford_pets/new")
    xd = plan("xd", None, ["coop"], None, [1])
    assert xd[0].dataset == "imagenet" and len(xd[0].tests) == 11
    assert [official_schedule("fewshot", "dtd", k, "prograd").epochs for k in (1, 2, 4, 8, 16)] == [
        50, 100, 100, 200, 200]
    assert official_schedule("fewshot", "dtd", 16, "prograd").lam == 0.8
    assert official_schedule("fewshot", "dtd", 4, "prograd").lam == 1.0
    assert official_schedule("fewshot", "dtd", 16, "coop").lam == 0.0
    assert official_schedule("base2new", "imagenet", 4, "coop").epochs == 50
    assert official_schedule("base2new", "sun397", 4, "coop").epochs == 100


@pytest.mark.parametrize("args,message", [
    (["--root", "{tmp}/nowhere"], "data root not found"),
    (["--datasets", "oxford_flowers"], "oxford_flowers: missing Flowers102 data set folder"),
    (["--datasets", "pets"], "unknown data set 'pets'"),
    (["--datasets", "imagenet_a"], "imagenet_a is a test-only data set"),
    (["--datasets", "dtd", "--shots", "0"], "shots must be >= 1"),
    (["--datasets", "dtd", "--lam", "1.5"], "--lam must be in [0, 1], got 1.5"),
    (["--datasets", "dtd", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--datasets", "dtd", "--epochs", "-1"], "--epochs must be >= 0, got -1"),
    (["--datasets", "dtd", "--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--datasets", "dtd", "--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
])
def test_bad_input_is_one_clear_line(env, tmp_path, capsys, args, message):
    root, model, _ = env
    argv = ["protocol", "fewshot", "--root", str(root), "--model", str(model), "--pretrained",
            "none", "--output-dir", str(tmp_path / "out"), "--no-progress"]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    msg = capsys.readouterr().err
    assert msg.startswith("prograd-fast: error: ") and message in msg and msg.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_train_takes_a_data_set_by_name(env, tmp_path, capsys):
    root, model, _ = env
    argv = ["train", "--dataset", "caltech101", "--root", str(root), "--model", str(model),
            "--shots", "2", "--epochs", "1", "--n-ctx", "2", "--no-progress", "--subsample", "base",
            "--eval-new", "--output-dir", str(tmp_path / "t")]
    assert cli.main(argv) == 0
    assert "prograd: 2 classes, 4 training images (2 shots, seed 1)" in capsys.readouterr().out
    res = _json(tmp_path / "t" / "result.json")
    assert res["acc"] is not None and "new_acc" in res
    capsys.readouterr()
    assert cli.main(argv[:2] + ["oxford_flowers"] + argv[3:]) == 2
    assert "oxford_flowers: missing Flowers102 data set folder" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "dtd", "--model", str(model)]) == 2
    assert "--dataset needs --root" in capsys.readouterr().err


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    from prograd_fast.atomic import atomic_write, atomic_write_text
    path = atomic_write_text(tmp_path / "table.md", "old\n")

    def half(tmp):
        Path(tmp).write_text("half a ta")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_plan_counts_each_run_once_and_never_tests_the_source_as_a_target():
    # a repeated seed / shot / data set is one run (else a table averages one run with itself)
    runs = plan("fewshot", ["dtd", "dtd"], ["coop", "coop"], [1, 1], [1, 1])
    assert [(r.dataset, r.method, r.shots, r.seed) for r in runs] == [("dtd", "coop", 1, 1)]
    # xd from another source: ImageNet becomes a target, the source is not one
    tests = plan("xd", None, ["coop"], None, [1], source="oxford_pets")[0].tests
    assert tests[0] == "oxford_pets/all" and tests.count("oxford_pets/all") == 1
    assert "imagenet/all" in tests and len(tests) == 11
    assert plan("xd", ["imagenet", "dtd"], ["coop"], None, [1])[0].tests == ("imagenet/all", "dtd/all")


def test_a_changed_data_set_is_not_answered_from_old_runs(env, tmp_path, capsys):
    _, model, _ = env
    root = tmp_path / "data"
    folder = L.make(root, "dtd")

    def main():
        return cli.main(["protocol", "fewshot", "--root", str(root), "--model", str(model),
                         "--pretrained", "none", "--output-dir", str(tmp_path / "out"),
                         "--epochs", "1", "--seeds", "1", "--num-workers", "0", "--no-progress",
                         "--datasets", "dtd", "--methods", "zeroshot", "coop", "--shots", "4"])

    assert main() == 0
    capsys.readouterr()
    split = folder / "split_zhou_DescribableTextures.json"
    data = json.loads(split.read_text())
    data["test"] = data["test"][:-1]  # one test image fewer: both runs are tested again
    split.write_text(json.dumps(data))
    assert main() == 0
    assert "trained 0 run(s); image features: 1 computed, 0 from the cache" in capsys.readouterr().out
    runs = _json(tmp_path / "out" / "fewshot.json")["runs"]
    assert len(runs) == 2
    data["train"] = data["train"][1:]  # one training image fewer: another 4-shot set
    split.write_text(json.dumps(data))
    assert main() == 0
    assert "trained 1 run(s); image features: 0 computed, 1 from the cache" in capsys.readouterr().out


def test_train_refuses_data_set_flags_it_would_ignore(env, tmp_path, capsys):
    root, model, _ = env
    base = ["train", "--model", str(model), "--epochs", "0", "--no-progress",
            "--output-dir", str(tmp_path / "t")]
    assert cli.main(base + ["--root", str(root)]) == 2  # --root alone: --data digits was used
    assert "--root needs --dataset" in capsys.readouterr().err
    assert cli.main(base + ["--dataset", "dtd", "--root", str(root), "--data", str(root)]) == 2
    assert "--dataset and --data" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_atomic_write_gives_a_plain_write_s_permissions(tmp_path):
    import os

    from prograd_fast.atomic import atomic_write_text
    (tmp_path / "plain.md").write_text("x")
    path = atomic_write_text(tmp_path / "table.md", "x")  # mkstemp alone makes it 0600
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "plain.md").st_mode & 0o777


def test_a_bad_few_shot_set_is_refused_before_any_run(env, tmp_path, capsys):
    _, model, _ = env
    folder = L.make(tmp_path / "data", "dtd")
    data = json.loads((folder / "split_zhou_DescribableTextures.json").read_text())
    (folder / "images" / data["train"][-1][0]).unlink()  # drawn by every 4-shot set
    argv = ["protocol", "fewshot", "--root", str(tmp_path / "data"), "--model", str(model),
            "--pretrained", "none", "--output-dir", str(tmp_path / "out"), "--no-progress",
            "--datasets", "dtd", "--shots", "4", "--epochs", "1", "--num-workers", "0"]
    assert cli.main(argv) == 2
    msg = capsys.readouterr().err
    assert "image listed by the split is missing" in msg and msg.count("\n") == 1
    assert not (tmp_path / "out").exists()  # not even the zero-shot run
