"""VPT-deep (vision prompts only), as the multimodal-prompt-learning code trains it on CLIP.

The image tower learns ``n_ctx_vision`` prompt tokens appended to the image tokens and, for
blocks ``1 .. depth_vision-1``, deep prompts that replace them
(:func:`~prograd_fast.clip.deep_prompts.prompted_image_features`).  The text side is fixed:
the class features of the hand-crafted prompt "a photo of a {}." (the official ``VPT``
trainer's ``FixedEmbeddings``), encoded once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .deep_prompts import check_depth, check_vision_tower, prompted_image_features, tower_layers
from .learner import Learner
from .prompt import _tokenize, default_tokenizer
from .tower import TextTower

__all__ = ["VPTLearner", "VPT_N_CTX", "VPT_DEPTH", "VPT_TEXT_TEMPLATE", "vision_prompts"]

# configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml
VPT_N_CTX = 8
VPT_DEPTH = 12
VPT_TEXT_TEMPLATE = "a photo of a {}."  # the official VPT trainer's fixed class prompts


def vision_prompts(n_ctx: int, depth: int, width: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[nn.Parameter, nn.ParameterList]:
    """The shallow vision prompt (n_ctx, width) and ``depth - 1`` deep ones, N(0, 0.02^2)
    as the official towers draw them (shallow first, then block by block)."""
    def draw() -> nn.Parameter:
        return nn.Parameter(torch.empty(n_ctx, width, dtype=dtype, device=device).normal_(0, 0.02))
    shallow = draw()
    return shallow, nn.ParameterList([draw() for _ in range(depth - 1)])


class VPTLearner(Learner):
    """Deep vision prompts on an open_clip model with a ViT image tower, the text fixed.

    Settings (official defaults): ``n_ctx_vision=8`` prompt tokens, ``depth_vision=12``
    (blocks 0 .. 11 carry prompts; 1 is shallow VPT), ``text_template`` the fixed class
    prompt.  Parameters: ``ctx_vision`` (n_ctx_vision, vision width) and ``deep_vision``
    (depth_vision - 1 of the same shape).  The class text features have no grad.
    """

    vision_prompted = True
    needs_clip_model = True

    def __init__(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, *, clip_model: nn.Module,
                 n_ctx_vision: int = VPT_N_CTX, depth_vision: int = VPT_DEPTH,
                 text_template: str = VPT_TEXT_TEMPLATE) -> None:
        super().__init__()
        visual = clip_model.visual
        check_vision_tower(visual)
        if n_ctx_vision < 1 or depth_vision < 1:
            raise ValueError(f"VPT needs n_ctx_vision >= 1 and depth_vision >= 1, got "
                             f"{n_ctx_vision} and {depth_vision}")
        check_depth("VPT", depth_vision, n_ctx_vision, tower_layers(visual.transformer), "image")
        if not classnames:
            raise ValueError("VPT: classnames is empty")
        if "{}" not in text_template:
            raise ValueError(f"VPT: text_template {text_template!r} has no class slot '{{}}'")
        self.classnames = [str(c).replace("_", " ") for c in classnames]
        dtype = torch.promote_types(tower.dtype, torch.float32)
        device = tower.token_embedding.weight.device
        self.ctx_vision, self.deep_vision = vision_prompts(
            n_ctx_vision, depth_vision, int(visual.class_embedding.shape[-1]), dtype, device)
        tokenizer = tokenizer if tokenizer is not None else default_tokenizer(tower.context_length)
        with torch.no_grad():
            tokens = _tokenize(tokenizer, [text_template.format(c) for c in self.classnames],
                               tower.context_length).to(device)
            fixed = tower.encode_tokens(tokens)
        self.register_buffer("fixed_text_features", fixed, persistent=False)
        self.n_ctx_vision, self.depth_vision = n_ctx_vision, depth_vision
        self.text_template = text_template
        self.__dict__["_clip_model"] = clip_model  # not a submodule: its weights stay CLIP's

    @property
    def shared_prefix_off(self) -> str:
        return "VPT learns no text prompt: its class text features are fixed"

    def forward(self) -> tuple[Tensor, list[Tensor]]:
        """The vision prompts: ``(shallow, deep)``."""
        return self.ctx_vision, list(self.deep_vision)

    def text_features(self, model, image_features: Tensor | None = None) -> Tensor:
        """The fixed class features (C, D), without grad."""
        return self.fixed_text_features

    def image_features(self, model, images: Tensor) -> Tensor:
        return prompted_image_features(model.clip.visual, images, *self())

    def param_groups(self, split: bool = False) -> list[dict]:
        """One group: the vision prompts (``"vision"``)."""
        return [{"params": [self.ctx_vision, *self.deep_vision], "name": "vision"}]

    def moved_to(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, clip_model: nn.Module | None = None,
                 **settings) -> "VPTLearner":
        """The learned vision prompts with the fixed text features of other class names."""
        settings.pop("ctx_init", None)  # no text context to move
        other = VPTLearner(tower, classnames, tokenizer,
                           clip_model=clip_model if clip_model is not None else self._clip_model,
                           n_ctx_vision=self.n_ctx_vision, depth_vision=self.depth_vision,
                           text_template=self.text_template)
        other.load_state_dict(self.state_dict())
        return other
