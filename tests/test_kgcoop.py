"""KgCoOp: the learner equals the official KgCoOp code (``KgCoOp-c43ccc3`` in the vendor
folder) on the same tiny weights in OpenAI layout -- logits, the knowledge-guided loss, the
context's gradient, 5 SGD steps of the official update -- and under ProGrad equals the
official ProGrad rule applied to the official learner's two gradients; the shared prefix
is exact for it in float64; the registry, the grid and its settings know the method."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import open_clip
from clip_helpers import CLASSNAMES, tiny_cfg, tiny_clip
from prograd_fast.clip import PromptedCLIP, train_step
from prograd_fast.clip.kgcoop import KgCoOpLearner
from prograd_fast.clip.train import build_optimizer
from prograd_fast.methods import get_method
from vendor_sources import custom_templates, import_tree, rel, unpack, vendor_dir

KGCOOP = "KgCoOp-c43ccc3.tar.gz"
DATASET = "DescribableTextures"  # its KgCoOp template differs from CoOp's
NAMES = ["banded", "blotchy", "braided", "bubbly", "bumpy"]
#: Tiny CLIP in OpenAI layout: the official ``build_model`` takes 64-wide heads.
TINY = dict(embed_dim=24, image_resolution=16, vision_layers=1, vision_width=64,
            vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
            transformer_heads=1, transformer_layers=2)
W = 8.0
LR = 0.01


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official ``trainers/kgcoop.py``, its ``clip`` and Dassl's optimiser builder,
    imported from the unpacked tree (their top-level names are put back as they were after)."""
    vendor = vendor_dir()
    if not (vendor / KGCOOP).is_file():
        pytest.skip(f"{KGCOOP} not found in {vendor}")
    root = unpack(KGCOOP, tmp_path_factory.getbasetemp() / "kgcoop")
    out = import_tree([root / "KgCoOp", root / "Dassl.ProGrad.pytorch"], dict(
        kgcoop="trainers.kgcoop", model="clip.model", optim="dassl.optim",
        engine="dassl.engine.trainer", config="dassl.config"))
    out.defaults = out.config.get_cfg_default()
    return out


def official_cfg():
    coop = NS(N_CTX=4, CTX_INIT=True, CSC=False, CLASS_TOKEN_POSITION="end", W=W, PREC="fp32")
    return NS(TRAINER=NS(COOP=coop, COCOOP=NS(PREC="fp32")), INPUT=NS(SIZE=(16, 16)),
              DATASET=NS(NAME=DATASET), MODEL=NS(BACKBONE=NS(NAME="tiny")))


@pytest.fixture
def pair(official, monkeypatch):
    """(official CustomCLIP, prograd_fast's model factory, images, labels) on the same weights."""
    torch.manual_seed(0)
    weights = official.model.CLIP(**TINY).float().eval()
    # the official code loads a second CLIP for its targets and moves things to CUDA
    monkeypatch.setattr(official.kgcoop, "load_clip_to_cpu", lambda cfg: copy.deepcopy(weights))
    monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    ref = official.kgcoop.CustomCLIP(official_cfg(), NAMES, weights)
    for name, p in ref.named_parameters():  # as the official build_model
        p.requires_grad_("ctx" in name)
    model_cfg = dict(embed_dim=24, quick_gelu=True,
                     vision_cfg=dict(image_size=16, layers=1, width=64, patch_size=8, head_width=64),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    clip = open_clip.CLIP(**model_cfg).eval()
    missing, unexpected = clip.load_state_dict(weights.state_dict(), strict=False)
    assert not unexpected and all("attn_mask" in k or "logit_bias" in k for k in missing)

    def ours(share_prefix=True, dtype=torch.float32):
        c = copy.deepcopy(clip).to(dtype)
        return PromptedCLIP(c, NAMES, learner=get_method("kgcoop").learner, templates=DATASET,
                            template_set="kgcoop", kg_templates=DATASET, kg_weight=W,
                            share_prefix=share_prefix)

    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 16, 16, generator=g)
    labels = torch.randint(0, len(NAMES), (6,), generator=g)
    return ref, ours, images, labels


