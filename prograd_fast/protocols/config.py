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

Methods with configs of their own (:data:`METHOD_CONFIGS`, from ``multimodal-prompt-learning``'s
``configs/trainers/`` and ``scripts/``): the method's config fixes its prompt (context length,
depth, initial words) and its optimiser schedule (lr, batch size, epochs) in every protocol
and both settings -- they have one config, used for base2new, xd and dg alike (MaPLe also its
``_cross_datasets`` config for xd and dg; no repository has few-shot configs for them, so
``fewshot`` uses the same one) --, and the setting fixes what the table compares on: the
backbone, the shots and zero-shot CLIP's templates, which are also the ProGrad teacher's.

* ``cocoop``: ``CoCoOp/vit_b16_c4_ep10_batch1_ctxv1``: 4 context tokens from "a photo of a",
  batch 1, lr 0.002, 10 epochs.
* ``maple``: ``MaPLe/vit_b16_c2_ep5_batch4_2ctx``: 2 tokens from "a photo of a", depth 9,
  batch 4, lr 0.0035, 5 epochs; xd / dg: ``..._cross_datasets``: depth 3, lr 0.0026, 2 epochs.
* ``ivlp``: ``IVLP/vit_b16_c2_ep5_batch4_2+2ctx``: 2 text and 2 vision tokens, depth 12 on
  both towers, text from "a photo of a", batch 4, lr 0.0035, 5 epochs.
* ``vpt``: ``VPT/vit_b16_c2_ep5_batch4_4``: 8 vision tokens, depth 12, batch 4, lr 0.0025,
  5 epochs (the text prompt stays "a photo of a {}.").

