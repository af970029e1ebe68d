"""Parameter groups of ProGradSGD for learners with prompts in both towers: projected
together (one group, ProGrad's global rule) or apart (one group per tower), a head the
teacher's loss does not reach as a group with ``lam`` 0, ``granularity`` per group and
``stats()`` per group -- each against the reference math (:mod:`prograd_fast.functional`)
in float64; and how ``build_optimizer``, the trainer and the CLI choose them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from prograd_fast import ProGradSGD, available_backends
from prograd_fast.clip.learner import Learner
from prograd_fast.clip.train import build_optimizer
from prograd_fast.functional import prograd_sgd

BACKENDS = [b for b in ("torch", "cpp") if available_backends().get(b) is None]
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


class TwoTowers(Learner):
    """Parameters only: a text context, a vision prompt and a head; ``param_groups`` as a
    vision-language learner gives them (the head never projected)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.text = nn.Parameter(torch.randn(4, 6, generator=g, dtype=torch.float64))
        self.vision = nn.Parameter(torch.randn(3, 5, generator=g, dtype=torch.float64))
        self.head = nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))

    def param_groups(self, split: bool = False) -> list[dict]:
        head = {"name": "head", "params": [self.head], "lam": 0.0}
        if split:
            return [{"name": "text", "params": [self.text]},
                    {"name": "vision", "params": [self.vision]}, head]
        return [{"name": "prompt", "params": [self.text, self.vision]}, head]


class _Model:
    def __init__(self, learner):
        self.prompt_learner = learner


def _grads(seed: int = 1):
    """Domain and general gradients where the text prompt's conflict outweighs the vision
    prompt's agreement: together, the whole prompt conflicts; apart, only the text does."""
    g = torch.Generator().manual_seed(seed)
    general = {"text": torch.randn(4, 6, generator=g, dtype=torch.float64),
               "vision": torch.randn(3, 5, generator=g, dtype=torch.float64)}
    domain = {"text": -2.0 * general["text"] + 0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64),
              "vision": 0.5 * general["vision"] + 0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64),
              "head": torch.randn(7, generator=g, dtype=torch.float64)}
    return domain, general


def _load(learner, opt, domain, general):
    for name in ("text", "vision", "head"):
        getattr(learner, name).grad = domain[name].clone()
    opt.store_general_grads([general.get(n) for grp in opt.param_groups
                             for n in [_name(learner, p) for p in grp["params"]]])


def _name(learner, p) -> str:
    return next(n for n, q in learner.named_parameters() if q is p)


def _reference(split: bool, domain, general, lam=1.0, granularity=("global", "global"), steps=2):
    """The learner's parameters after ``steps`` steps of the reference, group by group."""
    ref = TwoTowers()
    bufs = {n: None for n in ("text", "vision", "head")}
    groups = ([["text"], ["vision"]] if split else [["text", "vision"]])
    stats = []
    for _ in range(steps):
        stats = []
        for names, gran in zip(groups, granularity):
            b = [bufs[n] for n in names]
            with torch.no_grad():
                stats.append(prograd_sgd([getattr(ref, n) for n in names],
                                         [domain[n] for n in names], [general[n] for n in names],
                                         b, lr=LR, momentum=MOMENTUM, weight_decay=WD, lam=lam,
                                         granularity=gran))
            bufs.update(zip(names, b))
        b = [bufs["head"]]
        with torch.no_grad():  # the head: plain SGD (no general gradient, lam 0)
            prograd_sgd([ref.head], [domain["head"]], [None], b, lr=LR, momentum=MOMENTUM,
                        weight_decay=WD, lam=0.0)
        bufs["head"] = b[0]
    return ref, stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [False, True], ids=["together", "apart"])
def test_groups_projected_together_or_apart_equal_the_reference(backend, split):
    learner = TwoTowers()
    opt = build_optimizer(_Model(learner), lr=LR, momentum=MOMENTUM, weight_decay=WD, lam=1.0,
                          split_groups=split, backend=backend)
    assert [g["name"] for g in opt.param_groups] == (["text", "vision", "head"] if split
                                                     else ["prompt", "head"])
    domain, general = _grads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head's missing general gradient warns nothing
        for _ in range(2):
            _load(learner, opt, domain, general)
            opt.step()
    ref, want = _reference(split, domain, general)
    for name in ("text", "vision", "head"):
        assert torch.allclose(getattr(learner, name), getattr(ref, name), rtol=1e-12, atol=1e-12)
    stats = opt.stats()
    for got, exp in zip(stats, want):  # the projected groups' statistics, per group
        for key in ("dot", "general_norm_sq", "domain_norm_sq", "cos", "coef"):
            assert torch.allclose(got[key], exp.as_dict()[key], rtol=1e-12, atol=1e-12), key
        assert bool(got["conflict"]) == bool(exp.conflict)
    conflicts = [bool(s["conflict"]) for s in stats]
    # together the whole prompt conflicts; apart only the text prompt; the head never
    assert conflicts == ([True, False, False] if split else [True, False])
    head = stats[-1]
    assert float(head["coef"]) == 0.0 and float(head["general_norm_sq"]) == 0.0


def test_together_and_apart_differ_when_one_tower_agrees():
    domain, general = _grads()
    together, _ = _reference(False, domain, general, steps=1)
    apart, _ = _reference(True, domain, general, steps=1)
    assert not torch.allclose(together.vision, apart.vision)  # apart leaves vision unprojected


