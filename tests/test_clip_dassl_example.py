"""examples/dassl_coop_prograd.py without Dassl (its stand-in base class): the training step,
config keys, precision, checkpoints.  Inside real Dassl: tests/test_dassl_integration.py."""

import json
from types import SimpleNamespace as NS

import open_clip
import pytest
import torch

from prograd_fast import ProGradSGD
from prograd_fast.clip import PROGRAD_TEMPLATES, PromptedCLIP, train_step

from clip_helpers import CLASSNAMES, tiny_cfg, tiny_clip
from dassl_harness import EXAMPLE, load_example
from vendor_sources import custom_templates, vendor_tree  # noqa: F401 - the fixture


@pytest.fixture
def example(monkeypatch):
    mod = load_example()
    if mod.TRAINER_REGISTRY is not None:
        pytest.skip("Dassl is importable here: the stand-in base is not used")
    monkeypatch.setattr(mod, "load_clip_to_cpu", lambda cfg: tiny_clip(seed=21))
    return mod


def _cfg(prec="fp32", ctx_init=False, loss=None, prograd=None, init_weights="", n_ctx=4, **optim):
    cfg = NS(MODEL=NS(BACKBONE=NS(NAME="ViT-B/16", PRETRAINED=False), INIT_WEIGHTS=init_weights),
             DATASET=NS(NAME="OxfordPets"), INPUT=NS(SIZE=(16, 16)),
             TRAINER=NS(COOP=NS(N_CTX=n_ctx, CTX_INIT=ctx_init, CSC=False, CLASS_TOKEN_POSITION="end",
                                PREC=prec)),
             OPTIM=NS(**{"NAME": "sgd", "LR": 0.5, "MOMENTUM": 0.9, "WEIGHT_DECAY": 5e-4,
                         "SGD_DAMPNING": 0, "SGD_NESTEROV": False, "STAGED_LR": False, **optim}))
    if loss is not None:
        cfg.LOSS = NS(**loss)
    if prograd is not None:
        cfg.TRAINER.PROGRAD = NS(**prograd)
    return cfg


def _trainer(example, cfg, classnames=CLASSNAMES):
    torch.manual_seed(0)
    trainer = example.CoOpProGradFast(cfg, NS(dataset=NS(classnames=classnames)))
    return trainer


