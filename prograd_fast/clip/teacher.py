"""The zero-shot teacher: hand-crafted templates, text features computed once and cached."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .prompt import _tokenize, default_tokenizer
from .tower import TextTower, normalize

__all__ = ["ZeroShotTeacher", "COOP_TEMPLATES", "PROGRAD_TEMPLATES", "KGCOOP_TEMPLATES", "TEMPLATE_SETS", "TEMPLATES",
           "get_templates"]

#: CoOp's per-dataset hand-crafted templates (CoOp ``zsclip.py`` CUSTOM_TEMPLATES), plus the
#: default and the embedded digits task.
COOP_TEMPLATES: dict[str, str] = {
    "default": "a photo of a {}.",
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
    "digits": "a handwritten {}.",
}

#: Official ProGrad's teacher templates (Prompt-align ``trainers/prograd.py`` CUSTOM_TEMPLATES):
#: they differ from CoOp's on OxfordPets, OxfordFlowers, FGVCAircraft, DescribableTextures and
#: Food101 ("a type of pet, a photo of a {}."), so the general gradient differs there too.
PROGRAD_TEMPLATES: dict[str, str] = {
    **COOP_TEMPLATES,
    "OxfordPets": "a type of pet, a photo of a {}.",
    "OxfordFlowers": "a type of flower, a photo of a {}.",
    "FGVCAircraft": "a type of aircraft, a photo of a {}.",
    "DescribableTextures": "a texture of {}.",
    "Food101": "a type of food, a photo of {}.",
}

#: KgCoOp's templates (its ``trainers/kgcoop.py`` CUSTOM_TEMPLATES), the targets of its
#: knowledge-guided loss: CoOp's except DescribableTextures.
KGCOOP_TEMPLATES: dict[str, str] = {
    **COOP_TEMPLATES,
    "DescribableTextures": "a photo of a {}, a type of texture.",
}

#: The template sets by name: ``"coop"`` (CoOp's zero-shot CLIP) and ``"prograd"`` (the
#: official ProGrad trainer's teacher) and ``"kgcoop"`` (KgCoOp's).
TEMPLATE_SETS: dict[str, dict[str, str]] = {"coop": COOP_TEMPLATES, "prograd": PROGRAD_TEMPLATES,
                                             "kgcoop": KGCOOP_TEMPLATES}

#: CoOp's set (kept under its old name).
TEMPLATES = COOP_TEMPLATES


def get_templates(spec: str | Sequence[str] | None, template_set: str = "coop") -> list[str]:
    """Templates from a dataset name in the set ``template_set`` of :data:`TEMPLATE_SETS`
    (case-insensitive), ``"openai_imagenet"`` (the 80-template OpenAI ensemble shipped with
    open_clip), a template string containing ``{}``, or a list of those.  ``None`` is the
    default template."""
    if template_set not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {template_set!r}: use one of {sorted(TEMPLATE_SETS)}")
    templates = TEMPLATE_SETS[template_set]
    if spec is None:
        return [templates["default"]]
    if not isinstance(spec, str):
        out = [t for s in spec for t in get_templates(s, template_set)]
        if not out:
            raise ValueError("empty template list")
        return out
    if "{}" in spec:
        return [spec]
    if spec.lower() == "openai_imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    lookup = {k.lower(): v for k, v in templates.items()}
    if spec.lower() not in lookup:
        raise ValueError(f"unknown template {spec!r}: use a string with '{{}}', "
                         f"'openai_imagenet' or one of {sorted(templates)}")
    return [lookup[spec.lower()]]


class ZeroShotTeacher(nn.Module):
    """Normalised zero-shot class features (C, D) from hand-crafted templates.

    Computed once at construction (no grad), averaged over the template ensemble and
    renormalised, and kept as a buffer: the teacher costs nothing per training step.
    """

    def __init__(self, tower: TextTower, classnames: Sequence[str],
                 templates: str | Sequence[str] | None = None, tokenizer: Callable | None = None,
                 batch_size: int = 256, template_set: str = "coop") -> None:
        super().__init__()
        self.templates = get_templates(templates, template_set)
        tokenizer = tokenizer if tokenizer is not None else default_tokenizer(tower.context_length)
        names = [str(c).replace("_", " ") for c in classnames]
        device = tower.token_embedding.weight.device
        feats = []
        with torch.no_grad():
            for template in self.templates:
                texts = [template.format(n) for n in names]
                tokens = _tokenize(tokenizer, texts, tower.context_length).to(device)
                out = torch.cat([tower.encode_tokens(tokens[i:i + batch_size])
                                 for i in range(0, len(texts), batch_size)])
                # at least fp32 (fp16 towers), fp64 stays fp64
                feats.append(normalize(out.to(torch.promote_types(out.dtype, torch.float32))))
            features = normalize(torch.stack(feats).mean(0))
        self.register_buffer("text_features", features, persistent=False)

    def forward(self) -> Tensor:
        return self.text_features
