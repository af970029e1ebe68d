"""What :class:`~prograd_fast.clip.PromptedCLIP` needs of a prompt learner.

A prompt learner owns the learned parameters (the optimiser trains exactly its parameters
that require grad, the trainer checkpoints its ``state_dict``) and builds the prompts the
frozen CLIP encodes.  CoOp's :class:`~prograd_fast.clip.PromptLearner` is one; a new method
subclasses :class:`Learner` (one file), registers itself with
:func:`prograd_fast.methods.register_method` and is then trained by the trainer, the
protocol grid and the CLI without changes to them.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

__all__ = ["Learner", "encode_prompts"]


class Learner(nn.Module):
    """Base class of prompt learners.

    ``classnames`` (list of str) is set by the subclass; label ``i`` is ``classnames[i]``.
    :meth:`forward` returns the text prompts as ``(embeddings (C, L, width), eot (C,))``
    for :class:`~prograd_fast.clip.TextTower` (the positions of the end-of-text tokens).
    The shared-prefix encoder applies where :attr:`shared_prefix_length` is > 0 (then
    :meth:`prefix_and_suffixes` must split the prompts there); the default says it does
    not apply.  :meth:`extra_loss` is a loss of the method's own added to the cross-entropy
    (part of ProGrad's domain loss), computed from the learned class text features; the
    default adds none.  :meth:`moved_to` gives the same learned prompt on other class names
    (base-to-new, cross-data-set tests); the default refuses.

    Two kinds of learner go beyond CoOp's text prompt:

    * ``image_conditioned`` (CoCoOp): the prompts depend on each image, so
      :meth:`text_features` gets the normalised image features (B, D) and returns one set of
      class features per image (B, C, D).
    * ``vision_prompted`` (MaPLe, IVLP, VPT): the learner changes the image features, so the
      image tower runs with grad through :meth:`image_features`; cached image features are
      not valid for it, and the zero-shot teacher gets one extra no-grad pass of the frozen,
      prompt-free image tower.

    ``needs_clip_model``: :class:`~prograd_fast.clip.PromptedCLIP` passes the open_clip model
    to the constructor as ``clip_model=`` (the image tower, the image feature width).
    :meth:`param_groups` gives the optimiser's parameter groups.
    """

    classnames: list[str]
    class_specific: bool = False
    class_token_position: str = "end"
    image_conditioned: bool = False
    vision_prompted: bool = False
    needs_clip_model: bool = False

    def forward(self) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def shared_prefix_length(self) -> int:
        """Leading prompt tokens common to every class (0: none, the encoder is off)."""
        return 0

    @property
    def shared_prefix_off(self) -> str:
        """Why the shared prefix does not apply, when :attr:`shared_prefix_length` is 0."""
        return f"{type(self).__name__} shares no prompt prefix"

    def text_features(self, model: nn.Module, image_features: Tensor | None = None) -> Tensor:
        """Unnormalised class text features with grad: (C, D), or (B, C, D) per image for an
        ``image_conditioned`` learner given normalised ``image_features`` (B, D).  ``model``
        is the :class:`~prograd_fast.clip.PromptedCLIP` (its ``tower``, ``shared_prefix``).
        The default is CoOp's: the shared-prefix encoder where it applies, else the
        (truncated) tower on :meth:`forward`'s prompts."""
        return encode_prompts(model, self)

    def image_features(self, model: nn.Module, images: Tensor) -> Tensor:
        """Unnormalised image features (B, D) of the prompted image tower, with grad (only
        for ``vision_prompted`` learners)."""
        raise NotImplementedError(f"{type(self).__name__} does not prompt the image tower")

    def param_groups(self, split: bool = False) -> list[dict]:
        """The optimiser's parameter groups: one group of every parameter that requires grad
        (ProGrad projects the whole prompt as one vector).  A learner with prompts in both
        towers may return one group per tower (a ``"name"`` key each) when ``split``; a group
        with ``"lam": 0.0`` is never projected."""
        return [{"name": "prompt", "params": [p for p in self.parameters() if p.requires_grad]}]

    def extra_loss(self, text_features: Tensor, zeroshot_features: Tensor) -> Tensor | None:
        """The method's own loss term from the learned class features (C, D, unnormalised)
        and the zero-shot teacher's (normalised); None: no term (CoOp)."""
        return None

    def prefix_and_suffixes(self) -> tuple[Tensor, Tensor]:
        raise ValueError("no prefix is shared by all class prompts")

    def moved_to(self, tower, classnames: Sequence[str], tokenizer: Callable | None = None,
                 **settings) -> "Learner":
        """A learner with this one's learned state on ``classnames``."""
        raise ValueError(f"{type(self).__name__} cannot be moved to other class names")


def encode_prompts(model: nn.Module, learner: nn.Module,
                   deep: Sequence[Tensor] | None = None) -> Tensor:
    """Class text features (C, D) of ``learner``'s prompts in ``model`` (the
    :class:`~prograd_fast.clip.PromptedCLIP`): its shared-prefix encoder where it applies,
    else the (truncated) tower on ``learner()``'s prompts.  ``deep``: deep text prompts
    (MaPLe, IVLP), one (n, width) tensor per block from the second on, replacing the context
    rows (the same in every prompt, inside the shared prefix); none or empty: plain prompts."""
    deep = list(deep) if deep is not None else []
    extra = {"deep": deep} if deep else {}  # plain prompts: the encoders' plain calls
    shared = getattr(model, "shared_prefix", None)
    if shared is not None and shared.applies():
        return shared(*learner.prefix_and_suffixes(), **extra)
    return model.tower.encode_embeddings(*learner(), **extra)
