"""The four evaluation protocols of CoOp / ProGrad and the official settings of each run.

Sources (``ProGrad.public`` in ``../shared/vendor``): ``configs/trainers/{CoOp,ProGrad}/
rn50{,_ep100,_ep50}.yaml``, ``scripts/{main,prograd,base2new_*,eval}.sh`` and its README.

* every training run: SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32, cosine
  schedule over ``epochs`` after 1 warm-up epoch at a constant 1e-5, 16 context tokens at
  the end of the prompt, one generic context; the last epoch's prompt is tested.
* ``fewshot``: 1 / 2 / 4 / 8 / 16 shots; 50 epochs for 1 shot, 100 for 2 and 4, 200 for
  8 and 16 (``rn50_ep50`` / ``rn50_ep100`` / ``rn50``); ProGrad's lambda is 0.8 for 8 and 16
  shots on Flowers102, DTD and EuroSAT, 1.0 elsewhere (README).
* ``base2new``: train on the base half of the classes, test on base and new; 4 shots and
  100 epochs (``base2new_*.sh``).
* ``xd`` (cross-data-set) and ``dg`` (domain generalisation): train on ImageNet, 4 shots,
  50 epochs (``eval.sh`` loads epoch 50), test on the other ten data sets / on
  ImageNet-V2, -Sketch, -A and -R with their own class names.
* ImageNet always trains for 50 epochs (``rn50_ep50``, as the README says for base-to-new
  and ``eval.sh`` for xd / dg; CoOp's few-shot ImageNet runs used 50 as well).
* methods: ``zeroshot`` (ZeroshotCLIP: the hand-crafted template per data set, no
  training), ``coop`` (random N(0, 0.02) context), ``prograd`` (context initialised from the
  data set's ProGrad template, right-aligned in 16 tokens -- ``CTX_INIT: True`` -- and that
  template as the zero-shot teacher, T = 1); ``kgcoop`` and ``kgcoop+prograd`` (KgCoOp's
  ``configs/trainers/KgCoOp`` and ``scripts/``: context from "a photo of a" -- 4 tokens --,
  W = 8.0, batch 128, 100 epochs for base2new / xd / dg in the ``cocoop`` setting and the
  protocol's epochs elsewhere, KgCoOp's templates as the knowledge-guided target and the
  teacher).

Two *settings* (``--setting``), each the official configs of one family of papers:

* ``prograd`` (the default): the official ProGrad code above -- RN50, 4 shots for
  base2new / xd / dg, and ProGrad's own zero-shot templates (its ``zsclip.py``: they differ
  from CoOp's on OxfordPets, Flowers102 and Food101).
* ``cocoop``: the base-to-new and cross-data-set tables of CoCoOp, KgCoOp and MaPLe --
  ViT-B/16, 16 shots, CoOp's templates for zero-shot CLIP, and per method the schedule those
  repositories use: CoOp as CoCoOp's scripts run it (``CoOp/vit_b16_ctxv1``: 200 epochs, 50
  on ImageNet, context initialised from "a photo of a", 4 tokens); ProGrad with the
  ViT-B/16 config of the ProGrad-derived KgCoOp code (``vit_b16_ep100_ctxv1``: 100 epochs,
  ``CTX_INIT: True``), keeping ProGrad's 16-token template context.  ``fewshot`` keeps
  CoOp's per-shot schedule in both settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..datasets.registry import FEWSHOT_DATASETS, IMAGENET_SHIFTS
from ..methods import METHODS, get_method

__all__ = ["ProtocolError", "PROTOCOLS", "METHODS", "DEFAULT_SHOTS", "SOURCE", "Schedule",
           "official_schedule", "default_datasets", "method_prompt", "N_CTX", "SETTINGS",
           "DEFAULT_SETTING", "SETTING_MODELS", "OFFICIAL_PRECISION", "default_shots",
           "PromptOverrides"]

PROTOCOLS = ("base2new", "fewshot", "xd", "dg")


class ProtocolError(ValueError):
    """A grid that cannot be run as asked (unknown protocol or method, bad shots)."""


DEFAULT_SHOTS = {"fewshot": (1, 2, 4, 8, 16), "base2new": (4,), "xd": (4,), "dg": (4,)}
SOURCE = "imagenet"  # the training set of xd and dg
N_CTX = 16
LAMBDA_08 = ("oxford_flowers", "dtd", "eurosat")
SETTINGS = ("prograd", "cocoop")
DEFAULT_SETTING = "prograd"
SETTING_MODELS = {"prograd": "RN50", "cocoop": "ViT-B-16"}  # open_clip names of the backbones
COCOOP_SHOTS = 16
COCOOP_COOP_INIT = "a photo of a"  # CoOp/vit_b16_ctxv1's CTX_INIT
OFFICIAL_PRECISION = "fp16"  # TRAINER.COOP.PREC of every official config
#: KgCoOp (its ``configs/trainers/KgCoOp/*.yaml`` and ``scripts/``): the methods, its
#: batch size and epochs; its prompt and W are :mod:`prograd_fast.clip.kgcoop`'s.
KGCOOP_METHODS = ("kgcoop", "kgcoop+prograd")
KGCOOP_BATCH = 128
KGCOOP_EPOCHS = 100


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ProtocolError(f"unknown setting {setting!r}: use one of {', '.join(SETTINGS)}")


def default_shots(protocol: str, setting: str = DEFAULT_SETTING) -> tuple[int, ...]:
    """The shots of a protocol's table in a setting (16 for CoCoOp's base2new / xd / dg)."""
    _check_setting(setting)
    if setting == "cocoop" and protocol != "fewshot":
        return (COCOOP_SHOTS,)
    return DEFAULT_SHOTS[protocol]


@dataclass(frozen=True)
class PromptOverrides:
    """Ablations of the trained methods' prompt (``None``: the method's own).  ``ctx_init``
    ``"none"`` starts from a random context."""

    n_ctx: int | None = None
    ctx_init: str | None = None
    csc: bool = False
    class_token_position: str | None = None

    def active(self) -> dict:
        """The overrides given, by their option names."""
        out = {"n-ctx": self.n_ctx, "ctx-init": self.ctx_init,
               "csc": True if self.csc else None,
               "class-token-position": (self.class_token_position
                                        if self.class_token_position != "end" else None)}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Schedule:
    """Optimiser and schedule of one training run (Dassl's OPTIM / DATALOADER settings)."""

    epochs: int
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    lam: float = 1.0
    temperature: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def official_schedule(protocol: str, dataset: str, shots: int, method: str,
                      setting: str = DEFAULT_SETTING) -> Schedule:
    """The settings the official configs and scripts of ``setting`` use for this run."""
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}: use one of {PROTOCOLS}")
    _check_setting(setting)
    if method in KGCOOP_METHODS:  # KgCoOp's configs: batch 128; 100 epochs in its tables
        lam = 1.0 if _projects(method) else 0.0
        if setting == "cocoop" and protocol != "fewshot":
            return Schedule(epochs=KGCOOP_EPOCHS, batch_size=KGCOOP_BATCH, lam=lam)
        base = official_schedule(protocol, dataset, shots, "coop", setting)
        return Schedule(epochs=base.epochs, batch_size=KGCOOP_BATCH, lam=lam)
    if setting == "cocoop" and protocol != "fewshot":
        if method == "prograd":
            epochs = 100  # KgCoOp's vit_b16_ep100_ctxv1, ImageNet included
        else:
            epochs = 50 if dataset == "imagenet" else 200  # CoOp/vit_b16{_ep50,}_ctxv1
        return Schedule(epochs=epochs, lam=1.0 if _projects(method) else 0.0)
    if dataset == "imagenet":
        epochs = 50
    elif protocol == "fewshot":
        epochs = 50 if shots <= 1 else 100 if shots <= 4 else 200
    else:
        epochs = 100
    lam = 0.8 if (protocol == "fewshot" and shots >= 8 and dataset in LAMBDA_08) else 1.0
    return Schedule(epochs=epochs, lam=lam if _projects(method) else 0.0)


