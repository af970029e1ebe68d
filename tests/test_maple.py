"""MaPLe: the learner equals the official MaPLe code (multimodal-prompt-learning in the vendor
folder) on the same tiny weights in OpenAI layout -- initialisation, logits, the gradient of
each learnable tensor, 5 steps of the official trainer's update -- and under ProGrad equals
official ProGrad's rule applied to the official learner's CE and KL gradients, the teacher
being zero-shot CLIP without prompts; bad settings and image towers are refused."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F

from clip_helpers import CLASSNAMES, tiny_clip
from deep_official import (  # noqa: F401 (fixtures)
    NAMES, TEMPLATE, batch, compare_five_steps, copy_of, neutralise_half_and_cuda, official,
    official_clip, open_clip_of, rel, set_float64, teacher_logits, with_dtype)
from prograd_fast.clip import PromptedCLIP, TextTower
from prograd_fast.clip.deep_prompts import UnsupportedVisionTowerError
from prograd_fast.clip.maple import MaPLeLearner
from prograd_fast.clip.tower import normalize

N_CTX, DEPTH, LR = 2, 3, 0.0035  # depth 3 of 4 layers: deep prompts at 1, 2; layer 3 plain


def maple_cfg():
    maple = NS(N_CTX=N_CTX, CTX_INIT="a photo of a", PREC="fp32", PROMPT_DEPTH=DEPTH)
    return NS(TRAINER=NS(MAPLE=maple), INPUT=NS(SIZE=(16, 16)))


@pytest.fixture
def pair(official, neutralise_half_and_cuda, monkeypatch):
    """``make(dtype)``: (official CustomCLIP, our PromptedCLIP with the official initial
    prompts, the official CLIP weights), in ``dtype``."""
    def make(dtype=torch.float32):
        if dtype == torch.float64:
            set_float64(official, monkeypatch)
        design = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0,
                  "language_ctx": 0, "maple_length": N_CTX}
        weights = official_clip(official, design).to(dtype)
        ref = with_dtype(official.maple.CustomCLIP(maple_cfg(), NAMES, copy_of(weights)),
                         dtype).eval()
        for name, p in ref.named_parameters():  # as the official build_model
            p.requires_grad_("prompt_learner" in name)
        clip = open_clip_of(weights).to(dtype)
        learner = MaPLeLearner(TextTower.from_model(clip), NAMES, clip_model=clip, n_ctx=N_CTX,
                               depth=DEPTH)
        mine = {k: v.clone() for k, v in learner.state_dict().items()}
        official_init = {k[len("prompt_learner."):]: v for k, v in ref.state_dict().items()
                         if k.startswith("prompt_learner.")}
        # the same initialisation: ctx from "a photo", the deep projections copies of one layer
        assert torch.equal(mine["ctx"], official_init["ctx"])
        assert {k: (v.shape, v.dtype) for k, v in mine.items()} == {
            k: (v.shape, v.dtype) for k, v in official_init.items() if not k.startswith("token_")}
        for src in (mine, official_init):
            assert torch.equal(src["compound_prompt_projections.0.weight"],
                               src["compound_prompt_projections.1.weight"])
        learner.load_state_dict(official_init)  # the fixed token embeddings are rebuilt
        model = PromptedCLIP(clip, NAMES, learner=learner, templates=TEMPLATE)
        assert model.shared_prefix is not None  # the text prompts' prefix runs once
        return ref, model, weights
    return make


def our_logits(model, images):
    learner = model.prompt_learner
    image = normalize(learner.image_features(model, images))
    return model.logits(image, learner.text_features(model))


def test_logits_and_every_gradient_equal_the_official_maple(pair):
    ref, model, _ = pair()
    images, labels = batch()
    logits = ref(images)
    mine = our_logits(model, images)
    assert rel(mine, logits) <= 1e-5
    F.cross_entropy(logits, labels).backward()
    named = dict(model.prompt_learner.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(mine, labels), list(named.values()))
    official_grads = {k[len("prompt_learner."):]: p.grad for k, p in ref.named_parameters()
                      if p.requires_grad}
    assert set(official_grads) == set(named)
    for (name, _), g in zip(named.items(), grads):
        assert rel(g, official_grads[name]) <= 1e-5, name
        assert g.norm() > 0, name  # every prompt reaches the loss


def test_the_image_prompts_change_the_image_features(pair):
    _, model, _ = pair()
    images, _ = batch()
    prompted = normalize(model.prompt_learner.image_features(model, images))
    assert rel(prompted, model.encode_image(images)) > 1e-3  # the teacher's pass has none


def test_bad_settings_and_image_towers_are_refused():
    clip = tiny_clip()  # ViT, 1 image layer, 2 text layers
    tower = TextTower.from_model(clip)
    with pytest.raises(ValueError, match="depth 2 exceeds the 1 layers of the image tower"):
        MaPLeLearner(tower, CLASSNAMES, clip_model=clip, depth=2)
    with pytest.raises(ValueError, match="n_ctx >= 1 and depth >= 1"):
        MaPLeLearner(tower, CLASSNAMES, clip_model=clip, depth=0)
    with pytest.raises(ValueError, match=r"n_ctx \(5\) exceeds the 4 tokens"):
        MaPLeLearner(tower, CLASSNAMES, clip_model=clip, n_ctx=5, depth=1)
    import open_clip

    rn = open_clip.CLIP(embed_dim=24, vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8,
                                                      head_width=16),
                        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2,
                                      layers=2))
    with pytest.raises(UnsupportedVisionTowerError, match="ModifiedResNet"):
        MaPLeLearner(TextTower.from_model(rn), CLASSNAMES, clip_model=rn, depth=1)


def test_moved_to_keeps_the_prompts_and_the_state_dict_round_trips():
    clip = tiny_clip()
    tower = TextTower.from_model(clip)
    torch.manual_seed(0)
    learner = MaPLeLearner(tower, CLASSNAMES, clip_model=clip, depth=1, ctx_init=None)
    moved = learner.moved_to(tower, ["x", "y"])
    assert moved.classnames == ["x", "y"] and moved.eot.shape == (2,)
    for (k, a), (_, b) in zip(learner.state_dict().items(), moved.state_dict().items()):
        assert torch.equal(a, b), k
    assert set(learner.state_dict()) == {"ctx", "proj.weight", "proj.bias"}


def test_the_model_scores_the_prompted_tower_and_the_teacher_the_plain_one(official, pair):
    ref, model, weights = pair()
    images, _ = batch()
    logits, zs = model(images)
    assert rel(logits, ref(images)) <= 1e-5
    assert rel(zs, teacher_logits(official, weights, images)) <= 1e-5


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_five_steps_equal_the_official_update(official, pair, lam):
    """In float64 (see ``set_float64``).  lam 0: the official MaPLe trainer's own step (Dassl
    SGD, lr 0.0035); lam 1: official ProGrad's rule (tensor by tensor) on the official
    learner's CE and KL gradients, the teacher being zero-shot CLIP without prompts."""
    ref, model, weights = pair(torch.float64)
    compare_five_steps(official, ref, model, weights, lam, LR, official.maple.MaPLe, maple_cfg(),
                       lambda r: {k[len("prompt_learner."):]: v for k, v in r.named_parameters()
                                  if k.startswith("prompt_learner.") and v.requires_grad})