def _batch(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    return {"img": torch.randn(n, 3, 16, 16, generator=g),
            "label": torch.randint(0, len(CLASSNAMES), (n,), generator=g)}


def test_example_trainer_matches_train_step(example):
    trainer = _trainer(example, _cfg(loss=dict(NAME="prograd", LAMBDA=1.0, T=1.0)))
    assert isinstance(trainer.optim, ProGradSGD)
    torch.manual_seed(0)
    ref = PromptedCLIP(tiny_clip(seed=21), CLASSNAMES, templates="a type of pet, a photo of a {}.",
                       n_ctx=4, dtype=torch.float32)
    ref_opt = ProGradSGD([ref.prompt_learner.ctx], lr=0.5, momentum=0.9, weight_decay=5e-4,
                         lam=1.0, granularity="tensor")
    torch.testing.assert_close(ref.prompt_learner.ctx, trainer.model.prompt_learner.ctx)
    for seed in range(3):
        batch = _batch(seed)
        summary = trainer.forward_backward(batch)
        train_step(ref, ref_opt, batch["img"], batch["label"], grad_mode="batched")
    assert set(summary) == {"xe_loss", "kl_loss", "acc"} and summary["kl_loss"] > 0
    torch.testing.assert_close(trainer.model.prompt_learner.ctx, ref.prompt_learner.ctx,
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ item 1: Dassl's test()
def test_model_inference_returns_the_students_logits_as_one_tensor(example):
    trainer = _trainer(example, _cfg())
    images = _batch()["img"]
    out = trainer.model_inference(images)
    assert isinstance(out, torch.Tensor) and out.shape == (6, len(CLASSNAMES))
    torch.testing.assert_close(out, trainer.model(images)[0])
    out.max(1)  # what dassl.evaluation.Classification.process does


# ------------------------------------------------------------------ item 2: PRETRAINED
def test_backbone_pretrained_maps_dassls_values(example):
    assert example.backbone_pretrained(True, "ViT-B-16") == "openai"  # Dassl's default
    assert example.backbone_pretrained(True, "RN50") == "openai"
    for off in (False, "", None):
        assert example.backbone_pretrained(off, "ViT-B-16") is None
    assert example.backbone_pretrained("laion2b_s34b_b88k", "ViT-B-16") == "laion2b_s34b_b88k"
    assert example.backbone_pretrained("/ckpt/clip.pt", "ViT-B-16") == "/ckpt/clip.pt"
    with pytest.raises(ValueError, match="OpenAI's weights.*ViT-bigG-14"):
        example.backbone_pretrained(True, "ViT-bigG-14")
    with pytest.raises(TypeError, match="bool or a string"):
        example.backbone_pretrained(1.0, "ViT-B-16")


def test_load_clip_to_cpu_loads_a_checkpoint_file_and_maps_the_name(tmp_path):
    mod = load_example()
    (tmp_path / "tiny-Ex-8.json").write_text(json.dumps(tiny_cfg()))
    open_clip.add_model_config(tmp_path / "tiny-Ex-8.json")
    source = open_clip.create_model("tiny-Ex-8")
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    cfg = NS(MODEL=NS(BACKBONE=NS(NAME="tiny-Ex/8", PRETRAINED=str(tmp_path / "weights.pt"))))
    model = mod.load_clip_to_cpu(cfg)
    assert not model.training
    for a, b in zip(model.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)


def test_openai_weights_are_built_with_quick_gelu_as_clip_load_does(monkeypatch):
    """open_clip builds ViT-B-16 with GELU even for OpenAI's QuickGELU weights (it only warns)."""
    from prograd_fast.clip import load_open_clip

    seen = []
    monkeypatch.setattr(open_clip, "create_model", lambda name, **kw: seen.append(kw) or torch.nn.Linear(1, 1))
    load_open_clip("ViT-B-16", "openai")
    load_open_clip("ViT-B-16", "laion2b_s34b_b88k")
    load_open_clip("ViT-B-16", None)
    assert [kw["force_quick_gelu"] for kw in seen] == [True, False, False]
    assert seen[2]["pretrained"] is None


# ------------------------------------------------------------------ item 3: CTX_INIT True
def test_ctx_init_true_is_official_prograds(example):
    pl = _trainer(example, _cfg(ctx_init=True, n_ctx=16)).model.prompt_learner
    assert pl.n_ctx == 16 and pl.prompt_prefix == " ".join(["X"] * 8 + ["a type of pet, a photo of a"])
    assert pl.ctx[:8].abs().sum() == 0 and pl.ctx[8:].abs().sum() > 0
    with pytest.raises(ValueError, match="smaller than the 8 words"):
        _trainer(example, _cfg(ctx_init=True))  # N_CTX 4: the official code asserts too


def test_ctx_init_translation(example):
    tpl = PROGRAD_TEMPLATES["OxfordPets"]
    assert example.context_init(True, tpl) == dict(ctx_init="a type of pet, a photo of a",
                                                   ctx_init_mode="prograd")
    assert example.context_init("a photo of a", tpl) == dict(ctx_init="a photo of a",
                                                             ctx_init_mode="coop")
    assert example.context_init(False, tpl) == example.context_init("", tpl) == dict(ctx_init=None)


# ------------------------------------------------------------------ item 4: load_model
def _save_official(path, ctx, n_cls):
    """A prompt-learner checkpoint as CoOp / official ProGrad (the fork's Dassl) save it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"ctx": ctx.half(),
                               "token_prefix": torch.randn(n_cls, 1, ctx.shape[-1]).half(),
                               "token_suffix": torch.randn(n_cls, 72, ctx.shape[-1]).half()},
                "epoch": 7, "optimizer": None, "scheduler": None}, path)


def test_load_model_reads_official_checkpoints_by_epoch_or_best(example, tmp_path, capsys):
    trainer = _trainer(example, _cfg())
    ctx = torch.randn(4, 32)
    _save_official(tmp_path / "prompt_learner" / "model.pth.tar-7", ctx, n_cls=3)
    trainer.load_model(str(tmp_path), epoch=7)
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), ctx.half().float())
    assert "(epoch = 7)" in capsys.readouterr().out
    _save_official(tmp_path / "prompt_learner" / "model-best.pth.tar", -ctx, n_cls=3)
    trainer.load_model(str(tmp_path))
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), -ctx.half().float())
    with pytest.raises(FileNotFoundError, match="model.pth.tar-3"):
        trainer.load_model(str(tmp_path), epoch=3)
    _save_official(tmp_path / "wide" / "prompt_learner" / "model.pth.tar-1", torch.randn(16, 32), 3)
    with pytest.raises(RuntimeError, match=r"shape \(16, 32\).*N_CTX"):
        trainer.load_model(str(tmp_path / "wide"), epoch=1)
    trainer.load_model("")  # Dassl's "no model given" case: a note, no error


# ------------------------------------------------------------------ item 5: official LOSS keys
@pytest.mark.parametrize("loss,prograd,lam,temperature", [
    (dict(NAME="prograd", LAMBDA=0.3, T=2.0), None, 0.3, 2.0),   # official ProGrad's train.py
    (dict(NAME="", LAMBDA=0.0, T=1.0), None, 0.0, 1.0),           # LOSS.LAMBDA 0: CoOp
    (None, dict(LAMBDA=0.5, T=1.5), 0.5, 1.5),                    # TRAINER.PROGRAD only
    (dict(NAME="prograd", LAMBDA=0.5, T=1.0), dict(LAMBDA=0.5), 0.5, 1.0),
    (None, None, 1.0, 1.0),                                       # CoOp's train.py: defaults
])
def test_official_loss_keys_reach_the_optimizer_and_the_loss(example, loss, prograd, lam, temperature):
    trainer = _trainer(example, _cfg(loss=loss, prograd=prograd))
    assert trainer.optim.param_groups[0]["lam"] == lam and trainer.T == temperature
    trainer.forward_backward(_batch())


def test_conflicting_or_unknown_loss_keys_are_refused(example):
    with pytest.raises(ValueError, match="LOSS.LAMBDA .* and TRAINER.PROGRAD.LAMBDA .* disagree"):
        _trainer(example, _cfg(loss=dict(NAME="prograd", LAMBDA=1.0, T=1.0),
                               prograd=dict(LAMBDA=0.5)))
    with pytest.raises(ValueError, match="LOSS.NAME 'gm'"):
        _trainer(example, _cfg(loss=dict(NAME="gm", LAMBDA=1.0, T=1.0)))


# ------------------------------------------------------------------ item 6: Dassl's signature
def test_model_backward_and_update_keeps_dassls_signature(example):
    trainer = _trainer(example, _cfg())
    out, zs = trainer.model(_batch()["img"])
    loss = torch.nn.functional.cross_entropy(out, _batch()["label"])
    before = trainer.model.prompt_learner.ctx.detach().clone()
    with pytest.warns(UserWarning, match="without general gradients"):
        trainer.model_backward_and_update(loss, "prompt_learner")  # Dassl: (loss, names)
    assert not torch.equal(before, trainer.model.prompt_learner.ctx.detach())
    out, zs = trainer.model(_batch()["img"])
    ce, kl = torch.nn.functional.cross_entropy(out, _batch()["label"]), (out - zs).square().mean()
    with pytest.raises(TypeError, match="general loss by keyword"):
        trainer.model_backward_and_update(ce, kl)
    trainer.model_backward_and_update(ce, ["prompt_learner"], general_loss=kl)


# ------------------------------------------------------------------ item 7: teacher templates
def test_default_teacher_is_official_prograds_and_coops_is_one_key_away(example):
    trainer = _trainer(example, _cfg())
    assert trainer.model.teacher.templates == ["a type of pet, a photo of a {}."]
    coop = _trainer(example, _cfg(prograd=dict(TEMPLATE_SET="coop")))
    assert coop.model.teacher.templates == ["a photo of a {}, a type of pet."]


def test_default_teacher_prompts_equal_the_official_trainers(example, vendor_tree, capsys):
    official = custom_templates(vendor_tree / "prompt_align" / "ProGrad.public" / "trainers"
                                 / "prograd.py")
    for dataset in ("OxfordPets", "OxfordFlowers", "FGVCAircraft", "DescribableTextures",
                    "Food101", "EuroSAT"):
        cfg = _cfg()
        cfg.DATASET.NAME = dataset
        trainer = _trainer(example, cfg)
        assert trainer.model.teacher.templates == [official[dataset]]
        names = [c.replace("_", " ") for c in CLASSNAMES]
        assert f"Prompts: {[official[dataset].format(c) for c in names]}" in capsys.readouterr().out


@pytest.mark.parametrize("template,ctx", [
    (["a photo of my {}.", "a drawing of a {}."], "a photo of my"),
    ("a {} seen from above.", None)])
def test_own_dataset_template_key_takes_a_string_or_a_list(example, capsys, template, ctx):
    """TRAINER.PROGRAD.TEMPLATE: a list is an ensemble teacher and its first template is
    what CTX_INIT True starts from; a template whose class slot is not last cannot
    initialise the context the official way (clear error), but trains a random one."""
    cfg = _cfg(prograd=dict(TEMPLATE=template), ctx_init=ctx is not None, n_ctx=6)
    cfg.DATASET.NAME = "MyData"
    trainer = _trainer(example, cfg)
    want = template if isinstance(template, list) else [template]
    assert trainer.model.teacher.templates == want
    out = capsys.readouterr().out
    assert "No teacher template" not in out
    if ctx is not None:
        assert trainer.model.prompt_learner.prompt_prefix == "X X " + ctx  # N_CTX 6, 4 words
        assert 'Initial context: "X X a photo of my"' in out
    cfg.TRAINER.COOP.CTX_INIT = True
    if ctx is None:
        with pytest.raises(ValueError, match="class slot"):
            _trainer(example, cfg)


@pytest.mark.parametrize("bad", ["a photo", ["a {}.", "no slot"], "{} and {}"])
def test_template_key_without_one_class_slot_is_refused(example, bad):
    with pytest.raises(ValueError, match="TRAINER.PROGRAD.TEMPLATE must be"):
        _trainer(example, _cfg(prograd=dict(TEMPLATE=bad)))


def test_own_dataset_without_template_uses_clips_and_says_so(example, capsys):
    cfg = _cfg(ctx_init=True, n_ctx=6)
    cfg.DATASET.NAME = "MyData"
    trainer = _trainer(example, cfg)
    assert trainer.model.teacher.templates == ["a photo of a {}."]
    notes = [line for line in capsys.readouterr().out.splitlines() if "teacher template" in line]
    assert len(notes) == 1 and "'MyData'" in notes[0] and "TRAINER.PROGRAD.TEMPLATE" in notes[0]
    assert trainer.model.prompt_learner.prompt_prefix == "X X a photo of a"


# ------------------------------------------------------------------ item 8: dropped options
def test_nan_loss_is_detected_as_dassl_does(example):
    trainer = _trainer(example, _cfg())
    batch = _batch()
    batch["img"][0] = float("nan")
    with pytest.raises(FloatingPointError, match="infinite or NaN"):
        trainer.forward_backward(batch)


def test_sgd_options_are_passed_or_refused(example):
    group = _trainer(example, _cfg(SGD_DAMPNING=0.1)).optim.param_groups[0]
    assert group["dampening"] == 0.1 and group["nesterov"] is False
    group = _trainer(example, _cfg(SGD_NESTEROV=True)).optim.param_groups[0]
    assert group["nesterov"] is True
    with pytest.raises(ValueError, match="STAGED_LR"):
        _trainer(example, _cfg(STAGED_LR=True))
    with pytest.raises(ValueError, match="OPTIM.NAME must be 'sgd'"):
        _trainer(example, _cfg(NAME="adam"))


def test_init_weights_warm_start_the_context(example, tmp_path):
    ctx = torch.randn(4, 32)
    _save_official(tmp_path / "coop" / "model.pth.tar-50", ctx, n_cls=3)
    trainer = _trainer(example, _cfg(init_weights=str(tmp_path / "coop" / "model.pth.tar-50")))
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), ctx.half().float())


def test_input_size_must_match_the_backbone(example):
    cfg = _cfg()
    cfg.INPUT.SIZE = (224, 224)
    with pytest.raises(ValueError, match=r"INPUT.SIZE \(224, 224\) must equal .* \(16, 16\)"):
        _trainer(example, cfg)


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize("prec", ["fp16", "amp"])
def test_fp16_and_amp_steps_run_with_an_fp32_context(example, prec):
    trainer = _trainer(example, _cfg(prec=prec))
    before = trainer.model.prompt_learner.ctx.detach().clone()
    summary = trainer.forward_backward(_batch())
    ctx = trainer.model.prompt_learner.ctx
    assert ctx.dtype == torch.float32 and torch.isfinite(ctx).all()
    assert not torch.equal(before, ctx.detach()) and summary["kl_loss"] >= 0
    if prec == "fp16":
        assert trainer.model.clip.visual.conv1.weight.dtype == torch.float16
    else:
        assert type(trainer.scaler).__name__ == "ProGradGradScaler"


def test_example_changed_lines_are_marked():
    text = EXAMPLE.read_text()
    assert text.count("# PROGRAD-FAST") >= 15
    for name in ("def forward_backward", "def model_backward_and_update", "def build_optimizer",
                 "def model_inference", "def load_model"):
        assert name in text


def test_docs_give_the_dassl_edits_the_tests_apply():
    """docs/coop.md shows users exactly the edits tests/dassl_harness.py applies to Dassl."""
    from dassl_harness import DASSL_EDITS

    docs = (EXAMPLE.parents[1] / "docs" / "coop.md").read_text()
    for _, old, new in DASSL_EDITS:
        if old.strip() == "raise NotImplementedError":  # inserted after get_lr
            assert new.split("\n", 2)[2].rstrip() in docs
        else:
            assert f"`{old}`" in docs and f"`{new}`" in docs


def test_several_gpus_do_not_wrap_the_model_in_data_parallel(example, monkeypatch, capsys):
    """A DataParallel replica is a shallow copy: PromptedCLIP's tower (and the shared-prefix
    encoder's blocks) would still be the first GPU's modules, fed the other GPUs' inputs."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    trainer = _trainer(example, _cfg())
    assert isinstance(trainer.model, PromptedCLIP)
    assert "trains on one" in capsys.readouterr().out
    replica = trainer.model._replicate_for_data_parallel()
    assert replica.tower is trainer.model.tower  # the reason


@pytest.mark.parametrize("ctx_init,class_specific", [(True, False), ("a photo of a", False),
                                                     (False, True)])
def test_csc_with_an_initialised_context_is_generic_as_in_the_official_trainers(
        example, capsys, ctx_init, class_specific):
    """CoOp's and official ProGrad's PromptLearner build one generic context whenever
    CTX_INIT is set, CSC True or not; CSC only makes random contexts class-specific."""
    cfg = _cfg(ctx_init=ctx_init, n_ctx=8)
    cfg.TRAINER.COOP.CSC = True
    trainer = _trainer(example, cfg)
    pl = trainer.model.prompt_learner
    assert pl.class_specific is class_specific
    assert pl.ctx.dim() == (3 if class_specific else 2)
    if not class_specific:
        assert "CSC is ignored" in capsys.readouterr().out
