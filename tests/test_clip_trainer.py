"""Trainer: resume reproduces an uninterrupted run; logs; methods."""

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from prograd_fast.clip import PromptedCLIP
from prograd_fast.clip.trainer import TrainConfig, Trainer, evaluate, transfer_context

from clip_helpers import CLASSNAMES, tiny_clip


def _data(n=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g),
                         torch.randint(0, len(CLASSNAMES), (n,), generator=g))


def _trainer(out, method="prograd", epochs=3):
    model = PromptedCLIP(tiny_clip(seed=7), CLASSNAMES, n_ctx=3)
    cfg = TrainConfig(method=method, epochs=epochs, batch_size=8, lr=0.5, warmup_lr=0.05,
                      output_dir=str(out), progress=False)
    return Trainer(model, _data(), _data(9, seed=1), cfg)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "a")
    full.fit()
    part = _trainer(tmp_path / "b")
    part.fit(stop_after=1)
    assert part.epoch == 1
    resumed = _trainer(tmp_path / "b")
    resumed.fit()
    assert resumed.epoch == 3
    torch.testing.assert_close(resumed.model.prompt_learner.ctx, full.model.prompt_learner.ctx,
                               rtol=0, atol=0)
    a = json.loads((tmp_path / "a" / "log.json").read_text())["history"]
    b = json.loads((tmp_path / "b" / "log.json").read_text())["history"]
    assert a == b
    assert [r["lr"] for r in a][0] == pytest.approx(0.05)


def test_zeroshot_method_evaluates_teacher(tmp_path):
    t = _trainer(tmp_path, method="zeroshot")
    hist = t.fit()
    loader = torch.utils.data.DataLoader(_data(9, seed=1), batch_size=4)
    assert hist == [dict(hist[0], acc=evaluate(t.model, loader, zeroshot=True))]
    assert len(hist) == 1 and hist[0]["ce"] is None


def test_transfer_context_keeps_learned_ctx():
    model = PromptedCLIP(tiny_clip(seed=7), CLASSNAMES[:3], n_ctx=3)
    with torch.no_grad():
        model.prompt_learner.ctx.normal_()
    other = transfer_context(model, CLASSNAMES[3:])
    torch.testing.assert_close(other.prompt_learner.ctx, model.prompt_learner.ctx)
    assert other.classnames == [c.replace("_", " ") for c in CLASSNAMES[3:]]
    cs = PromptedCLIP(tiny_clip(seed=7), CLASSNAMES[:3], n_ctx=3, class_specific=True)
    with pytest.raises(ValueError, match="class-specific"):
        transfer_context(cs, CLASSNAMES[3:])


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="maple2")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def test_resume_refuses_a_checkpoint_of_another_context_shape(tmp_path):
    """A checkpoint of a generic context (n_ctx, width) is not broadcast into a class-specific
    one (classes, n_ctx, width): copy_ would accept it silently."""
    _trainer(tmp_path).fit(stop_after=1)
    model = PromptedCLIP(tiny_clip(seed=7), CLASSNAMES, n_ctx=3, class_specific=True)
    cfg = TrainConfig(epochs=3, batch_size=8, output_dir=str(tmp_path), progress=False)
    other = Trainer(model, _data(), None, cfg)
    with pytest.raises(ValueError, match=r"context of shape \(3, 32\).*\(7, 3, 32\)"):
        other.maybe_resume()


def test_fp16_uses_the_scaler_that_sees_the_general_gradient(tmp_path):
    """With the stock GradScaler a step skipped because only the general gradient overflowed
    never lowers the scale (prograd_fast.amp): fp16 training could stall, skipping every step."""
    from prograd_fast.amp import ProGradGradScaler

    model = PromptedCLIP(tiny_clip(seed=7), CLASSNAMES, n_ctx=3)
    cfg = TrainConfig(epochs=1, batch_size=8, precision="fp16", progress=False)
    trainer = Trainer(model, _data(), None, cfg)
    assert isinstance(trainer.scaler, ProGradGradScaler)
    trainer.scaler.scale(torch.ones(()))  # as the first scaled loss does
    scale = trainer.scaler.get_scale()
    trainer.optimizer.zero_grad()
    trainer.model.prompt_learner.ctx.grad = torch.ones_like(trainer.model.prompt_learner.ctx)
    trainer.optimizer.store_general_grads([torch.full_like(trainer.model.prompt_learner.ctx,
                                                           float("inf"))])
    before = trainer.model.prompt_learner.ctx.detach().clone()
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    assert torch.equal(trainer.model.prompt_learner.ctx.detach(), before)  # skipped
    assert trainer.scaler.get_scale() < scale  # and the scale backs off
