"""ProGrad on open_clip as a Dassl trainer: a drop-in for CoOp's and ProGrad's trainers.

Copy this file, unmodified, into a CoOp or ProGrad checkout's ``trainers/``, add
``import trainers.dassl_coop_prograd`` to its ``train.py`` and run ``train.py`` as usual
with ``--trainer CoOpProGradFast`` and the stock configs (``configs/trainers/CoOp/*.yaml``,
``configs/trainers/ProGrad/*.yaml``).  It mirrors the official ProGrad trainer
(``trainers/prograd.py``, itself CoOp's ``trainers/coop.py`` plus the projection) method by
method; every line that differs is marked ``# PROGRAD-FAST``.  What changes:

- the model is an open_clip CLIP wrapped in :class:`prograd_fast.clip.PromptedCLIP`
  (learned prompts cut after the longest end-of-text token, zero-shot teacher features
  computed once, one image pass for student and teacher);
- the optimiser is :class:`prograd_fast.ProGradSGD` (``LOSS.LAMBDA 0`` is plain CoOp);
- the losses are ``prograd_losses`` (cross-entropy + KL to the zero-shot teacher) and the
  backward fills both gradients with :func:`prograd_fast.backward`: the projection happens
  inside the optimiser step, without host synchronisation.

Config keys read (see docs/coop.md, "Dassl drop-in", for every one):
``MODEL.BACKBONE.NAME`` (CoOp's "RN50", "ViT-B/16" or any open_clip name),
``MODEL.BACKBONE.PRETRAINED`` (``True``: OpenAI's weights, as CoOp; ``False``: random; a
string: an open_clip tag or a checkpoint file), ``MODEL.INIT_WEIGHTS``,
``TRAINER.COOP.{N_CTX, CTX_INIT, CSC, CLASS_TOKEN_POSITION, PREC}`` (``CTX_INIT: True`` is
official ProGrad's: the data set's template, right-aligned in N_CTX; a string is CoOp's:
those words), ``OPTIM.{NAME, LR, MOMENTUM, WEIGHT_DECAY, SGD_DAMPNING, SGD_NESTEROV,
STAGED_LR}`` and the scheduler keys, ``LOSS.{NAME, LAMBDA, T}`` (official ProGrad's), optional
``TRAINER.PROGRAD.{LAMBDA, T, TEMPLATE, TEMPLATE_SET, GRANULARITY, BACKEND}``,
``DATASET.NAME`` (a data set of one's own, without a template of its own, gets the teacher
template "a photo of a {}." and the trainer says so) and ``INPUT.SIZE``.  Without Dassl
installed, a minimal stand-in base class lets the training step run
(``tests/test_clip_dassl_example.py``).
"""

from __future__ import annotations

import os.path as osp

import torch

import prograd_fast  # PROGRAD-FAST
from prograd_fast.amp import ProGradGradScaler  # PROGRAD-FAST
from prograd_fast.clip import (TEMPLATE_SETS, PromptedCLIP, get_templates,  # PROGRAD-FAST
                               load_open_clip, template_context)

try:  # the real thing
    from dassl.engine import TRAINER_REGISTRY, TrainerX
    from dassl.metrics import compute_accuracy
    from dassl.optim import build_lr_scheduler
    from dassl.utils import load_checkpoint, load_pretrained_weights
except ImportError:  # a minimal stand-in, enough to run forward_backward without Dassl
    TRAINER_REGISTRY = None

    class TrainerX:  # noqa: D101 - mimics dassl.engine.TrainerX's surface used here
        def __init__(self, cfg, dm):
            self.cfg, self.dm = cfg, dm
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self._models, self._optims, self._scheds = {}, {}, {}
            self.batch_idx, self.num_batches = 0, 1
            self.check_cfg(cfg)
            self.build_model()

        def register_model(self, name, model, optim=None, sched=None):
            self._models[name], self._optims[name], self._scheds[name] = model, optim, sched

        def get_model_names(self, names=None):
            if names is None:
                return list(self._models)
            return [names] if isinstance(names, str) else list(names)

        def model_zero_grad(self, names=None):
            for name in self.get_model_names(names):
                self._optims[name].zero_grad()

        def model_update(self, names=None):
            for name in self.get_model_names(names):
                self._optims[name].step()

        def update_lr(self, names=None):
            for name in self.get_model_names(names):
                if self._scheds[name] is not None:
                    self._scheds[name].step()

        def detect_anomaly(self, loss):
            if not torch.isfinite(loss).all():
                raise FloatingPointError("Loss is infinite or NaN!")

    def compute_accuracy(output, target, topk=(1,)):
        return [(output.argmax(1) == target).float().mean() * 100]

    def build_lr_scheduler(optimizer, optim_cfg):
        return None

    def load_checkpoint(fpath):
        return torch.load(fpath, map_location="cpu", weights_only=False)

    def load_pretrained_weights(model, weight_path):
        model.load_state_dict(load_checkpoint(weight_path)["state_dict"], strict=False)