def official_losses(ref, images, labels):
    """The official forward_backward's loss (CE + W * score) and official ProGrad's KL to
    zero-shot CLIP of the same template (its soft-target cross-entropy, T = 1)."""
    logits, score = ref(images)
    with torch.no_grad():
        feats = ref.image_encoder(images)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        old = ref.ori_embedding / ref.ori_embedding.norm(dim=-1, keepdim=True)
        zs = ref.logit_scale.exp() * feats @ old.t()
    kl = -(F.softmax(zs, 1) * F.log_softmax(logits, 1)).sum(1).mean()
    return logits, F.cross_entropy(logits, labels) + W * score, kl, W * score


@pytest.mark.parametrize("share_prefix", [True, False])
def test_logits_loss_and_context_gradient_equal_the_official_learner(pair, share_prefix):
    ref, ours, images, labels = pair
    model = ours(share_prefix)
    assert (model.shared_prefix is not None) == share_prefix  # CoOp's layout: it applies
    assert torch.equal(model.prompt_learner.ctx, ref.prompt_learner.ctx)  # "a photo of a"
    logits, loss, _, kg = official_losses(ref, images, labels)
    mine, _ = model(images)
    assert rel(mine, logits) <= 1e-5
    text = model.text_features()
    assert rel(model.extra_loss(text), kg) <= 1e-5
    loss.backward()
    opt = build_optimizer(model, lr=LR, lam=0.0)
    train_step(model, opt, images, labels, step=False)
    assert rel(model.prompt_learner.ctx.grad, ref.prompt_learner.ctx.grad) <= 1e-5
    # the knowledge-guided term is in the gradient: without it the gradients differ
    plain = F.cross_entropy(mine, labels)
    g_ce, = torch.autograd.grad(plain, model.prompt_learner.ctx)
    assert rel(g_ce, ref.prompt_learner.ctx.grad) > 1e-3


def official_steps(official, ref, images, labels, lam, steps=5):
    """``steps`` updates of the official trainer: Dassl's SGD on the prompt learner, stepped
    by the Dassl fork's ``model_backward_and_update`` (KgCoOp's update) or, when ``lam`` > 0,
    its ``prograd_backward_and_update`` (official ProGrad's rule) on CE + W * KG and the KL;
    returns how many steps had conflicting gradients."""
    cfg = official.defaults.OPTIM.clone()
    cfg.defrost()
    cfg.NAME, cfg.LR = "sgd", LR  # the KgCoOp configs
    optim = official.optim.build_optimizer(ref.prompt_learner, cfg)
    ctx, conflicts = ref.prompt_learner.ctx, 0
    trainer = official.engine.SimpleTrainer.__new__(official.engine.SimpleTrainer)
    # the trained tensors only: the fork's rule reads every registered parameter's gradient
    trainer._models = OrderedDict(prompt_learner=nn.ParameterList([ctx]))
    trainer._optims = OrderedDict(prompt_learner=optim)
    for _ in range(steps):
        _, loss, kl, _ = official_losses(ref, images, labels)
        if lam > 0:
            g_d, = torch.autograd.grad(loss, ctx, retain_graph=True)
            g_g, = torch.autograd.grad(kl, ctx, retain_graph=True)
            conflicts += int(torch.dot(g_d.flatten(), g_g.flatten()) < 0)
            trainer.prograd_backward_and_update(loss, kl, lambda_=lam)
        else:
            trainer.model_backward_and_update(loss)
    return conflicts


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_five_steps_equal_the_official_update(official, pair, lam):
    ref, ours, images, labels = pair
    model = ours()
    opt = build_optimizer(model, lr=LR, momentum=0.9, weight_decay=5e-4, lam=lam)
    for _ in range(5):
        train_step(model, opt, images, labels)
    conflicts = official_steps(official, ref, images, labels, lam)
    if lam > 0:
        assert conflicts > 0  # the projection was exercised
    start = copy.deepcopy(ours().prompt_learner.ctx)
    assert rel(model.prompt_learner.ctx - start, ref.prompt_learner.ctx - start) <= 1e-5
    assert rel(model.prompt_learner.ctx, ref.prompt_learner.ctx) <= 1e-5


