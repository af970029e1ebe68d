"""MaPLe (Khattak et al., CVPR 2023): coupled deep vision-language prompts.

The text tower learns a context ``ctx`` (``n_ctx`` tokens after [SOS]) and, for blocks
``1 .. depth-1``, deep text prompts that replace those rows; the image tower gets the same
prompts mapped by linear layers (text width -> vision width): ``proj(ctx)`` appended to the
image tokens, ``compound_prompt_projections[k](compound_prompts_text[k])`` replacing them
before block ``k + 1``.  Vision and language prompts are coupled: each vision prompt is a
function of a text prompt (:mod:`prograd_fast.clip.deep_prompts` has the prompted forward).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .deep_prompts import (DeepTextLearner, DeepTextPrompts, check_depth, check_vision_tower,
                           prompted_image_features, tower_layers)
from .learner import encode_prompts
from .tower import TextTower

__all__ = ["MaPLeLearner", "MAPLE_N_CTX", "MAPLE_DEPTH", "MAPLE_CTX_INIT"]

# configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml
MAPLE_N_CTX = 2
MAPLE_DEPTH = 9
MAPLE_CTX_INIT = "a photo of a"
_FIXED_KEYS = ("token_prefix", "token_suffix")  # official checkpoints hold these: rebuilt here


def _param_dtype(tower: TextTower) -> torch.dtype:
    """fp32 prompts (an fp32 master copy for an fp16 / bf16 model); fp64 for an fp64 model."""
    return torch.promote_types(tower.dtype, torch.float32)


class MaPLeLearner(DeepTextLearner):
    """MaPLe's multi-modal prompt learner on an open_clip model with a ViT image tower.

    Settings (official defaults): ``n_ctx=2`` context tokens, ``depth=9`` (layers 0 .. 8 of
    both towers carry prompts; 1 is shallow MaPLe), ``ctx_init="a photo of a"`` (the context
    starts from its first ``n_ctx`` token embeddings; its other words stay in the prompt,
    fixed).  Parameters, named as in the official ``MultiModalPromptLearner`` (its
    checkpoints' prompt-learner entries load): ``ctx`` (n_ctx, text width), ``proj`` (text
    width -> vision width), ``compound_prompts_text`` (depth - 1 of (n_ctx, text width),
    N(0, 0.02^2)) and ``compound_prompt_projections`` (depth - 1 copies of one initial
    linear layer).  The widths come from the model (the official code fixes 512 and 768,
    ViT-B/16's).
    """

    vision_prompted = True
    needs_clip_model = True

    def __init__(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, *, clip_model: nn.Module,
                 n_ctx: int = MAPLE_N_CTX, depth: int = MAPLE_DEPTH,
                 ctx_init: str | None = MAPLE_CTX_INIT) -> None:
        super().__init__()
        visual = clip_model.visual
        check_vision_tower(visual)
        if n_ctx < 1 or depth < 1:
            raise ValueError(f"MaPLe needs n_ctx >= 1 and depth >= 1, got n_ctx={n_ctx}, "
                             f"depth={depth}")
        check_depth("MaPLe", depth, n_ctx, tower_layers(tower.transformer), "text")
        check_depth("MaPLe", depth, n_ctx, tower_layers(visual.transformer), "image")
        self.text = DeepTextPrompts(tower, classnames, tokenizer, n_ctx, ctx_init, "MaPLe")
        dtype, device = _param_dtype(tower), tower.token_embedding.weight.device
        text_width, vision_width = tower.width, int(visual.class_embedding.shape[-1])
        factory = dict(dtype=dtype, device=device)
        # the official order of initialisation: ctx, proj, deep text prompts, one projection
        self.ctx = nn.Parameter(self.text.initial_ctx.to(**factory))
        self.proj = nn.Linear(text_width, vision_width, **factory)
        self.compound_prompts_text = nn.ParameterList([
            nn.Parameter(torch.empty(n_ctx, text_width, **factory).normal_(0.0, 0.02))
            for _ in range(depth - 1)])
        single = nn.Linear(text_width, vision_width, **factory)
        self.compound_prompt_projections = nn.ModuleList(
            [copy.deepcopy(single) for _ in range(depth - 1)])
        del self.text.initial_ctx
        self.classnames = self.text.classnames
        self.n_ctx, self.depth, self.ctx_init = n_ctx, depth, ctx_init or None
        self.__dict__["_clip_model"] = clip_model  # not a submodule: its weights stay CLIP's

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for key in _FIXED_KEYS:
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # prompts
    def deep_text(self) -> list[Tensor]:
        return list(self.compound_prompts_text)

    def vision_prompts(self) -> tuple[Tensor, list[Tensor]]:
        """``(shallow (n_ctx, vision width), deep)``: the text prompts mapped to the image tower."""
        deep = [layer(p) for layer, p in zip(self.compound_prompt_projections,
                                             self.compound_prompts_text)]
        return self.proj(self.ctx), deep

    # the contract's hooks
    def text_features(self, model, image_features: Tensor | None = None) -> Tensor:
        return encode_prompts(model, self, self.deep_text())

    def image_features(self, model, images: Tensor) -> Tensor:
        return prompted_image_features(model.clip.visual, images, *self.vision_prompts())

    def param_groups(self, split: bool = False) -> list[dict]:
        """One group, or ``"text"`` (ctx, deep text prompts) and ``"vision"`` (the
        projections that map them to the image tower) when ``split``."""
        text = [self.ctx, *self.compound_prompts_text]
        vision = [*self.proj.parameters(), *self.compound_prompt_projections.parameters()]
        if not split:
            return [{"params": text + vision, "name": "prompt"}]
        return [{"params": text, "name": "text"}, {"params": vision, "name": "vision"}]

    def moved_to(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, ctx_init: str | None = None,
                 clip_model: nn.Module | None = None, **settings) -> "MaPLeLearner":
        """The learned prompts on other class names (the context's fixed words as here)."""
        other = MaPLeLearner(tower, classnames, tokenizer,
                             clip_model=clip_model if clip_model is not None else self._clip_model,
                             n_ctx=self.n_ctx, depth=self.depth, ctx_init=self.ctx_init)
        other.load_state_dict(self.state_dict())
        return other