def _cfg_get(cfg, key, default=None):  # PROGRAD-FAST: optional config keys
    """``cfg.A.B.C`` if every node exists, else ``default``."""
    node = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            return default
        node = getattr(node, part)
    return node


def prograd_options(cfg) -> dict:  # PROGRAD-FAST
    """ProGrad's options from official ProGrad's ``LOSS`` keys, or ``TRAINER.PROGRAD``.

    ``LOSS.LAMBDA`` / ``LOSS.T`` are what the official scripts set (``LOSS.LAMBDA 0`` is
    CoOp); ``TRAINER.PROGRAD.LAMBDA`` / ``.T`` are accepted too, and a disagreement between
    the two is an error rather than a silent choice.  Defaults: lambda 1, T 1, the teacher's
    templates from official ProGrad (``"prograd"``; ``"coop"`` for CoOp's), per-tensor
    projection (the official code's; the same as the paper's for one context tensor).
    """
    name = _cfg_get(cfg, "LOSS.NAME", "")
    if name not in ("", "prograd"):
        raise ValueError(f"LOSS.NAME {name!r} is not supported by CoOpProGradFast (it "
                         f"implements 'prograd': cross-entropy + KL to the zero-shot teacher)")
    out = {}
    for key, option in (("LAMBDA", "lam"), ("T", "temperature")):
        official = _cfg_get(cfg, f"LOSS.{key}")
        ours = _cfg_get(cfg, f"TRAINER.PROGRAD.{key}")
        if official is not None and ours is not None and float(official) != float(ours):
            raise ValueError(f"LOSS.{key} ({official}) and TRAINER.PROGRAD.{key} ({ours}) "
                             f"disagree: set one of them")
        value = official if official is not None else ours
        out[option] = 1.0 if value is None else float(value)
    out["template_set"] = _cfg_get(cfg, "TRAINER.PROGRAD.TEMPLATE_SET", "prograd")
    out["granularity"] = _cfg_get(cfg, "TRAINER.PROGRAD.GRANULARITY", "tensor")
    out["backend"] = _cfg_get(cfg, "TRAINER.PROGRAD.BACKEND", "auto")
    return out


DEFAULT_TEMPLATE = "a photo of a {}."  # PROGRAD-FAST: CLIP's, for a data set of one's own


def teacher_templates(cfg, template_set: str) -> list[str]:  # PROGRAD-FAST
    """The zero-shot teacher's templates: ``TRAINER.PROGRAD.TEMPLATE`` when set (a string
    with ``{}``, or a list of such: an ensemble), else the data set's own in
    ``template_set``; a data set with none (one of the user's own) gets
    :data:`DEFAULT_TEMPLATE` and one printed line saying so and naming the key.  The first
    template is the one ``CTX_INIT True`` initialises the context from."""
    own = _cfg_get(cfg, "TRAINER.PROGRAD.TEMPLATE")
    if own:  # "" / None / []: not set
        templates = [own] if isinstance(own, str) else list(own)
        bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
        if bad:
            raise ValueError(f"TRAINER.PROGRAD.TEMPLATE must be a string with one '{{}}' (the "
                             f"class name) or a list of such, got {bad[0]!r}")
        return templates
    name = cfg.DATASET.NAME
    if template_set not in TEMPLATE_SETS:
        raise ValueError(f"TRAINER.PROGRAD.TEMPLATE_SET {template_set!r} is not one of "
                         f"{sorted(TEMPLATE_SETS)}")
    if str(name).lower() in {k.lower() for k in TEMPLATE_SETS[template_set]}:
        return get_templates(name, template_set)
    print(f"No teacher template for DATASET.NAME {name!r}: using {DEFAULT_TEMPLATE!r} "
          f"(set TRAINER.PROGRAD.TEMPLATE to change it)")
    return [DEFAULT_TEMPLATE]


def backbone_pretrained(value, name: str) -> str | None:  # PROGRAD-FAST
    """Dassl's ``MODEL.BACKBONE.PRETRAINED`` as an open_clip ``pretrained=``: ``True`` (Dassl's
    default) means what CoOp loads, OpenAI's CLIP weights ("openai"); ``False`` / ``""`` /
    ``None``: random weights; a string: an open_clip tag or a checkpoint file."""
    import open_clip

    if value is True:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if "openai" not in tags:
            raise ValueError(f"MODEL.BACKBONE.PRETRAINED True means OpenAI's weights (as in "
                             f"CoOp), which open_clip does not have for {name!r}: make the key a "
                             f"string in extend_cfg and set a tag (one of {tags}) or a file")
        return "openai"
    if value is False or value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    raise TypeError(f"MODEL.BACKBONE.PRETRAINED must be a bool or a string, got {value!r}")