def test_the_knowledge_targets_are_the_official_templates(official):
    from prograd_fast.clip.teacher import KGCOOP_TEMPLATES

    official_templates = custom_templates(official.kgcoop.__file__)
    assert {k: KGCOOP_TEMPLATES[k] for k in official_templates} == official_templates


def test_the_shared_prefix_is_exact_for_kgcoop_in_float64():
    clip = tiny_clip(seed=3).double()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(5, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, len(CLASSNAMES), (5,), generator=g)
    grads, outs = [], []
    for share in (True, False):
        torch.manual_seed(0)
        model = PromptedCLIP(clip, CLASSNAMES, learner=KgCoOpLearner, ctx_init=None, n_ctx=3)
        assert model.shared_prefix is not None and model.shared_prefix.applies()  # as CoOp
        model.shared_prefix = model.shared_prefix if share else None
        text = model.text_features()
        logits = model.logits(model.encode_image(images), text)
        loss = F.cross_entropy(logits, labels) + model.extra_loss(text)
        grads.append(torch.autograd.grad(loss, model.prompt_learner.ctx)[0])
        outs.append(logits.detach())
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-13)


def test_kg_weight_zero_is_coop_and_bad_weights_are_refused():
    clip = tiny_clip(seed=3)
    torch.manual_seed(0)
    model = PromptedCLIP(clip, CLASSNAMES, learner=KgCoOpLearner, kg_weight=0.0)
    assert float(model.extra_loss(model.text_features()).detach()) == 0.0
    assert model.prompt_learner.n_ctx == 4 and model.prompt_learner.ctx_init == "a photo of a"
    with pytest.raises(ValueError, match="kg_weight"):
        KgCoOpLearner(model.tower, CLASSNAMES, kg_weight=-1.0)
    moved = model.prompt_learner.moved_to(model.tower, ["x", "y"])
    assert isinstance(moved, KgCoOpLearner) and torch.equal(moved.ctx, model.prompt_learner.ctx)
    assert moved.kg_features.shape[0] == 2 and moved.kg_weight == 0.0


def test_kgcoop_runs_the_protocol_grid_with_its_settings(tmp_path):
    import coop_layouts as L
    from prograd_fast.protocols import GridOptions, GridRunner

    root = tmp_path / "data"
    L.make(root, "dtd")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_cfg()))
    opts = GridOptions("base2new", str(root), datasets=["dtd"], seeds=[1],
                       methods=["kgcoop", "kgcoop+prograd"], model=str(cfg), pretrained=None,
                       output_dir=str(tmp_path / "out"), epochs=1, progress=False,
                       setting="cocoop")
    runner = GridRunner(opts, log=lambda *a: None)
    done = runner.run()
    assert [run.method for run, _ in done] == ["kgcoop", "kgcoop+prograd"]
    for run, result in done:
        settings = result["settings"]
        assert settings["prompt"]["kg_weight"] == 8.0 and settings["prompt"]["n_ctx"] == 4
        assert settings["schedule"]["batch_size"] == 128
        assert settings["schedule"]["lam"] == (1.0 if run.method == "kgcoop+prograd" else 0.0)
        assert set(result["tests"]) == {"dtd/base", "dtd/new"}
        state = torch.load(runner.run_dir(run) / "checkpoint.pt", weights_only=False)
        assert state["learner"]["ctx"].shape[0] == 4
        assert (state["history"][-1]["conflict_rate"] is None) == (run.method == "kgcoop")


def test_grid_ablations_of_the_context_hold_for_kgcoop():
    from prograd_fast.protocols.config import PromptOverrides, method_prompt

    longer = method_prompt("kgcoop", DATASET, "cocoop", PromptOverrides(n_ctx=8))
    assert longer["n_ctx"] == 8 and longer["ctx_init"] is None  # not the learner's 4 words
    random = method_prompt("kgcoop+prograd", DATASET, "prograd", PromptOverrides(ctx_init="none"))
    assert random["ctx_init"] is None and random["kg_templates"] == DATASET
    torch.manual_seed(0)
    model = PromptedCLIP(tiny_clip(), CLASSNAMES, learner=KgCoOpLearner,
                         **{k: v for k, v in longer.items() if k != "templates"},
                         templates="default")
    assert model.prompt_learner.n_ctx == 8 and model.prompt_learner.ctx_init is None
