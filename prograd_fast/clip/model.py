"""CoOp/ProGrad model wrapper: one image pass gives the student's and the teacher's logits."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .prompt import PromptLearner
from .shared_prefix import DEFAULT_LAYOUT, shared_prefix_encoder
from .teacher import ZeroShotTeacher
from .tower import TextTower, normalize

__all__ = ["PromptedCLIP"]


class PromptedCLIP(nn.Module):
    """A frozen open_clip model, a :class:`PromptLearner` and a :class:`ZeroShotTeacher`.

    ``forward(images)`` returns ``(logits, zeroshot_logits)``: the image encoder runs once
    and its features serve both heads (the teacher is the same frozen CLIP, so a second
    image pass as in the paper's loop would recompute the same features).  Only the
    prompt learner's parameters require grad.  ``templates`` / ``template_set`` choose the
    teacher's prompts (:func:`prograd_fast.clip.get_templates`).

    ``share_prefix=True`` encodes the prompt prefix common to all classes ([SOS] and the
    shared context before the class name) once per step
    (:mod:`prograd_fast.clip.shared_prefix`) wherever that is exact, ``"bucketed"`` /
    ``"packed"`` / ``"padded"`` also choose how the class suffixes are laid out;
    ``shared_prefix`` is that encoder (``None`` when off) and ``shared_prefix_off`` says why
    it is off.  ``share_prefix=False`` runs every prompt through the (truncated) tower.

    ``learner`` is the prompt learner (:class:`~prograd_fast.clip.learner.Learner`): a built
    one, or what builds it, ``learner(tower, classnames, tokenizer, **prompt_kwargs)``;
    None builds CoOp's :class:`PromptLearner` from ``prompt_kwargs``.  It owns the trained
    parameters (``prompt_learner``).
    """

    def __init__(self, clip_model: nn.Module, classnames: Sequence[str],
                 tokenizer: Callable | None = None, templates: str | Sequence[str] | None = None,
                 template_set: str = "coop", share_prefix: bool | str = True,
                 learner: nn.Module | Callable | None = None, **prompt_kwargs) -> None:
        super().__init__()
        self.tower = TextTower.from_model(clip_model)
        self.clip = clip_model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()
        if isinstance(learner, nn.Module):  # given, built on these class names
            if prompt_kwargs:
                raise TypeError(f"prompt settings {sorted(prompt_kwargs)} go to the learner's "
                                f"constructor, not beside a built learner")
            self.prompt_learner = learner
        else:
            self.prompt_learner = (learner or PromptLearner)(self.tower, classnames, tokenizer,
                                                             **prompt_kwargs)
        self.teacher = ZeroShotTeacher(self.tower, classnames, templates, tokenizer,
                                       template_set=template_set)
        self.classnames = list(self.prompt_learner.classnames)
        self.share_prefix = share_prefix  # as asked (transfer_context passes it on)
        if share_prefix is False:
            self.shared_prefix, self.shared_prefix_off = None, "share_prefix=False"
        else:
            layout = DEFAULT_LAYOUT if share_prefix is True else share_prefix
            self.shared_prefix, self.shared_prefix_off = shared_prefix_encoder(
                self.tower, self.prompt_learner, layout)

    def train(self, mode: bool = True) -> "PromptedCLIP":
        super().train(mode)
        self.clip.eval()  # frozen: dropout / norm statistics never change
        return self

    @property
    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.detach().exp()

    def encode_image(self, images: Tensor) -> Tensor:
        """Normalised image features, without grad (the image tower is frozen)."""
        with torch.no_grad():
            dtype = next(self.clip.visual.parameters()).dtype
            return normalize(self.clip.encode_image(images.to(dtype)))

    def text_features(self) -> Tensor:
        """Unnormalised text features of the learned prompts (C, D), with grad."""
        shared = self.shared_prefix
        if shared is not None and shared.applies():
            return shared(*self.prompt_learner.prefix_and_suffixes())
        return self.tower.encode_embeddings(*self.prompt_learner())

    def extra_loss(self, text_features: Tensor) -> Tensor | None:
        """The prompt learner's own loss term (e.g. KgCoOp's knowledge-guided loss), added to
        the cross-entropy by the training step; None when it has none."""
        hook = getattr(self.prompt_learner, "extra_loss", None)
        return hook(text_features, self.teacher()) if hook is not None else None

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Scaled cosine logits from normalised image features and raw text features."""
        return self._scaled(image_features, normalize(text_features))

    def zeroshot_logits(self, image_features: Tensor) -> Tensor:
        """The teacher's logits (no grad: its features are a buffer)."""
        return self._scaled(image_features, self.teacher())

    def _scaled(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        dtype = image_features.dtype
        out = self.logit_scale.to(dtype) * image_features @ text_features.to(dtype).t()
        bias = getattr(self.clip, "logit_bias", None)
        return out + bias.detach().to(dtype) if bias is not None else out

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        image_features = self.encode_image(images)
        return (self.logits(image_features, self.text_features()),
                self.zeroshot_logits(image_features))
