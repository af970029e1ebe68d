"""IVLP: the learner equals the official IVLP code (multimodal-prompt-learning in the vendor
folder) on the same tiny weights in OpenAI layout, with vision and language prompts and
language prompts only -- logits, the gradient of each prompt, 5 steps of the official
trainer's update -- and under ProGrad equals official ProGrad's rule on the official
learner's CE and KL gradients (teacher: zero-shot CLIP without prompts); bad settings are
refused."""

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
from prograd_fast.clip.ivlp import IVLPLearner

LR = 0.0035
#: 2 + 2 context tokens (the official default layout) and language prompts only (its
#: language_only config: 4 text tokens, no vision prompts); depth 3 of 4 layers.
SETTINGS = {"vision+language": dict(n_ctx_text=2, n_ctx_vision=2, depth_text=3, depth_vision=3),
            "language only": dict(n_ctx_text=4, n_ctx_vision=0, depth_text=3, depth_vision=0)}


def ivlp_cfg(s: dict):
    ivlp = NS(N_CTX_TEXT=s["n_ctx_text"], N_CTX_VISION=s["n_ctx_vision"], CTX_INIT="a photo of a",
              PREC="fp32", PROMPT_DEPTH_TEXT=s["depth_text"], PROMPT_DEPTH_VISION=s["depth_vision"])
    return NS(TRAINER=NS(IVLP=ivlp), INPUT=NS(SIZE=(16, 16)))


def official_prompts(ref, s: dict) -> dict:
    """The official prompt parameters under our names."""
    out = {"ctx": ref.prompt_learner.ctx}
    for k in range(s["depth_text"] - 1):
        out[f"deep_text.{k}"] = ref.text_encoder.transformer.resblocks[k + 1].VPT_shallow
    if s["n_ctx_vision"]:
        visual = ref.image_encoder
        out["ctx_vision"] = visual.VPT
        for k in range(s["depth_vision"] - 1):
            out[f"deep_vision.{k}"] = visual.transformer.resblocks[k + 1].VPT_shallow
    return out


@pytest.fixture(params=list(SETTINGS))
def pair(request, official, neutralise_half_and_cuda, monkeypatch):
    """``make(dtype)``: (official CustomCLIP, our PromptedCLIP with the official initial
    prompts, the official CLIP weights, the settings), in ``dtype``."""
    s = SETTINGS[request.param]

    def make(dtype=torch.float32):
        if dtype == torch.float64:
            set_float64(official, monkeypatch)
        design = {"trainer": "IVLP", "vision_depth": s["depth_vision"],
                  "language_depth": s["depth_text"], "vision_ctx": s["n_ctx_vision"],
                  "language_ctx": s["n_ctx_text"]}
        weights = official_clip(official, design, dims=NARROW).to(dtype)
        ref = with_dtype(official.ivlp.CustomCLIP(ivlp_cfg(s), NAMES, copy_of(weights)),
                         dtype).eval()
        for name, p in ref.named_parameters():  # as the official build_model
            p.requires_grad_("prompt_learner" in name or "VPT" in name)
        clip = open_clip_of(weights).to(dtype)
        learner = IVLPLearner(TextTower.from_model(clip), NAMES, clip_model=clip, **s)
        theirs = official_prompts(ref, s)
        assert torch.equal(learner.ctx, theirs["ctx"])  # "a photo of a": the same words
        assert {k: (v.shape, v.dtype) for k, v in learner.state_dict().items()} == {
            k: (v.shape, v.dtype) for k, v in theirs.items()}
        learner.load_state_dict({k: v.detach() for k, v in theirs.items()})
        model = PromptedCLIP(clip, NAMES, learner=learner, templates=TEMPLATE)
        assert model.shared_prefix is not None  # the text prompts' prefix runs once
        return ref, model, weights, s
    return make


def test_logits_and_every_gradient_equal_the_official_ivlp(official, pair):
    ref, model, weights, s = pair()
    assert model.vision_prompted == (s["n_ctx_vision"] > 0)
    images, labels = batch()
    logits = ref(images)
    mine, zs = model(images)
    assert rel(mine, logits) <= 1e-5
    assert rel(zs, teacher_logits(official, weights, images)) <= 1e-5
    F.cross_entropy(logits, labels).backward()
    named = dict(model.prompt_learner.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(mine, labels), list(named.values()))
    theirs = official_prompts(ref, s)
    assert set(theirs) == set(named)
    for (name, _), g in zip(named.items(), grads):
        assert rel(g, theirs[name].grad) <= 1e-5, name
        assert g.norm() > 0, name


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_five_steps_equal_the_official_update(official, pair, lam):
    """In float64 (see ``set_float64``).  lam 0: the official IVLP trainer's own step (Dassl
    SGD, lr 0.0035); lam 1: official ProGrad's rule (tensor by tensor) on the official
    learner's CE and KL gradients, the teacher being zero-shot CLIP without prompts."""
    ref, model, weights, s = pair(torch.float64)
    compare_five_steps(official, ref, model, weights, lam, LR, official.ivlp.IVLP, ivlp_cfg(s),
                       lambda r: official_prompts(r, s))


def test_bad_settings_are_refused_and_moved_to_keeps_the_prompts():
    clip = tiny_clip()  # ViT, 1 image layer, 2 text layers
    tower = TextTower.from_model(clip)
    with pytest.raises(ValueError, match="depth 12 exceeds the 2 layers of the text tower"):
        IVLPLearner(tower, CLASSNAMES, clip_model=clip)
    with pytest.raises(ValueError, match="vision prompts alone: use VPT"):
        IVLPLearner(tower, CLASSNAMES, clip_model=clip, n_ctx_text=0, depth_text=0,
                    depth_vision=1)
    with pytest.raises(ValueError, match="both n_ctx and depth > 0"):
        IVLPLearner(tower, CLASSNAMES, clip_model=clip, depth_text=2, n_ctx_vision=0,
                    depth_vision=1)
    learner = IVLPLearner(tower, CLASSNAMES, clip_model=clip, depth_text=2, depth_vision=1)
    assert [g["name"] for g in learner.param_groups(split=True)] == ["text", "vision"]
    moved = learner.moved_to(tower, ["x", "y"])
    for (k, a), (_, b) in zip(learner.state_dict().items(), moved.state_dict().items()):
        assert torch.equal(a, b), k
    language = IVLPLearner(tower, CLASSNAMES, clip_model=clip, depth_text=2, n_ctx_vision=0,
                           depth_vision=0)
    assert not language.vision_prompted and len(language.param_groups(split=True)) == 1