def load_clip_to_cpu(cfg):
    """CoOp's ``load_clip_to_cpu`` for open_clip: CoOp's backbone names map to open_clip's."""
    name = cfg.MODEL.BACKBONE.NAME.replace("/", "-")  # PROGRAD-FAST: "ViT-B/16" -> "ViT-B-16"
    pretrained = backbone_pretrained(cfg.MODEL.BACKBONE.PRETRAINED, name)  # PROGRAD-FAST
    return load_open_clip(name, pretrained)  # PROGRAD-FAST: open_clip, not OpenAI's clip


def context_init(ctx_init, template: str) -> dict:  # PROGRAD-FAST
    """``TRAINER.COOP.CTX_INIT`` as PromptLearner arguments: ``True`` is official ProGrad's
    (the data set's template without its class slot, right-aligned in N_CTX, zeros before),
    a non-empty string is CoOp's (those words are the context), otherwise random."""
    if ctx_init is True:
        return dict(ctx_init=template_context(template), ctx_init_mode="prograd")
    if isinstance(ctx_init, str) and ctx_init:
        return dict(ctx_init=ctx_init, ctx_init_mode="coop")
    return dict(ctx_init=None)


def build_optimizer(model, optim_cfg, **prograd):
    """Dassl's ``build_optimizer`` for SGD, as ProGradSGD (``prograd``: lam, granularity,
    backend)."""
    if optim_cfg.NAME != "sgd":  # PROGRAD-FAST: ProGrad is SGD on the projected gradient
        raise ValueError(f"OPTIM.NAME must be 'sgd' for CoOpProGradFast, got {optim_cfg.NAME!r}")
    if optim_cfg.STAGED_LR:  # PROGRAD-FAST
        raise ValueError("OPTIM.STAGED_LR is not supported: only the prompt learner's context "
                         "is trained, one parameter group")
    return prograd_fast.ProGradSGD(  # PROGRAD-FAST: was torch.optim.SGD via dassl.optim
        [p for p in model.parameters() if p.requires_grad], lr=optim_cfg.LR,
        momentum=optim_cfg.MOMENTUM, weight_decay=optim_cfg.WEIGHT_DECAY,
        dampening=optim_cfg.SGD_DAMPNING, nesterov=optim_cfg.SGD_NESTEROV,
        **prograd)  # PROGRAD-FAST: lam=0 is plain CoOp


