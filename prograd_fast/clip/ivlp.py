"""IVLP: independent deep vision and language prompts (the MaPLe paper's baseline).

The text tower learns a context ``ctx`` (``n_ctx_text`` tokens after [SOS]) and deep text
prompts replacing those rows before blocks ``1 .. depth_text-1``; the image tower learns its
own prompts, as VPT-deep (:mod:`prograd_fast.clip.vpt`), not coupled to the text ones.
``n_ctx_vision=0, depth_vision=0`` is deep language prompting alone (the official
``language_only`` config): the image features are then CLIP's and are shared with the
teacher.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .deep_prompts import (DeepTextLearner, DeepTextPrompts, check_depth, check_vision_tower,
                           prompted_image_features, tower_layers)
from .learner import encode_prompts
from .tower import TextTower
from .vpt import vision_prompts

__all__ = ["IVLPLearner", "IVLP_N_CTX_TEXT", "IVLP_N_CTX_VISION", "IVLP_DEPTH_TEXT",
           "IVLP_DEPTH_VISION", "IVLP_CTX_INIT"]

# configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml (train.py's defaults say 9 / 9;
# the config the official scripts run says 12 / 12)
IVLP_N_CTX_TEXT = 2
IVLP_N_CTX_VISION = 2
IVLP_DEPTH_TEXT = 12
IVLP_DEPTH_VISION = 12
IVLP_CTX_INIT = "a photo of a"


class IVLPLearner(DeepTextLearner):
    """Independent deep prompts in both towers of an open_clip model (ViT image tower when
    vision prompts are on).

    Settings (official defaults): ``n_ctx_text=2``, ``depth_text=12``, ``ctx_init="a photo
    of a"`` (the text context starts from its first ``n_ctx_text`` token embeddings, its
    other words stay in the prompt, fixed), ``n_ctx_vision=2``, ``depth_vision=12``.
    Parameters: ``ctx`` (n_ctx_text, text width), ``deep_text`` (depth_text - 1 of that
    shape), ``ctx_vision`` (n_ctx_vision, vision width), ``deep_vision`` (depth_vision - 1);
    the deep and vision prompts are drawn from N(0, 0.02^2).
    """

    vision_prompted = True
    needs_clip_model = True

    def __init__(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, *, clip_model: nn.Module,
                 n_ctx_text: int = IVLP_N_CTX_TEXT, n_ctx_vision: int = IVLP_N_CTX_VISION,
                 depth_text: int = IVLP_DEPTH_TEXT, depth_vision: int = IVLP_DEPTH_VISION,
                 ctx_init: str | None = IVLP_CTX_INIT) -> None:
        super().__init__()
        if n_ctx_text < 1 or depth_text < 1:
            raise ValueError(f"IVLP needs n_ctx_text >= 1 and depth_text >= 1 (vision prompts "
                             f"alone: use VPT), got {n_ctx_text} and {depth_text}")
        check_depth("IVLP", depth_text, n_ctx_text, tower_layers(tower.transformer), "text")
        visual = clip_model.visual
        if n_ctx_vision or depth_vision:
            check_vision_tower(visual)
            check_depth("IVLP", depth_vision, n_ctx_vision, tower_layers(visual.transformer),
                        "image")
        self.text = DeepTextPrompts(tower, classnames, tokenizer, n_ctx_text, ctx_init, "IVLP")
        dtype = torch.promote_types(tower.dtype, torch.float32)
        device = tower.token_embedding.weight.device
        self.ctx = nn.Parameter(self.text.initial_ctx.to(dtype=dtype, device=device))
        del self.text.initial_ctx
        self.deep_text = nn.ParameterList([
            nn.Parameter(torch.empty(n_ctx_text, tower.width, dtype=dtype, device=device)
                         .normal_(0.0, 0.02)) for _ in range(depth_text - 1)])
        self.vision_prompted = n_ctx_vision > 0  # language only: CLIP's image features
        if self.vision_prompted:
            self.ctx_vision, self.deep_vision = vision_prompts(
                n_ctx_vision, depth_vision, int(visual.class_embedding.shape[-1]), dtype, device)
        self.classnames = self.text.classnames
        self.n_ctx_text, self.n_ctx_vision = n_ctx_text, n_ctx_vision
        self.depth_text, self.depth_vision = depth_text, depth_vision
        self.ctx_init = ctx_init or None
        self.__dict__["_clip_model"] = clip_model  # not a submodule: its weights stay CLIP's

    def text_features(self, model, image_features: Tensor | None = None) -> Tensor:
        return encode_prompts(model, self, list(self.deep_text))

    def image_features(self, model, images: Tensor) -> Tensor:
        if not self.vision_prompted:
            raise NotImplementedError("IVLP without vision prompts does not prompt the image tower")
        return prompted_image_features(model.clip.visual, images, self.ctx_vision,
                                       list(self.deep_vision))

    def param_groups(self, split: bool = False) -> list[dict]:
        """One group, or ``"text"`` and ``"vision"`` (when there are vision prompts) when
        ``split``."""
        text = [self.ctx, *self.deep_text]
        vision = [self.ctx_vision, *self.deep_vision] if self.vision_prompted else []
        if not split or not vision:
            return [{"params": text + vision, "name": "prompt"}]
        return [{"params": text, "name": "text"}, {"params": vision, "name": "vision"}]

    def moved_to(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, ctx_init: str | None = None,
                 clip_model: nn.Module | None = None, **settings) -> "IVLPLearner":
        """The learned prompts on other class names (the context's fixed words as here)."""
        other = IVLPLearner(tower, classnames, tokenizer,
                            clip_model=clip_model if clip_model is not None else self._clip_model,
                            n_ctx_text=self.n_ctx_text, n_ctx_vision=self.n_ctx_vision,
                            depth_text=self.depth_text, depth_vision=self.depth_vision,
                            ctx_init=self.ctx_init)
        other.load_state_dict(self.state_dict())
        return other
