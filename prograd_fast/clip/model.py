"""CoOp/ProGrad model wrapper: the student's and the zero-shot teacher's logits.

One frozen image pass serves both heads unless the learner prompts the image tower
(MaPLe, IVLP, VPT): then the student's image features come from the prompted tower (with
grad) and the teacher's from one more no-grad pass of the frozen tower."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .learner import encode_prompts
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
    parameters (``prompt_learner``).  A learner class with ``needs_clip_model`` gets the
    open_clip model as ``clip_model=``.  The learner's kind (``image_conditioned``,
    ``vision_prompted``; :class:`~prograd_fast.clip.learner.Learner`) decides where the
    image features come from and whether text features are per image (B, C, D).
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
            build = learner or PromptLearner
            if getattr(build, "needs_clip_model", False):
                prompt_kwargs = {**prompt_kwargs, "clip_model": clip_model}
            self.prompt_learner = build(self.tower, classnames, tokenizer, **prompt_kwargs)
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

    @property
    def image_conditioned(self) -> bool:
        """The learned text features depend on each image (CoCoOp): (B, C, D)."""
        return bool(getattr(self.prompt_learner, "image_conditioned", False))

    @property
    def vision_prompted(self) -> bool:
        """The learner changes the image features (MaPLe, IVLP, VPT): no cached features."""
        return bool(getattr(self.prompt_learner, "vision_prompted", False))

    def student_image_features(self, images: Tensor) -> Tensor:
        """Normalised image features the learned prompt is scored on: the prompted image
        tower's (with grad) for a ``vision_prompted`` learner, else :meth:`encode_image`."""
        if not self.vision_prompted:
            return self.encode_image(images)
        dtype = next(self.clip.visual.parameters()).dtype
        return normalize(self.prompt_learner.image_features(self, images.to(dtype)))

    def student_and_teacher_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised image features of the student and of the zero-shot teacher: one frozen
        pass serves both, unless the learner prompts the image tower (then the teacher gets
        one more no-grad pass of the frozen, prompt-free tower)."""
        student = self.student_image_features(images)
        return student, (self.encode_image(images) if self.vision_prompted else student)

    def text_features(self, image_features: Tensor | None = None) -> Tensor:
        """Unnormalised text features of the learned prompts, with grad: (C, D), or
        (B, C, D) for an image-conditioned learner given normalised ``image_features``."""
        learner = self.prompt_learner
        if self.image_conditioned and image_features is None:
            raise ValueError(f"{type(learner).__name__} builds its prompts from each image: "
                             f"pass the image features")
        hook = getattr(learner, "text_features", None)
        if hook is None:  # a plain nn.Module learner: CoOp's path
            return encode_prompts(self, learner)
        return hook(self, image_features)

    def extra_loss(self, text_features: Tensor) -> Tensor | None:
        """The prompt learner's own loss term (e.g. KgCoOp's knowledge-guided loss), added to
        the cross-entropy by the training step; None when it has none."""
        hook = getattr(self.prompt_learner, "extra_loss", None)
        return hook(text_features, self.teacher()) if hook is not None else None

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Scaled cosine logits (B, C) from normalised image features (B, D) and raw text
        features, (C, D) or one set per image (B, C, D)."""
        return self._scaled(image_features, normalize(text_features))

    def zeroshot_logits(self, image_features: Tensor) -> Tensor:
        """The teacher's logits (no grad: its features are a buffer)."""
        return self._scaled(image_features, self.teacher())

    def _scaled(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        dtype = image_features.dtype
        text_features = text_features.to(dtype)
        if text_features.dim() == 3:  # per image: (B, D) x (B, C, D) -> (B, C)
            sims = torch.bmm(text_features, image_features.unsqueeze(-1)).squeeze(-1)
        else:
            sims = image_features @ text_features.t()
        out = self.logit_scale.to(dtype) * sims
        bias = getattr(self.clip, "logit_bias", None)
        return out + bias.detach().to(dtype) if bias is not None else out

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, zeroshot_logits)`` of ``images``."""
        student, teacher = self.student_and_teacher_features(images)
        return (self.logits(student, self.text_features(student)),
                self.zeroshot_logits(teacher))
