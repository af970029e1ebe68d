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
* methods: ``zeroshot`` (CoOp's ZeroshotCLIP: CoOp's hand-crafted template per data set, no
  training), ``coop`` (random N(0, 0.02) context), ``prograd`` (context initialised from the
  data set's ProGrad template, right-aligned in 16 tokens -- ``CTX_INIT: True`` -- and that
  template as the zero-shot teacher, T = 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..datasets.registry import FEWSHOT_DATASETS, IMAGENET_SHIFTS

__all__ = ["ProtocolError", "PROTOCOLS", "METHODS", "DEFAULT_SHOTS", "SOURCE", "Schedule",
           "official_schedule", "default_datasets", "method_prompt", "N_CTX"]

PROTOCOLS = ("base2new", "fewshot", "xd", "dg")


class ProtocolError(ValueError):
    """A grid that cannot be run as asked (unknown protocol or method, bad shots)."""


METHODS = ("zeroshot", "coop", "prograd")
DEFAULT_SHOTS = {"fewshot": (1, 2, 4, 8, 16), "base2new": (4,), "xd": (4,), "dg": (4,)}
SOURCE = "imagenet"  # the training set of xd and dg
N_CTX = 16
LAMBDA_08 = ("oxford_flowers", "dtd", "eurosat")


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


def official_schedule(protocol: str, dataset: str, shots: int, method: str) -> Schedule:
    """The settings the official configs and scripts use for this run."""
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}: use one of {PROTOCOLS}")
    if dataset == "imagenet":
        epochs = 50
    elif protocol == "fewshot":
        epochs = 50 if shots <= 1 else 100 if shots <= 4 else 200
    else:
        epochs = 100
    lam = 0.8 if (protocol == "fewshot" and shots >= 8 and dataset in LAMBDA_08) else 1.0
    return Schedule(epochs=epochs, lam=lam if method == "prograd" else 0.0)


def default_datasets(protocol: str, source: str = SOURCE) -> tuple[str, ...]:
    """Data sets of the paper tables: the 11 for fewshot / base2new; the targets for xd (the
    other ten) / dg."""
    if protocol in ("fewshot", "base2new"):
        return FEWSHOT_DATASETS
    if protocol == "xd":
        return tuple(d for d in FEWSHOT_DATASETS if d != source)
    return IMAGENET_SHIFTS


def method_prompt(method: str, dassl_name: str) -> dict:
    """Prompt and teacher settings of a method on a data set (keys of ``PromptedCLIP``)."""
    from ..clip.teacher import get_templates

    if method == "zeroshot":
        return {"templates": dassl_name, "template_set": "coop", "n_ctx": N_CTX}
    if method == "coop":
        return {"templates": dassl_name, "template_set": "coop", "n_ctx": N_CTX}
    if method == "prograd":
        template = get_templates(dassl_name, "prograd")[0]
        return {"templates": dassl_name, "template_set": "prograd", "n_ctx": N_CTX,
                "ctx_init": template.replace(" {}.", "").replace("_", " "),
                "ctx_init_mode": "prograd"}
    raise ProtocolError(f"unknown method {method!r}: use one of {METHODS}")
