"""The two learner kinds beyond CoOp's text prompt, through PromptedCLIP, train_step and
evaluation: an image-conditioned learner (text features per image, CoCoOp's kind) and a
vision-prompted one (its own image features, MaPLe's kind; the teacher stays on the frozen,
prompt-free image tower).  Both gradients of the one batched backward equal two separate
autograd passes of an independent float64 forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_helpers import CLASSNAMES, tiny_clip
from prograd_fast import ProGradSGD
from prograd_fast.clip import PromptedCLIP, default_tokenizer, train_step
from prograd_fast.clip.learner import Learner
from prograd_fast.clip.trainer import correct_counts


class _Prompts(Learner):
    """Fixed prompts "a photo of a NAME." plus a learned offset on the first tokens."""

    def __init__(self, tower, classnames, tokenizer=None, clip_model=None, **settings) -> None:
        super().__init__()
        self.classnames = list(classnames)
        self.clip_model_seen = clip_model is not None
        tokens = (tokenizer or default_tokenizer(tower.context_length))(
            [f"a photo of a {c}." for c in self.classnames])
        eot = tower.eot_positions(tokens)
        length = int(eot.max()) + 1
        with torch.no_grad():
            self.register_buffer("embedding", tower.token_embedding(tokens[:, :length]),
                                 persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self.offset = nn.Parameter(0.1 * torch.randn(3, tower.width))

    def prompts(self, bias=None):
        emb = self.embedding
        offset = self.offset.to(emb.dtype)
        if bias is not None:  # (B, width): one prompt set per image
            offset = offset + bias[:, None, :].to(emb.dtype)
            emb = emb.expand(bias.shape[0], *emb.shape).clone()
            emb[:, :, 1:4] = emb[:, :, 1:4] + offset[:, None]
            return emb
        emb = emb.clone()
        emb[:, 1:4] = emb[:, 1:4] + offset
        return emb

    def forward(self):
        return self.prompts(), self.eot


class ImageConditioned(_Prompts):
    image_conditioned = True
    needs_clip_model = True

    def __init__(self, tower, classnames, tokenizer=None, clip_model=None, **settings) -> None:
        super().__init__(tower, classnames, tokenizer, clip_model)
        dim = clip_model.visual.output_dim
        self.meta = nn.Linear(dim, tower.width)

    def text_features(self, model, image_features=None):
        prompts = self.prompts(self.meta(image_features.to(self.meta.weight.dtype)))
        b, c = prompts.shape[:2]
        out = model.tower.encode_embeddings(prompts.flatten(0, 1), self.eot.repeat(b))
        return out.view(b, c, -1)


class VisionPrompted(_Prompts):
    vision_prompted = True
    needs_clip_model = True

    def __init__(self, tower, classnames, tokenizer=None, clip_model=None, **settings) -> None:
        super().__init__(tower, classnames, tokenizer, clip_model)
        self.pixel = nn.Parameter(0.1 * torch.randn(3, 1, 1))

    def image_features(self, model, images):
        return model.clip.encode_image(images + self.pixel.to(images.dtype))


def _images(n=5, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g, dtype=dtype),
            torch.randint(0, len(CLASSNAMES), (n,), generator=g))


def _model(kind, dtype=torch.float32, share_prefix=True):
    torch.manual_seed(0)
    return PromptedCLIP(tiny_clip(seed=1).to(dtype), CLASSNAMES, learner=kind,
                        share_prefix=share_prefix)


def _independent(model, images, labels):
    """Both losses from a forward written here: student scores on the learner's own image
    features, teacher on the frozen tower's, per-image text features where it has them."""
    clip = model.clip
    learner = model.prompt_learner
    frozen = F.normalize(clip.encode_image(images), dim=-1).detach()
    student = (F.normalize(learner.image_features(model, images), dim=-1)
               if learner.vision_prompted else frozen)
    if learner.image_conditioned:
        text = learner.text_features(model, student)
        sims = torch.einsum("bd,bcd->bc", student, F.normalize(text, dim=-1))
    else:
        text = model.tower.encode_embeddings(*learner())
        sims = student @ F.normalize(text, dim=-1).t()
    scale = clip.logit_scale.exp().detach()
    logits = scale * sims
    zs = scale * frozen @ model.teacher().to(frozen.dtype).t()
    ce = F.cross_entropy(logits, labels)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(zs, -1), log_target=True,
                  reduction="batchmean")
    return ce, kl


@pytest.mark.parametrize("kind", [ImageConditioned, VisionPrompted])
@pytest.mark.parametrize("grad_mode", ["batched", "two_pass"])
def test_both_gradients_equal_an_independent_float64_forward(kind, grad_mode):
    model = _model(kind, torch.float64)
    assert model.prompt_learner.clip_model_seen  # needs_clip_model passes the open_clip model
    images, labels = _images(dtype=torch.float64)
    params = [p for p in model.prompt_learner.parameters() if p.requires_grad]
    ce, kl = _independent(model, images, labels)
    want_d = torch.autograd.grad(ce, params, retain_graph=True)
    want_g = torch.autograd.grad(kl, params)
    opt = ProGradSGD(params, lr=0.0, lam=1.0)
    train_step(model, opt, images, labels, grad_mode=grad_mode, step=False)
    generals = opt._pending_general_grads()
    for p, d, g, got_g in zip(params, want_d, want_g, generals):
        assert torch.allclose(p.grad, d, rtol=1e-9, atol=1e-12)
        assert torch.allclose(got_g, g, rtol=1e-9, atol=1e-12)
        assert g.abs().sum() > 0 and d.abs().sum() > 0  # every tensor gets both gradients