``<method>+prograd`` runs the method's config with ProGrad's lambda (as ``prograd`` gets it in
the same run: 1.0, or 0.8 for 8 and 16 shots on Flowers102, DTD and EuroSAT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..datasets.registry import FEWSHOT_DATASETS, IMAGENET_SHIFTS
from ..methods import METHODS, get_method

__all__ = ["ProtocolError", "PROTOCOLS", "METHODS", "DEFAULT_SHOTS", "SOURCE", "Schedule",
           "official_schedule", "default_datasets", "method_prompt", "N_CTX", "SETTINGS",
           "DEFAULT_SETTING", "SETTING_MODELS", "OFFICIAL_PRECISION", "default_shots",
           "PromptOverrides", "MethodConfig", "deep_prompt_keys", "METHOD_CONFIGS",
           "register_method_config",
           "method_config", "method_settings", "config_overrides", "zeroshot_template_set",
           "prompts_image_tower"]

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
    depth: int | None = None  # the deep prompts' depth (MaPLe, IVLP, VPT), every tower's

    def active(self) -> dict:
        """The overrides given, by their option names."""
        out = {"n-ctx": self.n_ctx, "ctx-init": self.ctx_init, "prompt-depth": self.depth,
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


@dataclass(frozen=True)
class MethodConfig:
    """A method's own official config: ``prompt`` (its learner's keywords), lr, batch size
    and epochs, named by ``config`` (the file it follows).  ``transfer``: the config of xd
    and dg where the method has a cross-data-set config of its own.  ``init_words_set_length``:
    the learner takes one context vector per word of ``ctx_init`` (CoCoOp, as CoOp), so
    ``--n-ctx`` without ``--ctx-init`` starts from a random context, as it does for CoOp."""

    config: str
    prompt: dict = field(default_factory=dict)
    lr: float = 0.002
    batch_size: int = 32
    epochs: int = 10
    transfer: "MethodConfig | None" = None
    init_words_set_length: bool = False

    def for_protocol(self, protocol: str) -> "MethodConfig":
        """The config a protocol's runs use."""
        return self.transfer if self.transfer is not None and protocol in ("xd", "dg") else self


_PHOTO = "a photo of a"
#: base method name -> its official config (``<name>+prograd`` uses the same one).
METHOD_CONFIGS: dict[str, MethodConfig] = {}


def register_method_config(name: str, config: MethodConfig) -> MethodConfig:
    """Give the method ``name`` (and ``name+prograd``) the official ``config``."""
    METHOD_CONFIGS[name] = config
    return config


def method_config(method: str) -> MethodConfig | None:
    """The official config of ``method`` (or of the method it adds ProGrad to), else None."""
    if method in METHOD_CONFIGS:
        return METHOD_CONFIGS[method]
    if method.endswith("+prograd"):
        return METHOD_CONFIGS.get(method[:-len("+prograd")])
    return None


register_method_config("cocoop", MethodConfig(
    "CoCoOp/vit_b16_c4_ep10_batch1_ctxv1", {"n_ctx": 4, "ctx_init": _PHOTO},
    lr=0.002, batch_size=1, epochs=10, init_words_set_length=True))
register_method_config("maple", MethodConfig(
    "MaPLe/vit_b16_c2_ep5_batch4_2ctx", {"n_ctx": 2, "depth": 9, "ctx_init": _PHOTO},
    lr=0.0035, batch_size=4, epochs=5,
    transfer=MethodConfig("MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets",
                          {"n_ctx": 2, "depth": 3, "ctx_init": _PHOTO},
                          lr=0.0026, batch_size=4, epochs=2)))
register_method_config("ivlp", MethodConfig(
    "IVLP/vit_b16_c2_ep5_batch4_2+2ctx",
    {"n_ctx_text": 2, "n_ctx_vision": 2, "depth_text": 12, "depth_vision": 12,
     "ctx_init": _PHOTO}, lr=0.0035, batch_size=4, epochs=5))
register_method_config("vpt", MethodConfig(
    "VPT/vit_b16_c2_ep5_batch4_4", {"n_ctx_vision": 8, "depth_vision": 12},
    lr=0.0025, batch_size=4, epochs=5))


def official_schedule(protocol: str, dataset: str, shots: int, method: str,
                      setting: str = DEFAULT_SETTING) -> Schedule:
    """The settings the official configs and scripts of ``setting`` use for this run."""
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}: use one of {PROTOCOLS}")
    _check_setting(setting)
    own = method_config(method)
    if own is not None:  # the method's config; ProGrad's lambda for <method>+prograd
        own = own.for_protocol(protocol)
        lam = official_schedule(protocol, dataset, shots, "prograd", setting).lam
        return Schedule(epochs=own.epochs, lr=own.lr, batch_size=own.batch_size,
                        lam=lam if _projects(method) else 0.0)
    if method in KGCOOP_METHODS:  # KgCoOp's configs: batch 128; 100 epochs in its tables
        lam = official_schedule(protocol, dataset, shots, "prograd", setting).lam \
            if _projects(method) else 0.0
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


def prompts_image_tower(method: str) -> bool:
    """Whether ``method``'s learner prompts the image tower (its image features are its own:
    cached ones are not valid for it).  Imports the learner's module (torch)."""
    return bool(getattr(_method(method).learner, "vision_prompted", False))


def default_datasets(protocol: str, source: str = SOURCE) -> tuple[str, ...]:
    """Data sets of the paper tables: the 11 for fewshot / base2new; the targets for xd (the
    other ten) / dg."""
    if protocol in ("fewshot", "base2new"):
        return FEWSHOT_DATASETS
    if protocol == "xd":
        return tuple(d for d in FEWSHOT_DATASETS if d != source)
    return IMAGENET_SHIFTS


def zeroshot_template_set(setting: str) -> str:
    """The templates of the setting's zero-shot CLIP (each family's code has its own)."""
    return "prograd" if setting == "prograd" else "coop"


def method_prompt(method: str, dassl_name: str, setting: str = DEFAULT_SETTING,
                  overrides: PromptOverrides | None = None, protocol: str = "base2new") -> dict:
    """Prompt and teacher settings of a method on a data set in a setting and protocol,
    with the ablation ``overrides`` of the trained methods (keys of ``PromptedCLIP``).  A
    method with an official config (:func:`method_config`) gets its config's prompt and the
    setting's zero-shot templates as teacher; one registered beside the built-in ones
    without a config gets CoOp's (its learner takes these keys)."""
    from ..clip.kgcoop import KGCOOP_CTX_INIT, KGCOOP_N_CTX, KGCOOP_WEIGHT
    from ..clip.teacher import get_templates

    _check_setting(setting)
    if method == "zeroshot":
        return {"templates": dassl_name, "n_ctx": N_CTX,
                "template_set": zeroshot_template_set(setting)}
    own = method_config(method)
    if own is not None:
        out = {"templates": dassl_name, "template_set": zeroshot_template_set(setting),
               **own.for_protocol(protocol).prompt}
        return config_overrides(method, out, overrides or PromptOverrides())
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


def deep_prompt_keys(prompt: dict) -> list[str]:
    """The learner keywords of ``prompt`` that set a deep-prompt depth (a tower without
    prompts, depth 0, has none)."""
    return [k for k in ("depth", "depth_text", "depth_vision") if prompt.get(k)]


def config_overrides(method: str, prompt: dict, o: PromptOverrides) -> dict:
    """A method's config prompt with the ablation overrides its learner takes; ProtocolError
    naming the override and the method's keys for one it does not."""
    keys = ", ".join(k for k in prompt if k not in ("templates", "template_set"))
    if o.n_ctx is not None:
        key = next((k for k in ("n_ctx", "n_ctx_text") if k in prompt), None)
        if key is None:
            raise ProtocolError(f"--n-ctx: {method} has no text context (its settings: {keys})")
        prompt[key] = o.n_ctx
        own = method_config(method)
        words = prompt.get("ctx_init")
        if (o.ctx_init is None and own is not None and own.init_words_set_length and words
                and len(words.split()) != o.n_ctx):
            prompt["ctx_init"] = None  # a random context of that length, as for CoOp
    if o.depth is not None:
        deep = deep_prompt_keys(prompt)
        if not deep:
            raise ProtocolError(f"--prompt-depth: {method} has no deep prompts (its settings: "
                                f"{keys})")
        for k in deep:  # IVLP: both towers (a tower without prompts keeps none)
            prompt[k] = o.depth
    if o.ctx_init is not None:
        if "ctx_init" not in prompt:
            raise ProtocolError(f"--ctx-init: {method} has no context words (its settings: "
                                f"{keys})")
        none = o.ctx_init.strip().lower() in ("", "none")
        prompt["ctx_init"] = None if none else o.ctx_init
    for flag, given in (("--csc", o.csc),
                        ("--class-token-position", o.class_token_position not in (None, "end"))):
        if given:
            raise ProtocolError(f"{flag} applies to CoOp-style prompts, not to {method} "
                                f"(its settings: {keys})")
    return prompt


#: learner keywords named in a table's caption, and how
_SHOWN = (("depth", "depth"), ("depth_text", "text depth"), ("depth_vision", "vision depth"),
          ("n_ctx", "n_ctx"), ("n_ctx_text", "text n_ctx"), ("n_ctx_vision", "vision n_ctx"),
          ("kg_weight", "W"))


def _effective(method: str, prompt: dict) -> dict:
    """``prompt`` with the context length CoOp's learner gets: its init words set it."""
    if method_config(method) is None and prompt.get("ctx_init") \
            and prompt.get("ctx_init_mode", "coop") == "coop":
        prompt["n_ctx"] = len(prompt["ctx_init"].split())
    return prompt


def method_settings(method: str, protocol: str, setting: str = DEFAULT_SETTING,
                    shots: tuple[int, ...] | None = None) -> str:
    """The official settings of ``method`` that differ from CoOp's in this protocol and
    setting, e.g. ``"depth 9, n_ctx 2, batch 4, lr 0.0035, epochs 5"`` ('' when none): a
    table's caption names them."""
    if not _method(method).trains:
        return ""
    mine, coop = (_effective(m, method_prompt(m, "ImageNet", setting, protocol=protocol))
                  for m in (method, "coop"))
    parts = [f"{label} {mine[key]}" for key, label in _SHOWN
             if key in mine and mine[key] != coop.get(key)]
    cells = [(d, k) for d in ("dtd", "imagenet") for k in (shots or default_shots(protocol, setting))]
    ours = [official_schedule(protocol, d, k, method, setting) for d, k in cells]
    theirs = [official_schedule(protocol, d, k, "coop", setting) for d, k in cells]
    for name, label in (("batch_size", "batch"), ("lr", "lr")):
        values = sorted({getattr(s, name) for s in ours})
        if values != sorted({getattr(s, name) for s in theirs}):
            parts.append(f"{label} {'/'.join(map(str, values))}")
    if [s.epochs for s in ours] != [s.epochs for s in theirs]:
        parts.append("epochs " + "/".join(map(str, sorted({s.epochs for s in ours}))))
    return ", ".join(parts)
