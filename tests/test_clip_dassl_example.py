"""The Dassl drop-in example runs its loop without Dassl and does the ProGrad step."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from prograd_fast import ProGradSGD
from prograd_fast.clip import PromptedCLIP, train_step

from clip_helpers import CLASSNAMES, tiny_clip

PATH = Path(__file__).resolve().parents[1] / "examples" / "dassl_coop_prograd.py"


@pytest.fixture
def example(monkeypatch):
    spec = importlib.util.spec_from_file_location("dassl_coop_prograd", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "load_clip_to_cpu", lambda cfg: tiny_clip(seed=21))
    return mod


def _cfg(lam=1.0, prec="fp32"):
    return NS(MODEL=NS(BACKBONE=NS(NAME="ViT-B/16", PRETRAINED=None)), DATASET=NS(NAME="OxfordPets"),
              TRAINER=NS(COOP=NS(N_CTX=4, CTX_INIT="", CSC=False, CLASS_TOKEN_POSITION="end", PREC=prec),
                         PROGRAD=NS(LAMBDA=lam, T=1.0)),
              OPTIM=NS(LR=0.5, MOMENTUM=0.9, WEIGHT_DECAY=5e-4))


def test_example_trainer_matches_train_step(example):
    if example.TRAINER_REGISTRY is not None:
        pytest.skip("Dassl is installed: the stand-in base is not used")
    dm = NS(dataset=NS(classnames=CLASSNAMES))
    torch.manual_seed(0)
    trainer = example.CoOpProGradFast(_cfg(), dm)
    trainer.device = torch.device("cpu")
    assert isinstance(trainer.optim, ProGradSGD) and trainer.model.teacher.templates == [
        "a photo of a {}, a type of pet."]
    torch.manual_seed(0)
    ref = PromptedCLIP(tiny_clip(seed=21), CLASSNAMES, templates="OxfordPets", n_ctx=4,
                       dtype=torch.float32)
    ref_opt = ProGradSGD([ref.prompt_learner.ctx], lr=0.5, momentum=0.9, weight_decay=5e-4, lam=1.0)
    torch.testing.assert_close(ref.prompt_learner.ctx, trainer.model.prompt_learner.ctx)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = {"img": torch.randn(6, 3, 16, 16, generator=g),
                 "label": torch.randint(0, len(CLASSNAMES), (6,), generator=g)}
        summary = trainer.forward_backward(batch)
        train_step(ref, ref_opt, batch["img"], batch["label"], grad_mode="batched")
    assert set(summary) == {"loss", "kl", "acc"}
    assert summary["kl"] > 0
    torch.testing.assert_close(trainer.model.prompt_learner.ctx, ref.prompt_learner.ctx,
                               rtol=1e-5, atol=1e-6)


def test_example_changed_lines_are_marked():
    text = PATH.read_text()
    assert text.count("# PROGRAD-FAST") >= 8
    for name in ("def forward_backward", "def model_backward_and_update", "def build_optimizer"):
        assert name in text
