"""VPT-deep: the learner equals the official VPT code (multimodal-prompt-learning in the vendor
folder) on the same tiny weights in OpenAI layout -- logits, the gradient of each vision
prompt, 5 steps of the official trainer's update -- and under ProGrad equals official
ProGrad's rule on the official learner's CE and KL gradients (teacher: zero-shot CLIP
without prompts); the text side stays fixed; bad settings are refused."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F

from clip_helpers import CLASSNAMES, tiny_clip
from deep_official import (  # noqa: F401 (fixtures)
    NAMES, NARROW, TEMPLATE, batch, compare_five_steps, copy_of, neutralise_half_and_cuda,
    official, official_clip, open_clip_of, rel, set_float64, teacher_logits, with_dtype)
from prograd_fast.clip import PromptedCLIP, TextTower
from prograd_fast.clip.vpt import VPTLearner

N_CTX, DEPTH, LR = 2, 3, 0.0025  # depth 3 of 4 layers: deep prompts at 1, 2; layer 3 plain


def vpt_cfg():
    vpt = NS(N_CTX_VISION=N_CTX, CTX_INIT="a photo of a", PREC="fp32", PROMPT_DEPTH_VISION=DEPTH)
    return NS(TRAINER=NS(VPT=vpt), INPUT=NS(SIZE=(16, 16)))


def official_prompts(ref) -> dict:
    """The official prompt parameters under our names."""
    visual = ref.image_encoder
    out = {"ctx_vision": visual.VPT}
    for k in range(DEPTH - 1):
        out[f"deep_vision.{k}"] = visual.transformer.resblocks[k + 1].VPT_shallow
    return out


@pytest.fixture
def pair(official, neutralise_half_and_cuda, monkeypatch):
    """``make(dtype)``: (official CustomCLIP, our PromptedCLIP with the official initial
    prompts, the official CLIP weights), in ``dtype``."""
    def make(dtype=torch.float32):
        if dtype == torch.float64:
            set_float64(official, monkeypatch)
        design = {"trainer": "VPT", "vision_depth": DEPTH, "vision_ctx": N_CTX,
                  "language_depth": 0, "language_ctx": 0}
        weights = official_clip(official, design, dims=NARROW).to(dtype)
        ref = with_dtype(official.vpt.CustomCLIP(vpt_cfg(), NAMES, copy_of(weights)), dtype).eval()
        for name, p in ref.named_parameters():  # as the official build_model
            p.requires_grad_("VPT" in name)
        clip = open_clip_of(weights).to(dtype)
        learner = VPTLearner(TextTower.from_model(clip), NAMES, clip_model=clip,
                             n_ctx_vision=N_CTX, depth_vision=DEPTH)
        theirs = official_prompts(ref)
        assert {k: (v.shape, v.dtype) for k, v in learner.state_dict().items()} == {
            k: (v.shape, v.dtype) for k, v in theirs.items()}
        learner.load_state_dict({k: v.detach() for k, v in theirs.items()})
        model = PromptedCLIP(clip, NAMES, learner=learner, templates=TEMPLATE)
        return ref, model, weights
    return make


def test_logits_and_every_gradient_equal_the_official_vpt(pair):
    ref, model, _ = pair()
    images, labels = batch()
    logits = ref(images)
    mine, _ = model(images)
    assert rel(mine, logits) <= 1e-5
    # the fixed text side: "a photo of a {}." encoded once, as the official FixedEmbeddings
    fixed = ref.embeddings.return_fixed_embeddings()
    assert rel(model.text_features(), fixed) <= 1e-5 and not model.text_features().requires_grad
    F.cross_entropy(logits, labels).backward()
    named = dict(model.prompt_learner.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(mine, labels), list(named.values()))
    theirs = official_prompts(ref)
    assert set(theirs) == set(named)
    for (name, _), g in zip(named.items(), grads):
        assert rel(g, theirs[name].grad) <= 1e-5, name
        assert g.norm() > 0, name


def test_the_teacher_is_zero_shot_clip_without_prompts(official, pair):
    _, model, weights = pair()
    images, _ = batch()
    _, zs = model(images)
    assert rel(zs, teacher_logits(official, weights, images)) <= 1e-5


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_five_steps_equal_the_official_update(official, pair, lam):
    """In float64 (see ``set_float64``).  lam 0: the official VPT trainer's own step (Dassl
    SGD, lr 0.0025); lam 1: official ProGrad's rule (tensor by tensor) on the official
    learner's CE and KL gradients, the teacher being zero-shot CLIP without prompts."""
    ref, model, weights = pair(torch.float64)
    compare_five_steps(official, ref, model, weights, lam, LR, official.vpt.VPT, vpt_cfg(),
                       official_prompts)


def test_bad_settings_are_refused_and_moved_to_keeps_the_prompts():
    clip = tiny_clip()  # ViT, 1 image layer
    tower = TextTower.from_model(clip)
    with pytest.raises(ValueError, match="depth 12 exceeds the 1 layers of the image tower"):
        VPTLearner(tower, CLASSNAMES, clip_model=clip)
    with pytest.raises(ValueError, match="n_ctx_vision >= 1 and depth_vision >= 1"):
        VPTLearner(tower, CLASSNAMES, clip_model=clip, n_ctx_vision=0, depth_vision=1)
    with pytest.raises(ValueError, match="class slot"):
        VPTLearner(tower, CLASSNAMES, clip_model=clip, depth_vision=1, text_template="a photo")
    learner = VPTLearner(tower, CLASSNAMES, clip_model=clip, depth_vision=1)
    moved = learner.moved_to(tower, ["x", "y"])
    assert torch.equal(moved.ctx_vision, learner.ctx_vision)
    assert moved.fixed_text_features.shape[0] == 2
