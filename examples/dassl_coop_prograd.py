"""ProGrad on open_clip as a Dassl trainer: a drop-in for CoOp's ``trainers/coop.py``.

Copy this file into a CoOp/ProGrad checkout (``trainers/``), import it in ``train.py`` and
run with ``--trainer CoOpProGradFast``.  It mirrors Dassl's CoOp trainer method by method
(``build_model``, ``build_optimizer``, ``forward_backward``, ``model_backward_and_update``);
every line that differs from CoOp is marked ``# PROGRAD-FAST``.  What changes:

- the model is an open_clip CLIP wrapped in :class:`prograd_fast.clip.PromptedCLIP`
  (learned prompts cut after the longest end-of-text token, zero-shot teacher features
  computed once, one image pass for student and teacher);
- the optimiser is :class:`prograd_fast.ProGradSGD` (``lam=0`` is plain CoOp);
- the loss is ``prograd_losses`` (cross-entropy + KL to the zero-shot teacher) and the
  backward fills both gradients with :func:`prograd_fast.backward`;
- no ``.item()`` in the step except Dassl's own logging of the loss summary.

Config keys used (CoOp's, plus ``TRAINER.PROGRAD``): ``MODEL.BACKBONE.NAME`` (CoOp's
"ViT-B/16" or an open_clip name), ``MODEL.BACKBONE.PRETRAINED`` (default "openai"),
``TRAINER.COOP.{N_CTX, CTX_INIT, CSC, CLASS_TOKEN_POSITION, PREC}``, ``OPTIM.{LR,
MOMENTUM, WEIGHT_DECAY}``, ``TRAINER.PROGRAD.{LAMBDA, T}``, ``DATASET.NAME`` (the teacher's
template).  Without Dassl installed, a minimal stand-in base class lets the loop run
(``tests/test_clip_dassl_example.py``).
"""

from __future__ import annotations

import torch

import prograd_fast  # PROGRAD-FAST
from prograd_fast.clip import PromptedCLIP, TEMPLATES  # PROGRAD-FAST

try:  # the real thing
    from dassl.engine import TRAINER_REGISTRY, TrainerX
    from dassl.metrics import compute_accuracy
    from dassl.optim import build_lr_scheduler
except ImportError:  # a minimal stand-in, enough to run forward_backward without Dassl
    TRAINER_REGISTRY = None

    class TrainerX:  # noqa: D101 - mimics dassl.engine.TrainerX's surface used here
        def __init__(self, cfg, dm):
            self.cfg, self.dm = cfg, dm
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self._optims, self.batch_idx, self.num_batches = {}, 0, 1
            self.build_model()

        def register_model(self, name, model, optim=None, sched=None):
            self._optims[name] = (optim, sched)

        def model_zero_grad(self, names=None):
            for optim, _ in self._optims.values():
                optim.zero_grad(set_to_none=True)

        def update_lr(self, names=None):
            for _, sched in self._optims.values():
                if sched is not None:
                    sched.step()

    def compute_accuracy(output, target, topk=(1,)):
        return [(output.argmax(1) == target).float().mean() * 100]

    def build_lr_scheduler(optimizer, optim_cfg):
        return None


def load_clip_to_cpu(cfg):
    """CoOp's ``load_clip_to_cpu`` for open_clip: CoOp's backbone names map to open_clip's."""
    import open_clip  # PROGRAD-FAST: open_clip instead of OpenAI's clip package

    name = cfg.MODEL.BACKBONE.NAME.replace("/", "-")  # "ViT-B/16" -> "ViT-B-16"
    pretrained = getattr(cfg.MODEL.BACKBONE, "PRETRAINED", "openai")
    return open_clip.create_model(name, pretrained=pretrained).eval()


def build_optimizer(model, optim_cfg, lam: float = 1.0):
    """Dassl's ``build_optimizer`` for CoOp's SGD, as ProGradSGD."""
    return prograd_fast.ProGradSGD(  # PROGRAD-FAST: was torch.optim.SGD via dassl.optim
        [p for p in model.parameters() if p.requires_grad], lr=optim_cfg.LR,
        momentum=optim_cfg.MOMENTUM, weight_decay=optim_cfg.WEIGHT_DECAY,
        lam=lam)  # PROGRAD-FAST: lam=0 is plain CoOp


class CoOpProGradFast(TrainerX):
    """CoOp's trainer with ProGrad, on prograd_fast."""

    def check_cfg(self, cfg):
        assert cfg.TRAINER.COOP.PREC in ["fp16", "fp32", "amp"]

    def build_model(self):
        cfg = self.cfg
        classnames = self.dm.dataset.classnames
        clip_model = load_clip_to_cpu(cfg)
        coop = cfg.TRAINER.COOP
        self.model = PromptedCLIP(  # PROGRAD-FAST: was CustomCLIP(cfg, classnames, clip_model)
            clip_model, classnames,
            templates=TEMPLATES.get(cfg.DATASET.NAME, TEMPLATES["default"]),  # PROGRAD-FAST
            n_ctx=coop.N_CTX, ctx_init=coop.CTX_INIT or None, class_specific=coop.CSC,
            class_token_position=coop.CLASS_TOKEN_POSITION,
            dtype=torch.float32)  # PROGRAD-FAST: fp32 context even for an fp16 CLIP
        if coop.PREC == "fp16":
            self.model.clip.half()  # CoOp's default precision (the context stays fp32)
        # (CoOp's loop freezing everything but the prompt learner: PromptedCLIP does it)
        self.model.to(self.device)
        self.optim = build_optimizer(self.model.prompt_learner, cfg.OPTIM,
                                     lam=cfg.TRAINER.PROGRAD.LAMBDA)  # PROGRAD-FAST
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("prompt_learner", self.model.prompt_learner, self.optim, self.sched)
        self.scaler = torch.amp.GradScaler() if coop.PREC == "amp" else None

    def forward_backward(self, batch):
        image, label = self.parse_batch_train(batch)
        prec = self.cfg.TRAINER.COOP.PREC
        with torch.autocast(image.device.type, enabled=prec == "amp"):
            output, zs_output = self.model(image)  # PROGRAD-FAST: one image pass, two heads
        ce, kl = prograd_fast.prograd_losses(  # PROGRAD-FAST: was F.cross_entropy(output, label)
            output.float(), zs_output.float(), label, self.cfg.TRAINER.PROGRAD.T)
        self.model_backward_and_update(ce, kl)  # PROGRAD-FAST: both losses
        loss_summary = {"loss": ce.item(), "kl": kl.item(),  # PROGRAD-FAST: + kl
                        "acc": compute_accuracy(output, label)[0].item()}
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return loss_summary

    def model_backward_and_update(self, loss, general_loss=None, names=None):
        """Dassl's zero-grad / backward / step, with the general gradient stored too."""
        self.model_zero_grad(names)
        scale = self.scaler.scale if self.scaler is not None else (lambda x: x)
        if general_loss is None:
            scale(loss).backward()
        else:  # PROGRAD-FAST: both gradients from the one forward
            prograd_fast.backward(self.optim, scale(loss), scale(general_loss))
        if self.scaler is not None:  # amp: the scaler unscales and checks both gradients
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            self.optim.step()

    def parse_batch_train(self, batch):
        input = batch["img"].to(self.device)
        label = batch["label"].to(self.device)
        return input, label


if TRAINER_REGISTRY is not None:
    TRAINER_REGISTRY.register()(CoOpProGradFast)
