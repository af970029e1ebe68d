"""Building a CLIP model: by name, JSON config or the embedded digits model, the way CoOp's
OpenAI CLIP is built."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_open_clip", "load_model", "ModelLoadError"]


def load_open_clip(name: str, pretrained: str | None = None,
                   device: str | torch.device = "cpu") -> nn.Module:
    """``open_clip.create_model(name, pretrained)`` in eval mode, with the activation the
    weights were trained with.

    open_clip builds ``ViT-B-16`` with GELU even for OpenAI's weights, which were trained
    with QuickGELU (it only warns): the features then differ from CoOp's CLIP.  Here a
    pretrained tag whose open_clip metadata says ``quick_gelu`` builds the model with
    QuickGELU, as ``clip.load`` does.  ``pretrained`` is a tag (``"openai"``), a
    checkpoint file, or ``None`` for random weights.
    """
    import open_clip

    if pretrained is not None and not isinstance(pretrained, str):
        raise TypeError(f"pretrained must be a tag, a file path or None, got {pretrained!r}")
    quick_gelu = bool(pretrained) and bool(
        open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
    model = open_clip.create_model(name, pretrained=pretrained or None, device=device,
                                   force_quick_gelu=quick_gelu)
    return model.eval()


class ModelLoadError(ValueError):
    """A model name or weights that cannot be loaded (one line naming them)."""


def load_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """``(clip_model, tokenizer, image_size, mean, std)`` for an open_clip model name (or an
    ``hf-hub:`` / ``local-dir:`` name), a JSON model config (``pretrained``: a state-dict
    file) or ``"digits"`` (the embedded tiny CLIP); :class:`ModelLoadError` when it cannot."""
    import open_clip

    schema = ":" in name  # open_clip's "hf-hub:org/repo" / "local-dir:path" names
    if name != "digits" and not name.endswith(".json") and not schema \
            and name not in open_clip.list_models():
        raise ModelLoadError(f"unknown --model {name!r}: use an open_clip model name (see "
                             f"open_clip.list_models()), a JSON model config file or 'digits'")
    try:
        return _build_model(name, pretrained, device)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        what = f"--model {name!r}" + (f" with --pretrained {pretrained!r}" if pretrained else "")
        text = " ".join(str(exc).split()) or type(exc).__name__
        text = text if len(text) <= 400 else text[:397] + "..."
        raise ModelLoadError(f"cannot load {what}: {text}") from exc


def _build_model(name: str, pretrained: str | None, device):
    import open_clip

    from . import digits as D
    from .data import OPENAI_MEAN, OPENAI_STD
    from .prompt import default_tokenizer

    if name == "digits":
        model, _ = D.load_tiny_clip()
        cfg = D.TINY_CLIP_CONFIG
        return (model.to(device), default_tokenizer(cfg["text_cfg"]["context_length"]),
                cfg["vision_cfg"]["image_size"], D.MEAN, D.STD)
    if name.endswith(".json"):
        cfg = json.loads(Path(name).read_text())
        cfg = cfg.get("model_cfg", cfg)
        cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
        model = cls(**cfg)
        if pretrained:
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
        ctx_len = cfg.get("text_cfg", {}).get("context_length", 77)
        size = cfg.get("vision_cfg", {}).get("image_size", 224)
        return model.to(device).eval(), default_tokenizer(ctx_len), size, OPENAI_MEAN, OPENAI_STD
    model = load_open_clip(name, pretrained or None, device=device)
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pre.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = pre.get("mean", getattr(model.visual, "image_mean", None) or OPENAI_MEAN)
    std = pre.get("std", getattr(model.visual, "image_std", None) or OPENAI_STD)
    return model.eval(), open_clip.get_tokenizer(name), int(size), tuple(mean), tuple(std)
