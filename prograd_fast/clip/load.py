"""Building an open_clip model the way CoOp's OpenAI CLIP is built."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["load_open_clip"]


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