def test_the_teacher_of_a_vision_prompted_learner_sees_the_frozen_tower():
    model = _model(VisionPrompted)
    images, _ = _images()
    with torch.no_grad():
        model.prompt_learner.pixel.fill_(0.5)
        logits, zs = model(images)
        frozen = F.normalize(model.clip.encode_image(images), dim=-1)
        prompted = F.normalize(model.clip.encode_image(images + 0.5), dim=-1)
        scale = model.clip.logit_scale.exp()
        assert torch.allclose(zs, scale * frozen @ model.teacher().t(), atol=1e-5)
        text = F.normalize(model.text_features(), dim=-1)
        assert torch.allclose(logits, scale * prompted @ text.t(), atol=1e-5)
        assert not torch.allclose(logits, scale * frozen @ text.t(), atol=1e-3)


def test_cached_features_are_refused_for_a_vision_prompted_learner():
    model = _model(VisionPrompted)
    images, labels = _images()
    feats = model.encode_image(images)
    opt = ProGradSGD([p for p in model.prompt_learner.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="prompts the image tower"):
        train_step(model, opt, feats, labels, inputs_are_features=True)
    with pytest.raises(ValueError, match="prompts the image tower"):
        correct_counts(model, [(feats, labels)], inputs_are_features=True)
    # the zero-shot teacher may be scored on cached features
    assert correct_counts(model, [(feats, labels)], zeroshot=True,
                          inputs_are_features=True)[1] == len(labels)


@pytest.mark.parametrize("kind", [ImageConditioned, VisionPrompted])
def test_evaluation_scores_what_the_forward_scores(kind):
    model = _model(kind)
    images, labels = _images(n=7)
    with torch.no_grad():
        logits, _ = model(images)
    want = int((logits.argmax(-1) == labels).sum())
    loader = [(images[:4], labels[:4]), (images[4:], labels[4:])]  # per batch
    assert correct_counts(model, loader).tolist() == [want, 7]
    if kind is ImageConditioned:  # frozen image tower: cached features are valid
        feats = model.encode_image(images)
        assert correct_counts(model, [(feats, labels)],
                              inputs_are_features=True).tolist() == [want, 7]
        with pytest.raises(ValueError, match="pass the image features"):
            model.text_features()


@pytest.mark.parametrize("kind", [ImageConditioned, VisionPrompted])
def test_five_steps_train_both_kinds_and_change_only_the_learner(kind):
    model = _model(kind)
    frozen = copy.deepcopy(model.clip.state_dict())
    before = copy.deepcopy(model.prompt_learner.state_dict())
    images, labels = _images(n=8)
    opt = ProGradSGD([p for p in model.prompt_learner.parameters() if p.requires_grad],
                     lr=0.05, momentum=0.9, lam=1.0)
    for _ in range(5):
        out = train_step(model, opt, images, labels)
    assert torch.isfinite(out.ce) and torch.isfinite(out.kl)
    assert all(torch.equal(v, model.clip.state_dict()[k]) for k, v in frozen.items())
    after = model.prompt_learner.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert opt.stats()[0]["conflict"] is not None


def test_a_saved_learner_state_is_rebuilt_on_other_classes_with_its_settings(tmp_path):
    from prograd_fast import methods
    from prograd_fast.clip.saved import load_saved_prompt, prompted_from_saved

    method = methods.register_method(methods.Method("toy-cond", "Toy", prograd=True,
                                                    learner=ImageConditioned))
    try:
        model = _model(ImageConditioned)
        with torch.no_grad():
            model.prompt_learner.offset.add_(1.0)
        prompt = {"learner_settings": {}, "templates": None}
        torch.save({"config": {"method": "toy-cond", "extra": {"prompt": prompt}},
                    "learner": model.prompt_learner.state_dict()}, tmp_path / "checkpoint.pt")
        saved = load_saved_prompt(tmp_path)
        other = prompted_from_saved(saved, tiny_clip(seed=1), CLASSNAMES[:3])
        assert other.classnames == CLASSNAMES[:3]
        for k, v in model.prompt_learner.state_dict().items():
            assert torch.equal(other.prompt_learner.state_dict()[k], v)
        bad = dict(model.prompt_learner.state_dict(), offset=torch.zeros(2, 2))
        torch.save({"config": {"method": "toy-cond", "extra": {"prompt": prompt}},
                    "learner": bad}, tmp_path / "checkpoint.pt")
        with pytest.raises(ValueError, match="does not fit the rebuilt learner .offset"):
            prompted_from_saved(load_saved_prompt(tmp_path), tiny_clip(seed=1), CLASSNAMES)
        torch.save({"config": {"method": "toy-cond", "extra": {"prompt": {}}},
                    "learner": bad}, tmp_path / "checkpoint.pt")
        with pytest.raises(ValueError, match="without its learner settings"):
            prompted_from_saved(load_saved_prompt(tmp_path), tiny_clip(seed=1), CLASSNAMES)
    finally:
        methods.METHODS.pop(method.name)
