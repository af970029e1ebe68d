"""The official MaPLe / IVLP / VPT code (multimodal-prompt-learning in the vendor folder) for
the deep-prompt exactness tests: the trees imported once, tiny weights in OpenAI layout, the
same weights as an open_clip model, the official updates (its trainers' SGD step, official
ProGrad's rule) and the zero-shot teacher of the official tree (no prompts).

The official code casts prompts with ``.half()`` and moves tensors with ``.cuda()``: both
are made no-ops while a test runs (:func:`neutralise_half_and_cuda`), so that it runs in fp32
on the CPU; prograd_fast never casts the prompts to fp16 itself (they follow the model's
dtype).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import open_clip
from vendor_sources import PROMPT_ALIGN, import_tree, rel, unpack, vendor_dir  # noqa: F401 (rel)

MPL = "multimodal-prompt-learning-69bce21.tar.gz"
DASSL = "Dassl.pytorch-c61a1b5.tar.gz"
NAMES = ["banded", "blotchy", "braided", "bubbly", "bumpy"]
TEMPLATE = "a photo of a {}."  # the teacher's prompt in these tests
#: Tiny CLIP in OpenAI layout with ViT-B/16's widths (MaPLe hard-codes 512 / 768): four
#: layers so that prompts stop before the last one at depth 3.
TINY = dict(embed_dim=24, image_resolution=16, vision_layers=4, vision_width=768,
            vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=512,
            transformer_heads=8, transformer_layers=4)
#: The same with narrow towers, for the learners whose widths the official code does not fix
#: (IVLP, VPT): faster.
NARROW = dict(TINY, vision_width=128, transformer_width=128, transformer_heads=2)


@pytest.fixture(scope="session")
def official(tmp_path_factory):
    """The official trainers, their ``clip``, upstream Dassl's optimiser builder and config,
    and the ProGrad Dassl fork's trainer (official ProGrad's rule)."""
    vendor = vendor_dir()
    for archive in (MPL, DASSL, PROMPT_ALIGN):
        if not (vendor / archive).is_file():
            pytest.skip(f"{archive} not found in {vendor}")
    base = tmp_path_factory.getbasetemp() / "deep_official"
    mpl = unpack(MPL, base / "mpl")
    dassl = unpack(DASSL, base / "dassl")
    fork = unpack(PROMPT_ALIGN, base / "prompt_align") / "Dassl.ProGrad.pytorch"
    out = import_tree([mpl, dassl], dict(
        maple="trainers.maple", ivlp="trainers.independentVL", vpt="trainers.vpt",
        model="clip.model", clip="clip.clip", optim="dassl.optim", config="dassl.config"))
    out.engine = import_tree([fork], dict(engine="dassl.engine.trainer")).engine
    return out


@pytest.fixture
def neutralise_half_and_cuda(monkeypatch):
    """The official code's ``.half()`` on prompts and ``.cuda()`` become no-ops (fp32, CPU)."""
    monkeypatch.setattr(torch.Tensor, "half", lambda self, *a, **k: self)
    monkeypatch.setattr(nn.Module, "half", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **k: self)


def set_float64(official, monkeypatch) -> None:
    """Let the official code run in float64: its ``LayerNorm`` computes in fp32 by design
    (for fp16 models) and returns the input's dtype; here it computes in the input's dtype
    (unchanged in fp32).  Five fp32 training steps differ by fp32 rounding alone: both the
    official code and ours are ~3e-6 (relative) from the float64 gradient of these tiny
    models, so the step comparisons run in float64, where the two must agree to 1e-9."""
    monkeypatch.setattr(official.model.LayerNorm, "forward", nn.LayerNorm.forward)


def with_dtype(ref: nn.Module, dtype: torch.dtype) -> nn.Module:
    """An official ``CustomCLIP`` in ``dtype``: its parameters and the dtype it casts to."""
    ref = ref.to(dtype)
    ref.dtype = dtype
    if hasattr(ref, "text_encoder"):
        ref.text_encoder.dtype = dtype
    return ref


def official_clip(official, design: dict, seed: int = 0, dims: dict = TINY) -> nn.Module:
    """The official ``CLIP`` of ``design`` (its trainer's design_details) with ``dims``, fp32,
    on weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return official.model.CLIP(**dims, design_details=design).float().eval()


def dims_of(weights: nn.Module) -> dict:
    """The ``CLIP`` arguments of an official model built from :data:`TINY`-like dims."""
    text = weights.ln_final.weight.shape[0]
    return dict(TINY, vision_width=weights.visual.conv1.weight.shape[0], transformer_width=text,
                transformer_heads=text // 64)


PLAIN = {"trainer": "CoOp", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0,
         "language_ctx": 0}


def open_clip_of(weights: nn.Module) -> open_clip.CLIP:
    """The official model's frozen weights (prompts left out) as an open_clip ``CLIP``."""
    d = dims_of(weights)
    cfg = dict(embed_dim=d["embed_dim"], quick_gelu=True,
               vision_cfg=dict(image_size=16, layers=d["vision_layers"], width=d["vision_width"],
                               patch_size=8, head_width=64),
               text_cfg=dict(context_length=77, vocab_size=49408, width=d["transformer_width"],
                             heads=d["transformer_heads"], layers=d["transformer_layers"]))
    model = open_clip.CLIP(**cfg).eval()
    state = {k: v for k, v in weights.state_dict().items() if "VPT" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("attn_mask" in k or "logit_bias" in k for k in missing)
    return model


def batch(n: int = 4, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g).to(dtype),
            torch.randint(0, len(NAMES), (n,), generator=g))


