"""CoCoOp: the learner equals the official CoCoOp code (``trainers/cocoop.py`` of the
multimodal-prompt-learning tree in the vendor folder, on upstream Dassl) on the same tiny
weights in OpenAI layout -- logits, the gradient of the context and of each meta-net
tensor, 5 SGD steps of the official trainer's update -- and under ProGrad equals official
ProGrad's rule (the Prompt-align tree's Dassl fork) applied to the official learner's two
gradients; the per-image shared prefix is exact in float64; bad settings are refused; the
learned state moves to other class names and reloads."""

from __future__ import annotations

import copy
from collections import OrderedDict
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import open_clip
from clip_helpers import CLASSNAMES, tiny_clip
from prograd_fast.clip import PromptedCLIP, train_step
from prograd_fast.clip.cocoop import CoCoOpLearner
from prograd_fast.clip.tower import TextTower
from prograd_fast.clip.train import build_optimizer
from prograd_fast.methods import get_method
from vendor_sources import DASSL, PROMPT_ALIGN, import_tree, rel, unpack, vendor_dir

MPL = "multimodal-prompt-learning-69bce21.tar.gz"
CONFIG = "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml"
NAMES = ["banded", "blotchy", "braided", "golden retriever", "sea_lion"]
TEMPLATE = "a photo of a {}."  # the zero-shot teacher's prompt, on both sides
#: Tiny CLIP in OpenAI layout (the official ``CLIP`` takes 64-wide heads); image features of
#: width 64 give the meta-net 4 hidden units.
TINY = dict(embed_dim=64, image_resolution=16, vision_layers=1, vision_width=64,
            vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
            transformer_heads=1, transformer_layers=2)
DESIGN = {"trainer": "CoCoOp", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0,
          "language_ctx": 0}  # what the official load_clip_to_cpu builds CoCoOp's CLIP with