def _method(method: str):
    """The registered method (:mod:`prograd_fast.methods`); ProtocolError when unknown."""
    try:
        return get_method(method)
    except ValueError as e:
        raise ProtocolError(str(e)) from None


def _projects(method: str) -> bool:
    """Whether ProGrad's projection (and so lambda) applies to ``method``."""
    return _method(method).prograd


def default_datasets(protocol: str, source: str = SOURCE) -> tuple[str, ...]:
    """Data sets of the paper tables: the 11 for fewshot / base2new; the targets for xd (the
    other ten) / dg."""
    if protocol in ("fewshot", "base2new"):
        return FEWSHOT_DATASETS
    if protocol == "xd":
        return tuple(d for d in FEWSHOT_DATASETS if d != source)
    return IMAGENET_SHIFTS


def method_prompt(method: str, dassl_name: str, setting: str = DEFAULT_SETTING,
                  overrides: PromptOverrides | None = None) -> dict:
    """Prompt and teacher settings of a method on a data set in a setting, with the
    ablation ``overrides`` of the trained methods (keys of ``PromptedCLIP``).  A method
    registered beside the built-in ones gets CoOp's (its learner takes these keys)."""
    from ..clip.kgcoop import KGCOOP_CTX_INIT, KGCOOP_N_CTX, KGCOOP_WEIGHT
    from ..clip.teacher import get_templates

    _check_setting(setting)
    if method == "zeroshot":  # each family's zero-shot CLIP uses its own code's templates
        return {"templates": dassl_name, "n_ctx": N_CTX,
                "template_set": "prograd" if setting == "prograd" else "coop"}
    if method == "coop":
        out = {"templates": dassl_name, "template_set": "coop", "n_ctx": N_CTX}
        if setting == "cocoop":
            out["ctx_init"] = COCOOP_COOP_INIT
    elif method == "prograd":
        template = get_templates(dassl_name, "prograd")[0]
        out = {"templates": dassl_name, "template_set": "prograd", "n_ctx": N_CTX,
               "ctx_init": template.replace(" {}.", "").replace("_", " "),
               "ctx_init_mode": "prograd"}
    elif method in KGCOOP_METHODS:  # KgCoOp's configs: CTX_INIT True, W 8.0, its templates
        out = {"templates": dassl_name, "template_set": "kgcoop", "n_ctx": KGCOOP_N_CTX,
               "ctx_init": KGCOOP_CTX_INIT, "kg_weight": KGCOOP_WEIGHT,
               "kg_templates": dassl_name}
    else:  # a registered method: CoOp's prompt settings (its learner takes these keys)
        out = {"templates": dassl_name, "template_set": "coop", "n_ctx": N_CTX}
        if not _method(method).trains:
            return out
    o = overrides or PromptOverrides()
    if o.n_ctx is not None:
        out["n_ctx"] = o.n_ctx
        if out.get("ctx_init_mode", "coop") == "coop" and o.ctx_init is None:
            out.pop("ctx_init", None)  # CoOp-style init words would fix the length
    if o.ctx_init is not None:
        if o.ctx_init.strip().lower() in ("", "none"):
            out.pop("ctx_init", None)
            out.pop("ctx_init_mode", None)
        else:
            out["ctx_init"] = o.ctx_init
    if method in KGCOOP_METHODS and "ctx_init" not in out:
        out["ctx_init"] = None  # a random context (the learner's default is "a photo of a")
    if o.csc:
        out["class_specific"] = True
    if o.class_token_position is not None:
        out["class_token_position"] = o.class_token_position
    return out
