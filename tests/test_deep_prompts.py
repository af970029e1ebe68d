"""Deep-prompt learners (MaPLe, IVLP, VPT) without the official code: the shared prefix is
exact for MaPLe's and IVLP's deep text prompts in float64; image towers that cannot carry
prompts are refused; the methods are registered; training through the trainer works."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip_helpers import CLASSNAMES
from prograd_fast.clip import PromptedCLIP
from prograd_fast.clip.deep_prompts import UnsupportedVisionTowerError, check_vision_tower
from prograd_fast.clip.ivlp import IVLPLearner
from prograd_fast.clip.maple import MaPLeLearner


def deep_clip(seed: int = 0, **vision) -> open_clip.CLIP:
    """A tiny open_clip model with three layers in each tower."""
    torch.manual_seed(seed)
    vision_cfg = dict(image_size=16, layers=3, width=48, patch_size=8, head_width=16)
    vision_cfg.update(vision)
    return open_clip.CLIP(embed_dim=24, vision_cfg=vision_cfg,
                          text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2,
                                        layers=3)).eval()


LEARNERS = {
    "maple": (MaPLeLearner, dict(n_ctx=2, depth=3)),
    "maple random context": (MaPLeLearner, dict(n_ctx=3, depth=2, ctx_init=None)),
    "ivlp": (IVLPLearner, dict(depth_text=3, depth_vision=2)),
    "ivlp language only": (IVLPLearner, dict(n_ctx_text=4, depth_text=2, n_ctx_vision=0,
                                             depth_vision=0)),
}


@pytest.mark.parametrize("case", list(LEARNERS))
def test_the_shared_prefix_is_exact_for_deep_text_prompts_in_float64(case):
    learner_cls, settings = LEARNERS[case]
    clip = deep_clip(seed=3).double()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(5, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, len(CLASSNAMES), (5,), generator=g)
    outs, grads = [], []
    for share in (True, False):
        torch.manual_seed(0)
        model = PromptedCLIP(clip, CLASSNAMES, learner=learner_cls, share_prefix=share, **settings)
        learner = model.prompt_learner
        if share:
            assert model.shared_prefix is not None and model.shared_prefix.applies()
            # [SOS], the context and the fixed words of "a photo of a" are shared
            assert learner.shared_prefix_length == 5 if learner.ctx_init else 1 + 3
        moves = torch.Generator().manual_seed(4)
        with torch.no_grad():  # every prompt away from its initial value, the same in both
            for p in learner.parameters():
                p.add_(torch.randn(p.shape, generator=moves, dtype=p.dtype) * 0.05)
        logits, _ = model(images)
        params = [p for p in learner.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(F.cross_entropy(logits, labels), params))
        outs.append(logits.detach())
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
        assert a.norm() > 0


def test_the_deep_text_rows_matter_on_both_paths():
    """A changed deep text prompt changes the features through the shared prefix too (the
    prefix encoder really receives them)."""
    clip = deep_clip(seed=1).double()
    torch.manual_seed(0)
    model = PromptedCLIP(clip, CLASSNAMES, learner=MaPLeLearner, n_ctx=2, depth=3)
    before = model.text_features().detach()
    with torch.no_grad():
        last = model.prompt_learner.compound_prompts_text[1]  # before the last block
        last.add_(torch.randn(last.shape, dtype=last.dtype))  # (a constant: LayerNorm drops it)
    assert not torch.allclose(model.text_features(), before)


def test_image_towers_without_a_class_token_sequence_are_refused():
    with pytest.raises(UnsupportedVisionTowerError, match="pool_type='avg'"):
        check_vision_tower(deep_clip(pool_type="avg").visual)
    with pytest.raises(UnsupportedVisionTowerError, match="attentional_pool"):
        check_vision_tower(deep_clip(attentional_pool=True, attn_pooler_heads=2,
                                     attn_pooler_queries=4).visual)
    check_vision_tower(deep_clip().visual)


def test_the_learners_train_through_the_trainer(tmp_path):
    from torch.utils.data import TensorDataset

    from prograd_fast.clip.trainer import TrainConfig, Trainer, transfer_context

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 3, 16, 16, generator=g),
                         torch.randint(0, len(CLASSNAMES), (12,), generator=g))
    for method, settings in (("maple+prograd", dict(n_ctx=2, depth=2)),
                             ("ivlp+prograd", dict(depth_text=2, depth_vision=2)),
                             ("vpt+prograd", dict(n_ctx_vision=2, depth_vision=2))):
        from prograd_fast.methods import get_method

        model = PromptedCLIP(deep_clip(), CLASSNAMES, learner=get_method(method).learner,
                             **settings)
        start = {k: v.clone() for k, v in model.prompt_learner.state_dict().items()}
        cfg = TrainConfig(method=method, epochs=1, batch_size=4, lr=0.5,
                          output_dir=str(tmp_path / method), progress=False)
        history = Trainer(model, data, data, cfg).fit()
        assert history[-1]["conflict_rate"] is not None  # ProGrad's projection ran
        moved = {k: not torch.equal(v, start[k])
                 for k, v in model.prompt_learner.state_dict().items()}
        assert all(moved.values()), moved
        state = torch.load(tmp_path / method / "checkpoint.pt", weights_only=False)
        assert set(state["learner"]) == set(start)
        # base-to-new: the learned prompts on other class names (here: the same ones)
        other = transfer_context(model, CLASSNAMES)
        assert other.prompt_learner is not model.prompt_learner
        images = data.tensors[0][:4]
        with torch.no_grad():
            assert torch.allclose(other(images)[0], model(images)[0], rtol=1e-5, atol=1e-5)


def _projected(g_d: list, g_g: list, lam: float = 1.0) -> list:
    """ProGrad's rule over the concatenation of the tensors (one group, the paper's)."""
    d, g = torch.cat([t.flatten() for t in g_d]), torch.cat([t.flatten() for t in g_g])
    dot = torch.dot(d, g)
    if dot >= 0:
        return list(g_d)
    return [a - lam * dot / g.dot(g) * b for a, b in zip(g_d, g_g)]


@pytest.mark.parametrize("split", [False, True])
def test_text_and_vision_prompts_are_projected_together_or_apart(split):
    """MaPLe's ``param_groups(split=True)``: ProGrad projects the text prompts and the vision
    projections each on their own (global granularity per group); one group projects all."""
    from prograd_fast.clip import train_step
    from prograd_fast.clip.train import build_optimizer
    from prograd_fast.losses import prograd_losses

    clip = deep_clip(seed=6).double()  # both groups' gradients conflict on this batch
    torch.manual_seed(0)
    model = PromptedCLIP(clip, CLASSNAMES, learner=MaPLeLearner, n_ctx=2, depth=3)
    learner = model.prompt_learner
    g = torch.Generator().manual_seed(6)
    images = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        labels = model(images)[1].argmin(1)  # against the teacher: the gradients conflict
    groups = learner.param_groups(split=split)
    assert [grp["name"] for grp in groups] == (["text", "vision"] if split else ["prompt"])
    params = [p for grp in groups for p in grp["params"]]
    assert {id(p) for p in params} == {id(p) for p in learner.parameters()}
    logits, zs = model(images)
    ce, kl = prograd_losses(logits, zs, labels)
    g_d = torch.autograd.grad(ce, params, retain_graph=True)
    g_g = torch.autograd.grad(kl, params)
    expected, start = [], 0
    for grp in groups:
        n = len(grp["params"])
        expected += _projected(g_d[start:start + n], g_g[start:start + n])
        start += n
    if split:  # apart is not together
        together = _projected(g_d, g_g)
        assert max(float((a - b).norm() / b.norm()) for a, b in zip(expected, together)) > 1e-3
    before = [p.detach().clone() for p in params]
    opt = build_optimizer(model, lr=0.1, momentum=0.0, weight_decay=0.0, lam=1.0,
                          split_groups=split)
    assert [grp["name"] for grp in opt.param_groups] == [grp["name"] for grp in groups]
    train_step(model, opt, images, labels)
    for p, p0, u in zip(params, before, expected):
        assert torch.allclose(p.detach(), p0 - 0.1 * u, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method,settings", [
    ("maple+prograd", dict(n_ctx=2, depth=2)),
    ("ivlp+prograd", dict(depth_text=2, depth_vision=2)),
    ("vpt+prograd", dict(n_ctx_vision=2, depth_vision=2))])
def test_a_half_precision_model_trains_fp32_prompts(method, settings):
    from prograd_fast.clip import train_step
    from prograd_fast.clip.train import build_optimizer
    from prograd_fast.methods import get_method

    model = PromptedCLIP(deep_clip().to(torch.bfloat16), CLASSNAMES,
                         learner=get_method(method).learner, **settings)
    learner = model.prompt_learner
    assert {p.dtype for p in learner.parameters()} == {torch.float32}
    start = {k: v.clone() for k, v in learner.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    out = train_step(model, build_optimizer(model, lr=0.5, lam=1.0),
                     torch.randn(4, 3, 16, 16, generator=g), torch.arange(4))
    assert torch.isfinite(out.ce) and torch.isfinite(out.kl)
    assert all(not torch.equal(v, start[k]) for k, v in learner.state_dict().items())


def test_the_prompted_image_tower_honours_grad_checkpointing(monkeypatch):
    from prograd_fast.clip import deep_prompts
    from prograd_fast.clip.deep_prompts import prompted_image_features

    calls = []
    real = deep_prompts.checkpoint
    monkeypatch.setattr(deep_prompts, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    clip = deep_clip(seed=2).double()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    shallow = torch.randn(2, 48, generator=g, dtype=torch.float64, requires_grad=True)
    deep = [torch.randn(2, 48, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2)]
    outs = []
    for checkpointing in (False, True):
        clip.visual.set_grad_checkpointing(checkpointing)
        feats = prompted_image_features(clip.visual, images, shallow, deep)
        outs.append((feats.detach(), torch.autograd.grad(feats.square().sum(), [shallow, *deep])))
    assert len(calls) == 3  # each block of the checkpointed pass
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14) and a.norm() > 0
    with torch.no_grad():  # no prompts: the plain tower
        assert torch.allclose(prompted_image_features(clip.visual, images, None),
                              clip.encode_image(images), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ls_init", [None, 0.1])
def test_the_batch_first_block_equals_open_clip_s_block_in_float64(ls_init):
    """The prompted image tower runs open_clip's plain blocks through its own contiguous
    forward (faster with grad); values and gradients are open_clip's own."""
    from open_clip.transformer import ResidualAttentionBlock

    from prograd_fast.clip.deep_prompts import _batch_first_block, _block, _plain_block

    torch.manual_seed(0)
    block = ResidualAttentionBlock(48, 6, ls_init_value=ls_init).double().eval()
    assert _plain_block(block)
    x = torch.randn(3, 11, 48, dtype=torch.float64, requires_grad=True)
    want = block(x)
    got = _batch_first_block(block, x)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    (gw,), (gg,) = (torch.autograd.grad(y, x, g) for y in (block(x), got))
    assert torch.allclose(gg, gw, rtol=1e-12, atol=1e-12)
    assert torch.equal(_block(None, block, x), got)  # the tower's path takes it
    cross = ResidualAttentionBlock(48, 6, is_cross_attention=True)
    seq_first = ResidualAttentionBlock(48, 6, batch_first=False)
    assert not _plain_block(cross) and not _plain_block(seq_first)