def teacher_logits(official, weights: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Zero-shot CLIP with no prompts, in the official tree: its plain CLIP on the same
    weights, the teacher template, no grad (the frozen image pass ProGrad adds)."""
    dtype = weights.logit_scale.dtype
    plain = official_clip(official, PLAIN, dims=dims_of(weights)).to(dtype)
    plain.load_state_dict({k: v for k, v in weights.state_dict().items() if "VPT" not in k})
    with torch.no_grad():
        img = F.normalize(plain.encode_image(images.to(dtype)), dim=-1)
        txt = F.normalize(plain.encode_text(official.clip.tokenize(
            [TEMPLATE.format(n) for n in NAMES])), dim=-1)
        return plain.logit_scale.exp() * img @ txt.t()


def soft_ce(logits: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
    """Official ProGrad's KL term (its soft-target cross-entropy, T = 1)."""
    return -(F.softmax(zs, 1) * F.log_softmax(logits, 1)).sum(1).mean()


def optim_cfg(official, lr: float):
    cfg = official.config.get_cfg_default().OPTIM.clone()
    cfg.defrost()
    cfg.NAME, cfg.LR = "sgd", lr
    return cfg


def official_prograd_steps(official, forward, params: list, images, labels, zs, lr: float,
                           lam: float, steps: int = 5) -> int:
    """``steps`` updates of official ProGrad's rule (the Dassl fork's
    ``prograd_backward_and_update``, Dassl's SGD) on the CE of ``forward(images)`` and the KL
    to the teacher's logits ``zs``; returns how many tensors' gradients conflicted in the first
    step."""
    plist = nn.ParameterList(params)
    optim = official.optim.build_optimizer(plist, optim_cfg(official, lr))
    trainer = official.engine.SimpleTrainer.__new__(official.engine.SimpleTrainer)
    trainer._models = OrderedDict(learner=plist)
    trainer._optims = OrderedDict(learner=optim)
    conflicts = 0
    for step in range(steps):
        logits = forward(images)
        ce, kl = F.cross_entropy(logits, labels), soft_ce(logits, zs)
        if step == 0:  # the first step's conflicts (later ones follow from the same batch)
            g_d = torch.autograd.grad(ce, params, retain_graph=True)
            g_g = torch.autograd.grad(kl, params, retain_graph=True)
            conflicts = sum(int(torch.dot(a.flatten(), b.flatten()) < 0) for a, b in zip(g_d, g_g))
        trainer.prograd_backward_and_update(ce, kl, lambda_=lam)
    return conflicts


def official_trainer_steps(trainer_cls, model: nn.Module, cfg, images, labels, lr: float,
                           official, steps: int = 5) -> None:
    """``steps`` calls of the official trainer's ``forward_backward`` (its SGD update on the
    whole model, as ``build_model`` builds it with upstream Dassl)."""
    trainer = trainer_cls.__new__(trainer_cls)
    trainer.cfg, trainer.model, trainer.scaler = cfg, model, None
    trainer.optim = official.optim.build_optimizer(model, optim_cfg(official, lr))
    trainer.device = torch.device("cpu")
    trainer.batch_idx, trainer.num_batches = 0, 10 ** 6  # no lr update within the steps
    model.train()
    for _ in range(steps):
        trainer.forward_backward({"img": images, "label": labels})
    model.eval()


def copy_of(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def compare_five_steps(official, ref: nn.Module, model, weights: nn.Module, lam: float, lr: float,
                       trainer_cls, cfg, official_prompts) -> None:
    """5 steps of prograd_fast's ``train_step`` (float64, ``granularity="tensor"`` as official
    ProGrad) against 5 of the official trainer's own update (``lam == 0``) or of official
    ProGrad's rule on the official learner's CE and KL gradients (the teacher: zero-shot CLIP
    without prompts), labels chosen against the teacher so that the gradients conflict.
    ``official_prompts(ref)`` gives the official learned tensors under our names; each one's
    change must equal ours to 1e-9."""
    from prograd_fast.clip import train_step
    from prograd_fast.clip.train import build_optimizer

    images, _ = batch(dtype=torch.float64)
    zs = teacher_logits(official, weights, images)
    labels = zs.argmin(1)
    start = {k: v.clone() for k, v in model.prompt_learner.state_dict().items()}
    opt = build_optimizer(model, lr=lr, lam=lam, granularity="tensor")
    for _ in range(5):
        train_step(model, opt, images, labels)
    if lam == 0:
        official_trainer_steps(trainer_cls, ref, cfg, images, labels, lr, official)
    else:
        params = list(official_prompts(ref).values())
        conflicts = official_prograd_steps(official, ref, params, images, labels, zs, lr, lam)
        assert conflicts > 0  # the projection was exercised
    theirs = official_prompts(ref)
    for name, p in model.prompt_learner.state_dict().items():
        assert rel(p - start[name], theirs[name].detach() - start[name]) <= 1e-9, name
