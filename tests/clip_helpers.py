"""Tiny randomly initialised open_clip models for the prograd_fast.clip tests."""

from __future__ import annotations

import open_clip
import torch

CLASSNAMES = ["dog", "cat", "golden retriever", "sea_lion", "x", "traffic light", "a"]


def tiny_cfg(context_length: int = 77, **text) -> dict:
    text_cfg = dict(context_length=context_length, vocab_size=49408, width=32, heads=2, layers=2)
    text_cfg.update(text)
    return dict(embed_dim=24, vision_cfg=dict(image_size=16, layers=1, width=32, patch_size=8,
                                              head_width=16),
                text_cfg=text_cfg)


def tiny_clip(seed: int = 0, **text) -> open_clip.CLIP:
    torch.manual_seed(seed)
    model = open_clip.CLIP(**tiny_cfg(**text))
    return model.eval()
