"""Teacher, model wrapper, both gradients from one forward, training step, schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from prograd_fast import ProGradSGD, prograd_losses
from prograd_fast.amp import pending_general_grads
from prograd_fast.clip import (PromptedCLIP, ZeroShotTeacher, build_optimizer, compute_grads,
                               coop_lr_lambda, get_templates, train_step)
from prograd_fast.clip.prompt import default_tokenizer
from prograd_fast.clip.tower import TextTower

from prograd_fast.clip import train as train_mod

from clip_helpers import CLASSNAMES, tiny_clip


def _model(seed=0, dtype=torch.float32, **kw):
    clip = tiny_clip(seed).to(dtype)
    kw.setdefault("n_ctx", 4)
    return PromptedCLIP(clip, CLASSNAMES, **kw)


def _batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, len(CLASSNAMES), (n,), generator=g)


def test_templates_lookup():
    assert get_templates(None) == ["a photo of a {}."]
    assert get_templates("oxfordpets") == ["a photo of a {}, a type of pet."]
    assert get_templates(["{} texture.", "EuroSAT"]) == ["{} texture.", "a centered satellite photo of {}."]
    assert len(get_templates("openai_imagenet")) == 80
    with pytest.raises(ValueError, match="unknown template"):
        get_templates("nope")


def test_teacher_ensemble_is_mean_of_normalised_open_clip_features():
    clip = tiny_clip(seed=5)
    tower = TextTower.from_model(clip)
    templates = ["a photo of a {}.", "itap of a {}.", "{}"]
    teacher = ZeroShotTeacher(tower, CLASSNAMES, templates)
    tok = default_tokenizer(77)
    with torch.no_grad():
        feats = [F.normalize(clip.encode_text(tok([t.format(c.replace("_", " ")) for c in CLASSNAMES])).double(), dim=-1)
                 for t in templates]
    want = F.normalize(torch.stack(feats).mean(0), dim=-1)
    torch.testing.assert_close(teacher().double(), want, rtol=1e-5, atol=1e-5)
    assert not teacher().requires_grad


def test_wrapper_logits_match_open_clip_and_only_ctx_trains():
    model = _model(ctx_init="a photo of a", templates="a photo of a {}.")
    images, _ = _batch()
    logits, zs = model(images)
    # ctx_init equal to the template: student == teacher at initialisation
    torch.testing.assert_close(logits, zs, rtol=1e-5, atol=1e-4)
    tok = default_tokenizer(77)
    with torch.no_grad():
        img = F.normalize(model.clip.encode_image(images), dim=-1)
        txt = F.normalize(model.clip.encode_text(tok([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])), dim=-1)
        want = model.clip.logit_scale.exp() * img @ txt.t()
    torch.testing.assert_close(zs, want, rtol=1e-5, atol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_learner.ctx"]


@pytest.mark.parametrize("class_specific", [False, True])
def test_batched_grads_equal_two_backward_calls(class_specific):
    """One batched backward == paper-style general.backward(retain) + clone + ce.backward (float64)."""
    model = _model(seed=1, dtype=torch.float64, class_specific=class_specific)
    images, labels = _batch(6, seed=1)
    images = images.double()
    with torch.no_grad():  # move the student away from the teacher so kl has a gradient
        model.prompt_learner.ctx.add_(torch.randn_like(model.prompt_learner.ctx) * 0.5)
    ctx = model.prompt_learner.ctx
    # paper style
    logits, zs = model(images)
    ce, kl = prograd_losses(logits, zs, labels)
    kl.backward(retain_graph=True)
    general = ctx.grad.clone()
    ctx.grad = None
    ce.backward()
    domain = ctx.grad.clone()
    ctx.grad = None
    assert general.abs().max() > 0 and domain.abs().max() > 0
    train_mod._AUTO.clear()
    for mode in ("batched", "two_pass", "auto", "auto"):
        opt = build_optimizer(model, lam=1.0)
        feats = model.text_features()
        img = model.encode_image(images)
        ce2, kl2 = prograd_losses(model.logits(img, feats), model.zeroshot_logits(img), labels)
        compute_grads(opt, feats, ce2, kl2, grad_mode=mode)
        torch.testing.assert_close(ctx.grad, domain, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(pending_general_grads(opt)[0], general, rtol=1e-10, atol=1e-14)
        ctx.grad = None
        opt.state[ctx].clear()


def test_coop_lam0_equals_torch_sgd_and_prograd_differs():
    images, labels = _batch(5, seed=2)
    results = {}
    for name in ("sgd", "lam0", "prograd"):
        model = _model(seed=2)
        with torch.no_grad():
            model.prompt_learner.ctx.add_(torch.randn_like(model.prompt_learner.ctx))
        params = [model.prompt_learner.ctx]
        if name == "sgd":
            opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=5e-4)
        else:
            opt = ProGradSGD(params, lr=0.5, momentum=0.9, weight_decay=5e-4,
                             lam=0.0 if name == "lam0" else 1.0)
        for _ in range(3):
            train_step(model, opt, images, labels)
        results[name] = model.prompt_learner.ctx.detach().clone()
    torch.testing.assert_close(results["lam0"], results["sgd"], rtol=1e-6, atol=1e-6)
    assert (results["prograd"] - results["sgd"]).abs().max() > 1e-4


def test_train_step_reduces_loss_and_reports_conflicts():
    model = _model(seed=3)
    images, labels = _batch(8, seed=3)
    opt = build_optimizer(model, lr=0.2, lam=1.0)
    first = train_step(model, opt, images, labels)
    for _ in range(15):
        last = train_step(model, opt, images, labels)
    assert float(last.ce) < float(first.ce)
    stats = opt.stats()[0]
    assert stats is not None and set(stats) >= {"conflict", "cos"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_with_grad_scaler_is_finite_and_close_to_fp32(dtype):
    images, labels = _batch(4, seed=4)
    out = {}
    for amp in (None, dtype):
        model = _model(seed=4, dtype=torch.float32)
        with torch.no_grad():
            model.prompt_learner.ctx.add_(torch.randn_like(model.prompt_learner.ctx) * 0.3)
        opt = build_optimizer(model, lr=0.1, lam=1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if amp == torch.float16 else None
        for _ in range(2):
            train_step(model, opt, images, labels, autocast_dtype=amp, scaler=scaler)
        out[amp] = model.prompt_learner.ctx.detach().clone()
        if scaler is not None:
            assert scaler.get_scale() == 2.0 ** 10  # no inf found, no step skipped
    assert torch.isfinite(out[dtype]).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out[dtype], out[None], rtol=tol, atol=tol)


def test_grad_scaler_scales_both_gradients_and_unscales_them():
    images, labels = _batch(4, seed=6)
    ctxs = []
    for scale in (None, 2.0 ** 12):
        model = _model(seed=6)
        with torch.no_grad():
            model.prompt_learner.ctx.add_(torch.randn_like(model.prompt_learner.ctx) * 0.3)
        opt = build_optimizer(model, lr=0.1, lam=1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        train_step(model, opt, images, labels, scaler=scaler)
        ctxs.append(model.prompt_learner.ctx.detach().clone())
    torch.testing.assert_close(ctxs[0], ctxs[1], rtol=1e-5, atol=1e-6)


def test_coop_schedule():
    f = coop_lr_lambda(max_epoch=10, warmup_epochs=1, base_lr=0.002, warmup_lr=1e-5)
    assert f(0) == pytest.approx(1e-5 / 0.002)
    assert f(1) == 1.0  # Dassl: the cosine starts after the warm-up epoch
    assert f(2) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))
    assert f(11) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        coop_lr_lambda(0)


@pytest.mark.parametrize("max_epoch,warmup", [(10, 1), (7, 2), (50, 1)])
def test_coop_schedule_equals_dasslss_scheduler(monkeypatch, tmp_path_factory, max_epoch, warmup):
    """Dassl's own build_lr_scheduler (the vendored fork's file, run as is; only torch's
    removed ``verbose`` argument is accepted by a shim) gives the same lr every epoch."""
    import importlib.util
    import types

    import torch.optim.lr_scheduler as torch_sched
    from vendor_sources import PROMPT_ALIGN, unpack

    src = unpack(PROMPT_ALIGN, tmp_path_factory.mktemp("pa")) / "Dassl.ProGrad.pytorch/dassl/optim/lr_scheduler.py"

    class Shim(torch_sched.LRScheduler):
        def __init__(self, optimizer, last_epoch=-1, verbose=False):
            super().__init__(optimizer, last_epoch)

    monkeypatch.setattr(torch_sched, "_LRScheduler", Shim)
    spec = importlib.util.spec_from_file_location("dassl_lr_scheduler", src)
    dassl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dassl)
    cfg = types.SimpleNamespace(LR_SCHEDULER="cosine", STEPSIZE=(-1,), GAMMA=0.1, MAX_EPOCH=max_epoch,
                                WARMUP_EPOCH=warmup, WARMUP_RECOUNT=True, WARMUP_TYPE="constant",
                                WARMUP_CONS_LR=1e-5, WARMUP_MIN_LR=1e-5)
    p = torch.nn.Parameter(torch.zeros(1))
    theirs_opt = torch.optim.SGD([p], lr=0.002)
    theirs = dassl.build_lr_scheduler(theirs_opt, cfg)
    ours_opt = torch.optim.SGD([p], lr=0.002)
    ours = torch.optim.lr_scheduler.LambdaLR(ours_opt, coop_lr_lambda(max_epoch, warmup, 0.002, 1e-5))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step() before optimizer.step(): no training here
        for _ in range(max_epoch):
            assert ours_opt.param_groups[0]["lr"] == pytest.approx(theirs_opt.param_groups[0]["lr"],
                                                                   rel=1e-12, abs=1e-15)
            theirs.step()
            ours.step()


def test_bad_grad_mode():
    model = _model()
    opt = build_optimizer(model)
    feats = model.text_features()
    with pytest.raises(ValueError, match="grad_mode"):
        compute_grads(opt, feats, feats.sum(), feats.sum(), grad_mode="three")


def test_auto_grad_mode_falls_back_when_batched_backward_fails(monkeypatch):
    model = _model(seed=8, dtype=torch.float64)
    images, labels = _batch(4, seed=8)
    images = images.double()
    with torch.no_grad():
        model.prompt_learner.ctx.add_(torch.randn_like(model.prompt_learner.ctx) * 0.5)
    real_grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented")
        return real_grad(*args, **kwargs)

    out = {}
    for name in ("reference", "fallback"):
        train_mod._AUTO.clear()
        if name == "fallback":
            monkeypatch.setattr(torch.autograd, "grad", no_batching)
        opt = build_optimizer(model, lam=1.0)
        feats = model.text_features()
        img = model.encode_image(images)
        ce, kl = prograd_losses(model.logits(img, feats), model.zeroshot_logits(img), labels)
        compute_grads(opt, feats, ce, kl, grad_mode="auto")
        ctx = model.prompt_learner.ctx
        out[name] = (ctx.grad.clone(), pending_general_grads(opt)[0].clone())
        ctx.grad = None
    assert train_mod._AUTO[("cpu", torch.float64)] == "two_pass"
    for a, b in zip(out["reference"], out["fallback"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    train_mod._AUTO.clear()