class CoOpProGradFast(TrainerX):
    """CoOp's trainer with ProGrad (official ProGrad's trainer), on prograd_fast."""

    def check_cfg(self, cfg):
        assert cfg.TRAINER.COOP.PREC in ["fp16", "fp32", "amp"]

    def build_model(self):
        cfg = self.cfg
        classnames = self.dm.dataset.classnames
        coop = cfg.TRAINER.COOP
        opts = prograd_options(cfg)  # PROGRAD-FAST
        self.lam, self.T = opts["lam"], opts["temperature"]  # PROGRAD-FAST

        print(f"Loading CLIP (backbone: {cfg.MODEL.BACKBONE.NAME})")
        clip_model = load_clip_to_cpu(cfg)
        image_size = clip_model.visual.image_size  # PROGRAD-FAST: CoOp asserts this too
        image_size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size,) * 2
        if tuple(cfg.INPUT.SIZE) != image_size:
            raise ValueError(f"INPUT.SIZE {tuple(cfg.INPUT.SIZE)} must equal the backbone's "
                             f"image size {image_size}")

        templates = teacher_templates(cfg, opts["template_set"])  # PROGRAD-FAST
        template = templates[0]  # PROGRAD-FAST: the one CTX_INIT True starts from
        init = context_init(coop.CTX_INIT, template)  # PROGRAD-FAST
        class_specific = coop.CSC and init["ctx_init"] is None  # PROGRAD-FAST: as CoOp / ProGrad
        if coop.CSC and not class_specific:
            print("CSC is ignored with CTX_INIT (as in CoOp and ProGrad): one generic context")
        print(f"Prompts: {[template.format(c.replace('_', ' ')) for c in classnames]}")
        print("Building custom CLIP")
        self.model = PromptedCLIP(  # PROGRAD-FAST: CustomCLIP and zero-shot CLIP in one
            clip_model, classnames, templates=templates,
            n_ctx=coop.N_CTX, class_specific=class_specific,
            class_token_position=coop.CLASS_TOKEN_POSITION,
            dtype=torch.float32,  # PROGRAD-FAST: an fp32 context even for an fp16 CLIP
            **init)
        # PROGRAD-FAST: CoOp's PromptLearner prints these two lines
        print(f'Initial context: "{self.model.prompt_learner.prompt_prefix}"')
        print(f"Number of context words (tokens): {self.model.prompt_learner.n_ctx}")
        if coop.PREC == "fp16":
            self.model.clip.half()  # CoOp's default precision (the context stays fp32)
        # (the loop turning off gradients outside the prompt learner: PromptedCLIP does it)

        if cfg.MODEL.INIT_WEIGHTS:
            load_pretrained_weights(self.model.prompt_learner, cfg.MODEL.INIT_WEIGHTS)

        self.model.to(self.device)
        # NOTE: only give prompt_learner to the optimizer
        self.optim = build_optimizer(self.model.prompt_learner, cfg.OPTIM,  # PROGRAD-FAST
                                     lam=self.lam, granularity=opts["granularity"],
                                     backend=opts["backend"])
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("prompt_learner", self.model.prompt_learner, self.optim, self.sched)

        self.scaler = (ProGradGradScaler(self.device.type)  # PROGRAD-FAST: sees G_g too
                       if coop.PREC == "amp" else None)

        device_count = torch.cuda.device_count()
        if device_count > 1:  # PROGRAD-FAST: no DataParallel (its replicas would run the
            # text tower and shared-prefix encoder PromptedCLIP refers to: the first GPU's)
            print(f"Multiple GPUs detected (n_gpus={device_count}): CoOpProGradFast trains on "
                  f"one ({self.device}); for several, use prograd-fast under torchrun")

    def forward_backward(self, batch):
        image, label = self.parse_batch_train(batch)

        prec = self.cfg.TRAINER.COOP.PREC
        with torch.autocast(image.device.type, enabled=prec == "amp"):
            output, zs_output = self.model(image)  # PROGRAD-FAST: one image pass, two heads
        xe_loss, kl_loss = prograd_fast.prograd_losses(  # PROGRAD-FAST: was self.criterion
            output.float(), zs_output.float(), label, self.T)
        self.model_backward_and_update(  # PROGRAD-FAST: the general loss by keyword
            xe_loss, general_loss=kl_loss if self.lam > 0 else None)

        loss_summary = {
            "xe_loss": xe_loss.item(),
            "kl_loss": kl_loss.item(),
            "acc": compute_accuracy(output, label)[0].item(),
        }

        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()

        return loss_summary

    def model_backward_and_update(self, loss, names=None, general_loss=None):
        """Dassl's zero-grad / backward / step (same signature, plus ``general_loss``): with a
        general loss, both gradients are handed to ProGradSGD, which projects in its step."""
        if isinstance(names, torch.Tensor):  # PROGRAD-FAST: an older call style
            raise TypeError("model_backward_and_update(loss, names=None, general_loss=None): "
                            "pass the general loss by keyword")
        self.model_zero_grad(names)
        scale = self.scaler.scale if self.scaler is not None else (lambda x: x)
        if self.scaler is None:  # Dassl's NaN check (with amp the scaler skips bad steps)
            self.detect_anomaly(loss)
            if general_loss is not None:
                self.detect_anomaly(general_loss)  # PROGRAD-FAST
        if general_loss is None:
            scale(loss).backward()
        else:  # PROGRAD-FAST: both gradients from the one forward
            prograd_fast.backward(self.optim, scale(loss), scale(general_loss))
        if self.scaler is not None:  # amp: the scaler unscales and checks both gradients
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            self.model_update(names)

    def model_inference(self, input):
        return self.model(input)[0]  # PROGRAD-FAST: the student's logits (not the teacher's)

    def parse_batch_train(self, batch):
        input = batch["img"]
        label = batch["label"]
        input = input.to(self.device)
        label = label.to(self.device)
        return input, label

    def load_model(self, directory, epoch=None):
        if not directory:
            print("Note that load_model() is skipped as no pretrained model is given")
            return

        names = self.get_model_names()

        # By default, the best model is loaded
        model_file = "model-best.pth.tar"

        if epoch is not None:
            model_file = "model.pth.tar-" + str(epoch)

        for name in names:
            model_path = osp.join(directory, name, model_file)

            if not osp.exists(model_path):
                raise FileNotFoundError('Model not found at "{}"'.format(model_path))

            checkpoint = load_checkpoint(model_path)
            state_dict = checkpoint["state_dict"]
            epoch = checkpoint["epoch"]

            # token_prefix / token_suffix (fixed vectors of the saved run's class names) are
            # ignored by the prompt learner itself; a context of another shape is refused
            print("Loading weights to {} "
                  'from "{}" (epoch = {})'.format(name, model_path, epoch))
            self._models[name].load_state_dict(state_dict)  # PROGRAD-FAST: strict


if TRAINER_REGISTRY is not None:
    TRAINER_REGISTRY.register()(CoOpProGradFast)
