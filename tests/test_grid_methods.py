"""Methods with official configs of their own in the protocol grid: the settings equal the
vendored configs, ``<method>+prograd`` gets ProGrad's lambda, the caption names each
method's settings, the CLI takes any registered name; and the grid runs learners of the two
new kinds (an image-conditioned and a vision-prompted toy learner, registered here) on
synthetic data in CoOp's layout: the vision-prompted one trains and is tested on images."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import coop_layouts as L
from clip_helpers import tiny_cfg
from test_learner_kinds import ImageConditioned, VisionPrompted
from prograd_fast import methods
from prograd_fast.protocols import config as C
from prograd_fast.protocols import GridOptions, GridRunner

PHOTO = "a photo of a"


class _Movable:
    """Records its settings and moves to other class names (base -> new tests)."""

    def _keep(self, clip_model, settings):
        self.settings = dict(settings)
        self._clip = [clip_model]  # a list: not a submodule (its weights are not the learner's)

    def moved_to(self, tower, classnames, tokenizer=None, **settings):
        other = type(self)(tower, classnames, tokenizer, clip_model=self._clip[0],
                           **self.settings)
        other.load_state_dict(self.state_dict())
        return other


class CondToy(_Movable, ImageConditioned):
    def __init__(self, tower, classnames, tokenizer=None, clip_model=None, **settings):
        super().__init__(tower, classnames, tokenizer, clip_model)
        self._keep(clip_model, settings)


class VisionToy(_Movable, VisionPrompted):
    def __init__(self, tower, classnames, tokenizer=None, clip_model=None, **settings):
        super().__init__(tower, classnames, tokenizer, clip_model)
        self._keep(clip_model, settings)

    def param_groups(self, split=False):
        if not split:
            return super().param_groups(split)
        return [{"name": "text", "params": [self.offset]},
                {"name": "vision", "params": [self.pixel]}]


TOY_CONFIG = C.MethodConfig("toy/config", {"depth": 2, "n_ctx": 3, "ctx_init": PHOTO},
                            lr=0.01, batch_size=2, epochs=1,
                            transfer=C.MethodConfig("toy/xd", {"depth": 1, "n_ctx": 3},
                                                    lr=0.02, batch_size=2, epochs=1))


@pytest.fixture
def toys():
    """toycond / toyvis and their +prograd forms, with an official config each."""
    added = []
    for name, title, learner in (("toycond", "ToyCond", CondToy),
                                 ("toyvis", "ToyVis", VisionToy)):
        for suffix, prograd in (("", False), ("+prograd", True)):
            added.append(methods.register_method(methods.Method(
                name + suffix, title + suffix, prograd=prograd, learner=learner,
                in_default_grid=False)).name)
        C.register_method_config(name, TOY_CONFIG)
    yield added
    for name in added:
        methods.METHODS.pop(name)
        C.METHOD_CONFIGS.pop(name, None)


# ---------------------------------------------------------------- the official configs
_YAML_KEYS = {"N_CTX": "n_ctx", "CTX_INIT": "ctx_init", "PROMPT_DEPTH": "depth",
              "N_CTX_TEXT": "n_ctx_text", "N_CTX_VISION": "n_ctx_vision",
              "PROMPT_DEPTH_TEXT": "depth_text", "PROMPT_DEPTH_VISION": "depth_vision"}


def _official(tar, config: str) -> dict:
    yaml = pytest.importorskip("yaml")
    trainer, name = config.split("/")
    data = yaml.safe_load(tar.extractfile(f"configs/trainers/{trainer}/{name}.yaml"))
    [section] = data["TRAINER"].values()
    prompt = {_YAML_KEYS[k]: v for k, v in section.items() if k in _YAML_KEYS}
    if trainer == "VPT":  # its CTX_INIT is the fixed text prompt, not a learned context
        assert prompt.pop("ctx_init") == PHOTO
    return {"prompt": prompt, "lr": data["OPTIM"]["LR"], "epochs": data["OPTIM"]["MAX_EPOCH"],
            "batch_size": data["DATALOADER"]["TRAIN_X"]["BATCH_SIZE"],
            "backbone": data["MODEL"]["BACKBONE"]["NAME"]}


def _script_config(tar, script: str) -> str:
    text = tar.extractfile(script).read().decode()
    return next(ln.split("=", 1)[1].strip() for ln in text.splitlines() if ln.startswith("CFG="))


@pytest.mark.parametrize("method, trainer, scripts", [
    ("cocoop", "CoCoOp", ("cocoop/base2new_train.sh", "cocoop/xd_train.sh")),
    ("maple", "MaPLe", ("maple/base2new_train_maple.sh", "maple/xd_train_maple.sh")),
    ("ivlp", "IVLP", ("independent-vlp/base2new_train_ivlp.sh",
                      "independent-vlp/xd_train_ivlp.sh")),
    ("vpt", "VPT", ("vpt/base2new_train_vpt.sh", "vpt/xd_train_vpt.sh"))])
def test_each_method_config_equals_the_vendored_one(method, trainer, scripts):
    from vendor_sources import vendor_dir

    archive = vendor_dir() / "multimodal-prompt-learning-69bce21.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive.name} not in {archive.parent}")
    mine = C.METHOD_CONFIGS[method]
    with tarfile.open(archive) as tar:
        for protocol, script in zip(("base2new", "xd"), scripts):
            used = mine.for_protocol(protocol)
            assert used.config == f"{trainer}/{_script_config(tar, 'scripts/' + script)}"
            want = _official(tar, used.config)
            assert want["backbone"] == "ViT-B/16"
            assert (used.prompt, used.lr, used.epochs, used.batch_size) == (
                want["prompt"], want["lr"], want["epochs"], want["batch_size"])
    assert mine.for_protocol("dg") is mine.for_protocol("xd")  # dg tests the xd model


def test_the_issue_s_numbers():
    maple = C.METHOD_CONFIGS["maple"]
    assert (maple.prompt["depth"], maple.prompt["n_ctx"], maple.batch_size, maple.lr,
            maple.epochs) == (9, 2, 4, 0.0035, 5)
    cocoop = C.METHOD_CONFIGS["cocoop"]
    assert (cocoop.prompt["n_ctx"], cocoop.batch_size, cocoop.epochs, cocoop.lr) == (
        4, 1, 10, 0.002)


def test_a_method_s_config_fixes_prompt_and_schedule_and_prograd_adds_its_lambda(toys):
    for setting in C.SETTINGS:
        s = C.official_schedule("base2new", "dtd", 16, "toyvis", setting)
        assert (s.epochs, s.lr, s.batch_size, s.lam) == (1, 0.01, 2, 0.0)
        x = C.official_schedule("xd", "caltech101", 16, "toyvis+prograd", setting)
        assert (x.lr, x.lam) == (0.02, 1.0)  # its cross-data-set config
    # ProGrad's lambda as ProGrad gets it in the same run (0.8 for 16 shots on DTD)
    assert C.official_schedule("fewshot", "dtd", 16, "toyvis+prograd").lam == 0.8
    assert C.official_schedule("fewshot", "dtd", 16, "prograd").lam == 0.8
    assert C.official_schedule("fewshot", "dtd", 16, "kgcoop+prograd").lam == 0.8
    p = C.method_prompt("toyvis+prograd", "DescribableTextures", "cocoop", protocol="base2new")
    assert p == {"templates": "DescribableTextures", "template_set": "coop", "depth": 2,
                 "n_ctx": 3, "ctx_init": PHOTO}
    # the teacher is the setting's zero-shot CLIP
    assert C.method_prompt("toyvis+prograd", "X", "prograd")["template_set"] == \
        C.method_prompt("zeroshot", "X", "prograd")["template_set"] == "prograd"
    assert C.method_prompt("toycond", "X", "cocoop", protocol="dg")["depth"] == 1


def test_ablations_reach_a_config_s_prompt_or_are_refused(toys):
    o = C.PromptOverrides(n_ctx=5, ctx_init="none")
    p = C.method_prompt("toycond", "X", "cocoop", o)
    assert p["n_ctx"] == 5 and p["ctx_init"] is None
    with pytest.raises(C.ProtocolError, match="--csc applies to CoOp-style prompts, not to "
                                              "toycond .its settings: depth, n_ctx, ctx_init"):
        C.method_prompt("toycond", "X", "cocoop", C.PromptOverrides(csc=True))
    C.register_method_config("toycond", C.MethodConfig("toy/v", {"n_ctx_vision": 8}))
    with pytest.raises(C.ProtocolError, match="--n-ctx: toycond has no text context"):
        C.method_prompt("toycond", "X", "cocoop", C.PromptOverrides(n_ctx=4))


def test_prompt_depth_reaches_every_deep_tower_and_is_refused_elsewhere(capsys):
    from prograd_fast.cli import main

    depth = C.PromptOverrides(depth=3)
    assert C.method_prompt("maple+prograd", "X", "cocoop", depth)["depth"] == 3
    ivlp = C.method_prompt("ivlp", "X", "cocoop", depth)
    assert ivlp["depth_text"] == 3 and ivlp["depth_vision"] == 3
    assert C.method_prompt("vpt", "X", "cocoop", depth)["depth_vision"] == 3
    assert C.method_prompt("maple", "X", "cocoop")["depth"] == 9  # the config's without it
    with pytest.raises(C.ProtocolError, match="--prompt-depth: cocoop has no deep prompts"):
        C.method_prompt("cocoop", "X", "cocoop", depth)
    code = main(["protocol", "base2new", "--root", "/nowhere", "--methods", "coop", "cocoop",
                 "--prompt-depth", "3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "applies to methods with deep prompts" in err
    code = main(["train", "--method", "coop", "--prompt-depth", "3", "--epochs", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--prompt-depth: coop has no deep prompts" in err


def test_n_ctx_alone_gives_cocoop_a_random_context_as_it_gives_coop():
    p = C.method_prompt("cocoop+prograd", "X", "cocoop", C.PromptOverrides(n_ctx=8))
    assert p["n_ctx"] == 8 and p["ctx_init"] is None
    same = C.method_prompt("cocoop", "X", "cocoop", C.PromptOverrides(n_ctx=4))
    assert same["ctx_init"] == "a photo of a"  # its 4 words still fit
    maple = C.method_prompt("maple", "X", "cocoop", C.PromptOverrides(n_ctx=3))
    assert maple["n_ctx"] == 3 and maple["ctx_init"] == "a photo of a"  # first 3 tokens, as MaPLe

def test_the_caption_names_each_method_s_settings(toys):
    from prograd_fast.protocols.meta import METHODS_KEY, grid_meta
    from prograd_fast.protocols.tables import _caption

    opts = GridOptions("base2new", "/data", methods=["zeroshot", "coop", "kgcoop", "toyvis",
                                                     "toyvis+prograd"], setting="cocoop")
    meta = grid_meta(opts)
    assert meta[METHODS_KEY] == {"kgcoop": "W 8.0, batch 128, epochs 100",
                                 "toyvis": "depth 2, n_ctx 3, batch 2, lr 0.01, epochs 1",
                                 "toyvis+prograd": "depth 2, n_ctx 3, batch 2, lr 0.01, epochs 1"}
    caption = _caption("base2new", meta)
    assert "toyvis depth 2, n_ctx 3, batch 2, lr 0.01, epochs 1" in caption
    assert "coop" not in meta[METHODS_KEY]  # CoOp's own settings are the reference
    xd = grid_meta(GridOptions("xd", "/data", methods=["toyvis"], lr=0.05))
    assert xd[METHODS_KEY]["toyvis"] == "depth 1, n_ctx 3, batch 2, lr 0.02, epochs 1"
    assert xd["differs from the official configs"]["lr"] == "0.05 (official: 0.02)"
    mixed = grid_meta(GridOptions("xd", "/data", methods=["coop", "toyvis"], batch_size=8))
    assert mixed["differs from the official configs"]["batch size"] == \
        "8 (official: coop 32, toyvis 2)"
    assert "methods" not in " ".join(grid_meta(GridOptions("fewshot", "/data")))


def test_the_cli_takes_every_registered_method_and_refuses_others_in_one_line(toys, capsys):
    from prograd_fast.cli import build_parser, main

    sub = build_parser()._subparsers._group_actions[0].choices
    protocol_help = " ".join(sub["protocol"].format_help().split())
    for name in methods.METHODS:
        assert f"{name}: " in protocol_help
    assert "toyvis+prograd: ToyVis+prograd" in protocol_help
    assert "--prograd-groups {together,apart}" in protocol_help
    assert "toyvis" in " ".join(sub["train"].format_help().split())
    code = main(["protocol", "base2new", "--root", "/nowhere", "--methods", "coop", "maple2",
                 "toyvis"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "unknown method(s) maple2: use any of " + " ".join(methods.METHODS) in err


# ---------------------------------------------------------------- the grid, both kinds
@pytest.fixture
def grid_env(tmp_path):
    root = tmp_path / "data"
    L.make(root, "dtd")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_cfg()))
    return root, cfg, tmp_path


def _runner(env, methods_, log=None, **kw):
    root, cfg, tmp = env
    opts = GridOptions("base2new", str(root), datasets=["dtd"], seeds=[1], methods=methods_,
                       model=str(cfg), pretrained=None, output_dir=str(tmp / "out"),
                       progress=False, setting="cocoop", **kw)
    return GridRunner(opts, log=log or (lambda *a: None))


def _accuracy_on_images(runner, run, learner, classes):
    """The trained prompt of ``run`` scored here on the test images of ``classes``."""
    from prograd_fast.clip import PromptedCLIP
    from prograd_fast.clip.data import ImageDataset
    from prograd_fast.clip.trainer import correct_counts
    from prograd_fast.datasets.items import Item, class_subset

    spec, full, _ = runner._split("dtd")
    keep = class_subset(len(full.classnames), classes)
    torch.manual_seed(0)
    model = PromptedCLIP(runner.clip, [full.classnames[i] for i in keep], learner=learner,
                         tokenizer=runner.tokenizer, **runner.prompt(run.method, spec.dassl))
    state = torch.load(runner.run_dir(run) / "checkpoint.pt", weights_only=False)
    model.prompt_learner.load_state_dict(state["learner"])
    items = [Item(it.path, keep.index(it.label)) for it in full.test if it.label in keep]
    loader = DataLoader(ImageDataset(items, runner.test_tf), batch_size=3)
    correct, total = correct_counts(model, loader).tolist()
    return 100.0 * correct / total


def test_the_grid_runs_both_kinds_with_their_configs(grid_env, toys):
    runner = _runner(grid_env, ["zeroshot", "toycond+prograd", "toyvis+prograd"])
    results = {run.method: (run, res) for run, res in runner.run()}
    for name, learner in (("toycond+prograd", CondToy), ("toyvis+prograd", VisionToy)):
        run, res = results[name]
        settings = json.loads((runner.run_dir(run) / "settings.json").read_text())
        assert settings["schedule"]["lr"] == 0.01 and settings["schedule"]["batch_size"] == 2
        assert settings["schedule"]["epochs"] == 1 and settings["schedule"]["lam"] == 1.0
        assert settings["prompt"]["depth"] == 2 and settings["inputs"] == "images"
        assert set(res["tests"]) == {"dtd/base", "dtd/new"}
    # the vision-prompted prompt is tested on the images through its own image tower
    run, res = results["toyvis+prograd"]
    state = torch.load(runner.run_dir(run) / "checkpoint.pt", weights_only=False)
    assert state["learner"]["pixel"].abs().sum() > 0
    for classes in ("base", "new"):
        assert res["tests"][f"dtd/{classes}"] == pytest.approx(
            _accuracy_on_images(runner, run, VisionToy, classes))


def test_cached_training_features_serve_the_image_conditioned_kind_only(grid_env, toys):
    lines = []
    runner = _runner(grid_env, ["toycond", "toyvis"], log=lines.append,
                     cache_train_features=True)
    inputs = {r.method: runner.settings(r)["inputs"] for r in runner.runs}
    assert inputs == {"toycond": "features", "toyvis": "images"}
    assert lines == ["--cache-train-features: toyvis train on images (they prompt the image "
                     "tower: cached image features are not valid for them)"]
    from prograd_fast.protocols.meta import grid_meta

    said = grid_meta(runner.opts)["differs from the official configs"]["training inputs"]
    assert said.endswith("; images for toyvis: they prompt the image tower)")
    results = dict((r.method, res) for r, res in runner.run())
    assert all(0 <= a <= 100 for res in results.values() for a in res["tests"].values())


def test_prograd_groups_apart_reach_the_trainer_and_the_run(grid_env, toys):
    runner = _runner(grid_env, ["toyvis+prograd"], prograd_groups="apart")
    [run] = runner.runs
    assert runner.settings(run)["prograd_groups"] == "apart"
    assert "prograd_groups" not in _runner(grid_env, ["toyvis+prograd"]).settings(run)
    [(run, res)] = runner.run()
    log = json.loads((runner.run_dir(run) / "log.json").read_text())
    assert log["config"]["prograd_groups"] == "apart"
    [row] = log["history"]
    assert set(row["conflict_rate_by_group"]) == {"text", "vision"}
    assert row["conflict_rate"] == pytest.approx(
        sum(row["conflict_rate_by_group"].values()) / 2)


def test_the_trainer_refuses_cached_features_for_a_vision_prompted_learner():
    from clip_helpers import CLASSNAMES, tiny_clip
    from prograd_fast.clip import PromptedCLIP
    from prograd_fast.clip.trainer import TrainConfig, Trainer

    model = PromptedCLIP(tiny_clip(seed=1), CLASSNAMES, learner=VisionPrompted)
    data = TensorDataset(torch.randn(4, 32), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="prompts the image tower: train it on images"):
        Trainer(model, data, None, TrainConfig(method="prograd", inputs="features",
                                               progress=False))


def test_a_vision_prompted_method_on_a_tower_without_a_transformer_is_refused(grid_env, toys):
    from prograd_fast.protocols.config import ProtocolError

    root, cfg, tmp = grid_env
    resnet = dict(tiny_cfg())
    resnet["vision_cfg"] = {**resnet["vision_cfg"], "layers": [1, 1, 1, 1], "width": 8,
                            "image_size": 64}
    rn = tmp / "tiny_rn.json"
    rn.write_text(json.dumps(resnet))
    with pytest.raises(ProtocolError, match=r"^toyvis\+prograd prompt\(s\) the image tower's "
                                            r"transformer: .*tiny_rn.json has none"):
        _runner((root, rn, tmp), ["coop", "toycond", "toyvis+prograd"])
    _runner((root, rn, tmp), ["toycond"])  # an image-conditioned learner needs no ViT



def test_train_records_a_learner_s_settings_and_eval_rebuilds_it(grid_env, toys, capsys):
    from prograd_fast.cli import main

    root, cfg, tmp = grid_env
    out = tmp / "run"
    assert main(["train", "--dataset", "dtd", "--root", str(root), "--model", str(cfg),
                 "--method", "toycond+prograd", "--shots", "2", "--epochs", "1",
                 "--subsample", "base", "--no-progress", "--output-dir", str(out)]) == 0
    prompt = json.loads((out / "log.json").read_text())["config"]["extra"]["prompt"]
    assert prompt["learner_settings"] == {"depth": 2, "n_ctx": 3, "ctx_init": PHOTO}
    assert prompt["template_set"] == "coop"
    capsys.readouterr()
    assert main(["eval", str(out), "--classes", "new"]) == 0
    said = capsys.readouterr().out
    assert "toycond+prograd prompt from" in said and "test accuracy" in said


def test_every_registered_method_runs_the_grid(tmp_path):
    """Each method of the registry (with its official config, on a tiny ViT deep enough for
    12-layer prompts) trains and is tested on base and new classes in one grid."""
    root = tmp_path / "data"
    L.make(root, "dtd")
    deep = tiny_cfg(layers=12)
    deep["vision_cfg"] = {**deep["vision_cfg"], "layers": 12}
    cfg = tmp_path / "deep.json"
    cfg.write_text(json.dumps(deep))
    names = list(methods.METHODS)
    opts = GridOptions("base2new", str(root), datasets=["dtd"], seeds=[1], methods=names,
                       model=str(cfg), pretrained=None, output_dir=str(tmp_path / "out"),
                       progress=False, setting="cocoop", epochs=1)
    results = GridRunner(opts, log=lambda *a: None).run()
    assert [run.method for run, _ in results] == names
    for run, res in results:
        assert set(res["tests"]) == {"dtd/base", "dtd/new"}, run.method
        assert all(0 <= acc <= 100 for acc in res["tests"].values()), run.method


@pytest.mark.parametrize("method, words", [("cocoop+prograd", "a photo of a"),
                                           ("prograd", "a handwritten")])
def test_train_on_the_embedded_digits_keeps_a_method_s_own_prompt(tmp_path, method, words):
    """The embedded digits model's short context replaces CoOp's 16 random tokens only: a
    method with an official config (CoCoOp: 4 words of "a photo of a") keeps its prompt
    (it used to get the demo's 2 words against its 4 tokens and stop with an error)."""
    from prograd_fast.cli import main

    out = tmp_path / "run"
    assert main(["train", "--method", method, "--epochs", "0", "--shots", "1",
                 "--output-dir", str(out)]) == 0
    prompt = json.loads((out / "log.json").read_text())["config"]["extra"]["prompt"]
    got = prompt.get("learner_settings", prompt)["ctx_init"]
    assert got == words