LEARNED = ["ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
           "meta_net.linear2.bias"]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Official CoCoOp (its trainer, ``clip`` and upstream Dassl's optimiser builder), its
    config's OPTIM section, and official ProGrad's loss and update rule (Prompt-align)."""
    vendor = vendor_dir()
    for archive in (MPL, DASSL, PROMPT_ALIGN):
        if not (vendor / archive).is_file():
            pytest.skip(f"{archive} not found in {vendor}")
    base = tmp_path_factory.getbasetemp()
    mpl = unpack(MPL, base / "multimodal_prompt_learning")
    dassl = unpack(DASSL, base / "vendor" / "dassl")
    align = unpack(PROMPT_ALIGN, base / "vendor" / "prompt_align")
    out = import_tree([mpl, dassl], dict(cocoop="trainers.cocoop", model="clip.model",
                                          clip="clip.clip", optim="dassl.optim",
                                          config="dassl.config"))
    prograd = import_tree([align / "ProGrad.public", align / "Dassl.ProGrad.pytorch"],
                           dict(trainer="trainers.prograd", engine="dassl.engine.trainer"))
    out.prograd, out.engine = prograd.trainer, prograd.engine
    out.optim_cfg = yaml.safe_load((mpl / CONFIG).read_text())["OPTIM"]
    return out


def official_cfg():
    # PREC fp32: the official learner then calls neither .half() nor .cuda() (its trainer
    # moves the model to its device, not run here), so nothing needs neutralising
    return NS(TRAINER=NS(COCOOP=NS(N_CTX=4, CTX_INIT="a photo of a", PREC="fp32")),
              INPUT=NS(SIZE=(16, 16)))


def dassl_optim_cfg(official):
    """Upstream Dassl's OPTIM defaults with the CoCoOp config's optimiser and learning rate."""
    cfg = official.config.get_cfg_default().OPTIM.clone()
    cfg.defrost()
    cfg.NAME, cfg.LR = official.optim_cfg["NAME"], official.optim_cfg["LR"]
    return cfg


def make_pair(official, monkeypatch, dtype=torch.float32):
    """(official CustomCLIP, prograd_fast's model factory, images, labels, the official CLIP)
    on the same weights in ``dtype``, ours started from the official learner's initial
    state."""
    if dtype == torch.float64:
        # OpenAI's LayerNorm computes in float32 (for its fp16 models; a no-op in fp32): in
        # float64 it would round every layer to float32, so run it in the input's dtype
        monkeypatch.setattr(official.model.LayerNorm, "forward", nn.LayerNorm.forward)
    torch.manual_seed(0)
    weights = official.model.CLIP(**TINY, design_details=DESIGN).to(dtype).eval()
    ref = official.cocoop.CustomCLIP(official_cfg(), NAMES, weights).to(dtype)
    for name, p in ref.named_parameters():  # as the official build_model
        p.requires_grad_("prompt_learner" in name)
    model_cfg = dict(embed_dim=64, quick_gelu=True,
                     vision_cfg=dict(image_size=16, layers=1, width=64, patch_size=8, head_width=64),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    clip = open_clip.CLIP(**model_cfg).eval()
    missing, unexpected = clip.load_state_dict(weights.state_dict(), strict=False)
    assert not unexpected and all("attn_mask" in k or "logit_bias" in k for k in missing)
    clip = clip.to(dtype)
    start = copy.deepcopy(ref.prompt_learner.state_dict())  # an official checkpoint's keys

    def ours(share_prefix=True):
        c = copy.deepcopy(clip)
        learner = CoCoOpLearner(TextTower.from_model(c), NAMES, clip_model=c)
        assert torch.equal(learner.ctx, ref.prompt_learner.ctx)  # "a photo of a", as theirs
        learner.load_state_dict(start)  # the official meta-net's draw; token buffers ignored
        return PromptedCLIP(c, NAMES, learner=learner, templates=[TEMPLATE],
                            share_prefix=share_prefix)

    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 16, 16, generator=g).to(dtype)
    labels = torch.randint(0, len(NAMES), (3,), generator=g)
    return ref, ours, images, labels, weights


@pytest.fixture
def pair(official, monkeypatch):
    return make_pair(official, monkeypatch)


def official_logits(ref, images):
    ref.prompt_learner.eval()  # the official model returns its loss in training mode
    try:
        return ref(images)
    finally:
        ref.prompt_learner.train()


def official_teacher(official, weights, images):
    """Zero-shot CLIP's logits with the official code: the same frozen image features."""
    with torch.no_grad():
        tokens = torch.cat([official.clip.tokenize(TEMPLATE.format(n.replace("_", " ")))
                            for n in NAMES])
        text = F.normalize(weights.encode_text(tokens), dim=-1)
        feats = F.normalize(weights.encode_image(images), dim=-1)
        return weights.logit_scale.exp() * feats @ text.t()


def grads(module: nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("share_prefix", [True, False])
def test_logits_and_every_gradient_equal_the_official_learner(pair, share_prefix):
    ref, ours, images, labels, _ = pair
    model = ours(share_prefix)
    assert (model.shared_prefix is not None) == share_prefix
    logits = official_logits(ref, images)
    mine, _ = model(images)
    assert mine.shape == (len(images), len(NAMES))
    assert rel(mine, logits) <= 1e-5
    ref.train()
    ref(images, labels).backward()  # the official training forward: its cross-entropy
    opt = build_optimizer(model, lam=0.0)
    train_step(model, opt, images, labels, step=False)
    theirs, got = grads(ref.prompt_learner), grads(model.prompt_learner)
    assert sorted(got) == sorted(theirs) == sorted(LEARNED)
    for name in LEARNED:
        assert theirs[name].norm() > 0, name  # every tensor is reached (no dead meta-net)
        assert rel(got[name], theirs[name]) <= 1e-5, name


def official_steps(official, ref, images, labels, weights, lam, steps=5):
    """``steps`` updates of the official trainers, on Dassl's SGD from the CoCoOp config:
    lam 0: CoCoOp's own ``forward_backward``; lam > 0: official ProGrad's loss (T = 1) and
    ``prograd_backward_and_update`` on the official learner's cross-entropy and KL to
    zero-shot CLIP.  Returns how many (step, tensor) pairs had conflicting gradients."""
    optim = official.optim.build_optimizer(ref.prompt_learner, dassl_optim_cfg(official))
    if lam == 0:
        trainer = official.cocoop.CoCoOp.__new__(official.cocoop.CoCoOp)
        trainer.model, trainer.optim, trainer.scaler = ref, optim, None
        trainer.cfg, trainer.device = official_cfg(), torch.device("cpu")
        trainer.batch_idx, trainer.num_batches = 0, steps + 1  # no lr-scheduler update
        ref.train()
        for _ in range(steps):
            trainer.forward_backward({"img": images, "label": labels})
        return 0
    trainer = official.engine.SimpleTrainer.__new__(official.engine.SimpleTrainer)
    trainer._models = OrderedDict(prompt_learner=ref.prompt_learner)
    trainer._optims = OrderedDict(prompt_learner=optim)
    criterion = official.prograd.ProGradLoss(T=1.0)
    teacher = official_teacher(official, weights, images)
    params, conflicts = list(ref.prompt_learner.parameters()), 0
    for _ in range(steps):
        ce, kl = criterion(official_logits(ref, images), teacher, labels)
        g_d = torch.autograd.grad(ce, params, retain_graph=True)
        g_g = torch.autograd.grad(kl, params, retain_graph=True)
        conflicts += sum(int(torch.dot(a.flatten(), b.flatten()) < 0) for a, b in zip(g_d, g_g))
        trainer.prograd_backward_and_update(ce, kl, lambda_=lam)
    return conflicts


@pytest.mark.parametrize("lam", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_five_steps_equal_the_official_update(official, monkeypatch, lam, dtype):
    """fp32: the learned tensors after 5 steps equal to 1e-5; float64: the 5 steps' updates
    themselves to 1e-10 (in fp32 the updates of the meta-net's weights carry ~1e-5 of
    rounding from the differently ordered sums; in float64 they agree to ~1e-14)."""
    ref, ours, images, labels, weights = make_pair(official, monkeypatch, dtype)
    model = ours()
    cfg = dassl_optim_cfg(official)
    # official ProGrad projects each parameter tensor on its own: granularity "tensor"
    opt = build_optimizer(model, lr=cfg.LR, momentum=cfg.MOMENTUM, weight_decay=cfg.WEIGHT_DECAY,
                          lam=lam, granularity="tensor")
    for _ in range(5):
        train_step(model, opt, images, labels)
    start = ours().prompt_learner.state_dict()
    conflicts = official_steps(official, ref, images, labels, weights, lam)
    if lam > 0:
        assert conflicts > 0  # the projection was exercised
    got, theirs = model.prompt_learner.state_dict(), ref.prompt_learner.state_dict()
    for name in LEARNED:
        assert not torch.equal(got[name], start[name]), name  # it was trained
        if dtype == torch.float32:
            assert rel(got[name], theirs[name]) <= 1e-5, name
        else:
            assert rel(got[name] - start[name], theirs[name] - start[name]) <= 1e-10, name


def test_the_teachers_agree(official, pair):
    """prograd_fast's zero-shot teacher is the official CLIP's on the same image features."""
    ref, ours, images, _, weights = pair
    _, zs = ours()(images)
    assert rel(zs, official_teacher(official, weights, images)) <= 1e-5


def test_a_random_context_and_the_meta_net_are_drawn_as_officially(official, pair):
    """The same seed gives the official learner's random context and meta-net (N_CTX 4,
    no CTX_INIT): they are drawn in the same order."""
    _, ours, _, _, weights = pair
    cfg = official_cfg()
    cfg.TRAINER.COCOOP.CTX_INIT = ""
    torch.manual_seed(5)
    ref = official.cocoop.CustomCLIP(cfg, NAMES, weights)
    clip = ours().clip
    torch.manual_seed(5)
    learner = CoCoOpLearner(TextTower.from_model(clip), NAMES, clip_model=clip, ctx_init=None)
    theirs = ref.prompt_learner.state_dict()
    for name, value in learner.state_dict().items():
        assert torch.equal(value, theirs[name]), name


def _float64_model(share: bool, **settings) -> PromptedCLIP:
    clip = tiny_clip(seed=3).double()
    torch.manual_seed(0)
    learner = CoCoOpLearner(TextTower.from_model(clip), CLASSNAMES, clip_model=clip, **settings)
    model = PromptedCLIP(clip, CLASSNAMES, learner=learner)
    assert model.shared_prefix is not None and model.shared_prefix.applies()
    model.shared_prefix = model.shared_prefix if share else None
    return model


@pytest.mark.parametrize("settings", [{}, {"ctx_init": None, "n_ctx": 3}])
def test_the_per_image_shared_prefix_is_exact_in_float64(settings):
    g = torch.Generator().manual_seed(2)
    feats = F.normalize(torch.randn(3, 24, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, len(CLASSNAMES), (3,), generator=g)
    grads_, texts = [], []
    for share in (True, False):
        model = _float64_model(share, **settings)
        learner = model.prompt_learner
        draw = torch.Generator().manual_seed(3)
        with torch.no_grad():  # a meta-net bias of the context's size, different per image
            for p in learner.meta_net.parameters():
                p.normal_(0.0, 1.0, generator=draw)
            learner.meta_net.linear1.bias.fill_(2.0)  # a live hidden unit
        text = learner.text_features(model, feats)
        assert text.shape == (3, len(CLASSNAMES), 24)
        logits = model.logit_scale * torch.einsum("bd,bcd->bc", feats, F.normalize(text, dim=-1))
        loss = F.cross_entropy(logits, labels)
        grads_.append(torch.autograd.grad(loss, list(learner.parameters())))
        texts.append(text.detach())
    assert (texts[0][0] - texts[0][1]).abs().max() > 1e-2  # the images' prompts differ
    assert torch.allclose(texts[0], texts[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads_):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("settings, match", [
    ({"n_ctx": 8}, "n_ctx \\(8\\) differs from the 4 words"),
    ({"ctx_init": None, "n_ctx": 0}, "n_ctx must be >= 1"),
    ({"class_specific": True}, "one generic context"),
    ({"class_token_position": "middle"}, "class_token_position 'end'"),
    ({"image_dim": 8}, "must be >= 16"),
])
def test_bad_settings_are_refused(settings, match):
    clip = tiny_clip()
    with pytest.raises(ValueError, match=match) as err:
        CoCoOpLearner(TextTower.from_model(clip), CLASSNAMES, clip_model=clip, **settings)
    assert "\n" not in str(err.value)


def test_text_features_need_the_images():
    clip = tiny_clip()
    model = PromptedCLIP(clip, CLASSNAMES, learner=CoCoOpLearner(
        TextTower.from_model(clip), CLASSNAMES, clip_model=clip))
    with pytest.raises(ValueError, match="depend on the image"):
        model.prompt_learner.text_features(model, None)
    with pytest.raises(ValueError, match=r"\(B, 24\)"):
        model.prompt_learner.text_features(model, torch.zeros(2, 5))


def test_the_official_settings_and_the_meta_net():
    clip = tiny_clip()
    learner = CoCoOpLearner(TextTower.from_model(clip), CLASSNAMES, clip_model=clip)
    assert learner.image_conditioned and learner.needs_clip_model
    assert learner.n_ctx == 4 and learner.ctx_init == "a photo of a"
    assert learner.shared_prefix_length == 5  # [SOT] and the 4 context vectors
    net = learner.meta_net
    assert (net.linear1.in_features, net.linear1.out_features) == (24, 24 // 16)
    assert net.linear2.out_features == 32  # the text width
    assert sorted(learner.state_dict()) == sorted(LEARNED)
    # a comma makes one token more than words: the words count the context, as officially
    comma = CoCoOpLearner(TextTower.from_model(clip), CLASSNAMES, clip_model=clip,
                          ctx_init="a photo, of a")
    assert comma.n_ctx == 4 and comma.prompt_prefix == "a photo, of a"


def test_moved_to_keeps_the_context_and_meta_net_and_a_checkpoint_reloads():
    clip = tiny_clip()
    tower = TextTower.from_model(clip)
    torch.manual_seed(0)
    learner = CoCoOpLearner(tower, CLASSNAMES, clip_model=clip, ctx_init=None)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(torch.randn_like(p))  # trained
    feats = F.normalize(torch.randn(2, 24), dim=-1)
    moved = learner.moved_to(tower, ["lion", "tiger"])
    assert isinstance(moved, CoCoOpLearner) and moved.classnames == ["lion", "tiger"]
    for (name, a), b in zip(learner.state_dict().items(), moved.state_dict().values()):
        assert torch.equal(a, b), name
    model = PromptedCLIP(clip, ["lion", "tiger"], learner=moved)
    assert model.prompt_learner.text_features(model, feats).shape == (2, 2, 24)
    # a trainer checkpoint (the learner's state_dict) resumes the same learner
    torch.manual_seed(1)
    again = CoCoOpLearner(tower, CLASSNAMES, clip_model=clip, ctx_init=None)
    again.load_state_dict({k: v.clone() for k, v in learner.state_dict().items()})
    base = PromptedCLIP(clip, CLASSNAMES, learner=learner, share_prefix=False)
    assert torch.equal(learner.text_features(base, feats), again.text_features(base, feats))


def test_the_registry_knows_cocoop():
    for name in ("cocoop", "cocoop+prograd"):
        method = get_method(name)
        assert method.learner.path == "prograd_fast.clip.cocoop:CoCoOpLearner"
        assert method.prograd == (name == "cocoop+prograd") and not method.in_default_grid
    # PromptedCLIP gives the registered learner the open_clip model (the image feature width)
    model = PromptedCLIP(tiny_clip(), CLASSNAMES, learner=get_method("cocoop").learner)
    assert isinstance(model.prompt_learner, CoCoOpLearner) and model.image_conditioned
    assert model.prompt_learner.image_dim == 24


def _trainer(out, epochs=2):
    from torch.utils.data import TensorDataset

    from prograd_fast.clip.trainer import TrainConfig, Trainer

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        return TensorDataset(torch.randn(n, 3, 16, 16, generator=g),
                             torch.randint(0, len(CLASSNAMES), (n,), generator=g))

    model = PromptedCLIP(tiny_clip(seed=7), CLASSNAMES, learner=get_method("cocoop").learner)
    prompt = {"learner_settings": {"ctx_init": "a photo of a"}, "templates": None}
    cfg = TrainConfig(method="cocoop+prograd", epochs=epochs, batch_size=4, lr=0.5,
                      warmup_lr=0.05, output_dir=str(out), progress=False, plot=False,
                      extra={"prompt": prompt})
    return Trainer(model, data(8, 0), data(4, 1), cfg)


def test_the_trainer_checkpoints_and_resumes_cocoop(tmp_path):
    full = _trainer(tmp_path / "a")
    history = full.fit()
    assert history[-1]["acc"] is not None  # evaluated with per-image text features
    part = _trainer(tmp_path / "b")
    part.fit(stop_after=1)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert sorted(state["learner"]) == sorted(LEARNED)
    resumed = _trainer(tmp_path / "b")
    resumed.fit()
    for name, value in full.model.prompt_learner.state_dict().items():
        assert torch.equal(resumed.model.prompt_learner.state_dict()[name], value), name


def test_a_saved_cocoop_run_is_rebuilt_on_new_classes(tmp_path):
    from prograd_fast.clip.saved import load_saved_prompt, prompted_from_saved

    trained = _trainer(tmp_path, epochs=1)
    trained.fit()
    learner = trained.model.prompt_learner
    saved = prompted_from_saved(load_saved_prompt(tmp_path), tiny_clip(seed=7), CLASSNAMES[:3])
    moved = learner.moved_to(trained.model.tower, CLASSNAMES[:3])
    feats = F.normalize(torch.randn(2, 24), dim=-1)
    with torch.no_grad():
        assert torch.equal(saved.text_features(feats), moved.text_features(saved, feats))