@pytest.mark.parametrize("backend", BACKENDS)
def test_granularity_and_lam_per_group(backend):
    learner = TwoTowers()
    groups = [{"params": [learner.text], "granularity": "tensor", "lam": 0.5},
              {"params": [learner.vision], "granularity": "global"},
              {"params": [learner.head], "lam": 0.0}]
    opt = ProGradSGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WD, lam=1.0,
                     backend=backend)
    domain, general = _grads(seed=2)
    for _ in range(2):
        _load(learner, opt, domain, general)
        opt.step()
    ref = TwoTowers()
    bufs: dict = {}
    for _ in range(2):
        for name, lam, gran in (("text", 0.5, "tensor"), ("vision", 1.0, "global"),
                                ("head", 0.0, "global")):
            b = [bufs.get(name)]
            with torch.no_grad():
                want = prograd_sgd([getattr(ref, name)], [domain[name]], [general.get(name)],
                                   b, lr=LR, momentum=MOMENTUM, weight_decay=WD, lam=lam,
                                   granularity=gran)
            bufs[name] = b[0]
    for name in ("text", "vision", "head"):
        assert torch.allclose(getattr(learner, name), getattr(ref, name), rtol=1e-12, atol=1e-12)
    assert opt.stats()[0]["coef"].shape == (1,)  # "tensor": one entry per stepped tensor
    assert opt.stats()[1]["coef"].dim() == 0
    assert opt.stats()[0]["conflict"].tolist() == [True]
    assert float(opt.stats()[0]["coef"][0]) == pytest.approx(
        0.5 * float((domain["text"] * general["text"]).sum() / general["text"].pow(2).sum()))


def test_a_groups_own_lam_and_granularity_are_checked():
    learner = TwoTowers()
    with pytest.raises(ValueError, match="parameter group text: lam must be in"):
        ProGradSGD([{"name": "text", "params": [learner.text], "lam": 1.5}], lr=0.1)
    with pytest.raises(ValueError, match="parameter group 0: granularity must be one of"):
        ProGradSGD([{"params": [learner.text], "granularity": "layer"}], lr=0.1)


def test_build_optimizer_groups():
    learner = TwoTowers()
    learner.head.requires_grad_(False)  # a frozen part: its group is dropped
    opt = build_optimizer(_Model(learner), split_groups=True)
    assert [g["name"] for g in opt.param_groups] == ["text", "vision"]
    assert [g["lam"] for g in opt.param_groups] == [1.0, 1.0]
    learner.head.requires_grad_(True)
    plain = build_optimizer(_Model(learner), lam=0.0)  # CoOp: nothing projected
    assert [g["lam"] for g in plain.param_groups] == [0.0, 0.0]
    mixed = build_optimizer(_Model(learner), lam=0.8, granularity="tensor")
    assert [(g["lam"], g["granularity"]) for g in mixed.param_groups] == [
        (0.8, "tensor"), (0.0, "tensor")]
    coop = build_optimizer(_Model(nn.Linear(2, 2)))  # a learner without param_groups
    assert len(coop.param_groups) == 1 and len(coop.param_groups[0]["params"]) == 2


def test_the_training_step_stores_no_general_gradient_for_a_group_never_projected():
    from clip_helpers import CLASSNAMES, tiny_clip
    from test_learner_kinds import VisionPrompted
    from prograd_fast.clip import PromptedCLIP, train_step

    class Headed(VisionPrompted):  # its vision prompt as a part ProGrad leaves alone
        def param_groups(self, split=False):
            return [{"name": "text", "params": [self.offset]},
                    {"name": "vision", "params": [self.pixel], "lam": 0.0}]

    torch.manual_seed(0)
    model = PromptedCLIP(tiny_clip(seed=1), CLASSNAMES, learner=Headed)
    opt = build_optimizer(model, lr=0.1, momentum=0.0, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 16, 16, generator=g)
    labels = torch.randint(0, len(CLASSNAMES), (4,), generator=g)
    train_step(model, opt, images, labels, grad_mode="batched", step=False)
    [text], [vision] = opt._general_grads
    assert text is not None and vision is None
    learner = model.prompt_learner
    assert learner.offset.grad is not None and learner.pixel.grad is not None
    before = learner.pixel.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.allclose(learner.pixel, before - 0.1 * learner.pixel.grad)  # plain SGD
    assert bool(opt.stats()[1]["conflict"]) is False


def test_train_takes_a_method_config_s_prompt():
    from types import SimpleNamespace

    from prograd_fast.checks import CLIError
    from prograd_fast.cli import _train_prompt
    from prograd_fast.protocols import config as C

    C.register_method_config("toyprompt", C.MethodConfig("toy", {"n_ctx": 2, "depth": 9}))
    try:
        args = SimpleNamespace(method="toyprompt+prograd", class_specific=False,
                               class_token_position="end", kg_weight=8.0)
        assert _train_prompt(args, None, None, "DTD") == {"n_ctx": 2, "depth": 9}
        assert _train_prompt(args, 5, None, "DTD") == {"n_ctx": 5, "depth": 9}
        args.class_specific = True
        with pytest.raises(ValueError, match="--csc applies to CoOp-style prompts"):
            _train_prompt(args, None, None, "DTD")
    finally:
        C.METHOD_CONFIGS.pop("toyprompt")
    assert CLIError  # refusals reach the user as one line (cmd_train turns them into CLIError)
