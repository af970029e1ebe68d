"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context shifted for each image by a meta-net.

A small meta-net (Linear D -> D/16, ReLU, Linear -> text width) maps the normalised image
feature of image ``b`` to a bias ``pi_b`` added to every learned context vector, so the
prompt of class ``c`` for image ``b`` is ``[SOT] ctx_1+pi_b .. ctx_n+pi_b CLASSNAME_c .
[EOT]``: one prompt per (image, class), text features (B, C, D).  The context depends on the
image, not on the class, so the prefix ``[SOT] ctx+pi_b`` is shared by the image's class
prompts: the shared-prefix encoder runs it once per image and batches the class suffixes
(exact, as for CoOp).  The image tower is not prompted: the frozen image features serve
the meta-net, the logits and ProGrad's zero-shot teacher alike (see docs/coop.md).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .prompt import PromptLearner
from .tower import TextTower

__all__ = ["CoCoOpLearner", "COCOOP_CTX_INIT", "COCOOP_N_CTX"]

COCOOP_N_CTX = 4  # TRAINER.COCOOP.N_CTX of vit_b16_c4_ep10_batch1_ctxv1.yaml
COCOOP_CTX_INIT = "a photo of a"  # its CTX_INIT
_META_REDUCTION = 16  # the meta-net's hidden width is the image feature width // 16


def _text_feature_dim(tower: TextTower) -> int:
    """Width of the tower's text features (that of the image features they are compared to)."""
    proj = tower.text_projection
    if proj is None:
        return tower.width
    return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1])


class CoCoOpLearner(PromptLearner):
    """CoCoOp's prompt learner: a generic context ``ctx`` (n_ctx, width) and the meta-net
    ``meta_net`` (``linear1``, ``relu``, ``linear2``: the official names, so an official
    checkpoint's ``state_dict`` loads).

    ``clip_model`` gives the image feature width (``clip_model.visual.output_dim``, as the
    official code; else the text features' width; or pass ``image_dim``).  ``ctx_init``
    initialises the context as the official code does: its space-separated words count the
    context vectors (``n_ctx``, default: that count; a different ``n_ctx`` is refused),
    which are the embeddings of its first tokens; the prompt text is
    ``ctx_init + " " + classname + "."``.  ``ctx_init=None``: ``n_ctx``
    (default 4) vectors drawn from N(0, 0.02^2).  ``dtype`` of the context and the meta-net
    (None: the tower's).  The context and the meta-net are drawn in the official order
    (context, then ``linear1``, ``linear2``), so the same seed gives the same start.
    """

    image_conditioned = True
    needs_clip_model = True

    def __init__(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, *, clip_model: nn.Module | None = None,
                 n_ctx: int | None = None, ctx_init: str | None = COCOOP_CTX_INIT,
                 image_dim: int | None = None, dtype: torch.dtype | None = None,
                 truncate: bool = True, init_std: float = 0.02, class_specific: bool = False,
                 class_token_position: str = "end") -> None:
        if class_specific:
            raise ValueError("CoCoOp learns one generic context (class_specific=True is not "
                             "part of the method)")
        if class_token_position != "end":
            raise ValueError(f"CoCoOp puts the class name after the context "
                             f"(class_token_position 'end'), got {class_token_position!r}")
        if image_dim is None:
            image_dim = getattr(getattr(clip_model, "visual", None), "output_dim", None)
            if image_dim is None:  # e.g. a timm image tower: the features it is compared with
                image_dim = _text_feature_dim(tower)
        if image_dim < _META_REDUCTION:
            raise ValueError(f"the image feature width ({image_dim}) must be >= "
                             f"{_META_REDUCTION}: the meta-net's hidden width is it // 16")
        words = len(ctx_init.replace("_", " ").split(" ")) if ctx_init else None
        if words is not None and n_ctx is not None and n_ctx != words:
            raise ValueError(f"n_ctx ({n_ctx}) differs from the {words} words of ctx_init "
                             f"{ctx_init!r}, which set it; pass ctx_init=None for {n_ctx} "
                             f"randomly initialised vectors")
        n_ctx = words if words is not None else (COCOOP_N_CTX if n_ctx is None else n_ctx)
        # official ProGrad's init with n_ctx == words is official CoCoOp's: the first
        # ``words`` token embeddings of ctx_init, the prompt text ctx_init + classname
        super().__init__(tower, classnames, tokenizer, n_ctx=n_ctx, ctx_init=ctx_init,
                         dtype=dtype, truncate=truncate, init_std=init_std,
                         ctx_init_mode="prograd")
        width = self.ctx.shape[-1]
        hidden = image_dim // _META_REDUCTION
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(image_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, width)),
        ])).to(device=self.ctx.device, dtype=self.ctx.dtype)
        self.image_dim = int(image_dim)

    def context(self, image_features: Tensor) -> Tensor:
        """The context of each image: ``ctx + meta_net(image_features)`` (B, n_ctx, width),
        in the context's dtype, from normalised image features (B, D)."""
        if image_features.dim() != 2 or image_features.shape[1] != self.image_dim:
            raise ValueError(f"expected normalised image features (B, {self.image_dim}), got "
                             f"{tuple(image_features.shape)}")
        bias = self.meta_net(image_features.to(self.ctx.dtype))
        return self.ctx.unsqueeze(0) + bias.unsqueeze(1)

    def prefix_and_suffixes(self, image_features: Tensor) -> tuple[Tensor, Tensor]:
        """``(prefixes (B, 1 + n_ctx, width), suffixes (C, S, width))``: each image's
        ``[SOT] ctx+pi_b`` and the class suffixes (a buffer, the same for every image)."""
        ctx = self.context(image_features).to(self.token_prefix.dtype)
        sot = self.token_prefix[:1].expand(ctx.shape[0], -1, -1)
        return torch.cat([sot, ctx], dim=1), self.token_suffix

    def forward(self, image_features: Tensor) -> tuple[Tensor, Tensor]:
        """Every (image, class) prompt for :meth:`TextTower.encode_embeddings`:
        ``(embeddings (B * C, L, width), eot (B * C,))``, image-major."""
        prefixes, suffixes = self.prefix_and_suffixes(image_features)
        b, (c, _, w) = prefixes.shape[0], suffixes.shape
        prompts = torch.cat([prefixes.unsqueeze(1).expand(-1, c, -1, -1),
                             suffixes.unsqueeze(0).expand(b, -1, -1, -1)], dim=2)
        return prompts.reshape(b * c, -1, w), self.eot.repeat(b)

    def text_features(self, model: nn.Module, image_features: Tensor | None = None) -> Tensor:
        """Unnormalised text features (B, C, D) of each image's class prompts, with grad:
        each image's prefix once and the class suffixes batched for all images (one call of
        the shared-prefix encoder) where it applies, else every prompt through the
        (truncated) tower."""
        if image_features is None:
            raise ValueError("CoCoOp's class text features depend on the image: pass the "
                             "normalised image features (B, D)")
        shared = getattr(model, "shared_prefix", None)
        if shared is not None and shared.applies():
            return shared(*self.prefix_and_suffixes(image_features), per_prefix=True)
        prompts, eot = self(image_features)
        return model.tower.encode_embeddings(prompts, eot).view(
            image_features.shape[0], self.n_cls, -1)

    def moved_to(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, ctx_init: str | None = None
                 ) -> "CoCoOpLearner":
        """The learned context and meta-net on other class names (base-to-new,
        cross-data-set).  ``ctx_init`` (default: this learner's) gives the prompt's words,
        as for training: its word count must be this context's length."""
        init = ctx_init if ctx_init is not None else self.ctx_init
        other = CoCoOpLearner(tower, classnames, tokenizer, n_ctx=self.n_ctx, ctx_init=init,
                              image_dim=self.image_dim, dtype=self.ctx.dtype,
                              truncate=self.truncate)
        with torch.no_grad():
            other.ctx.copy_(self.ctx)
            other.meta_net.load_state_dict(self.meta_net.state_dict())
        return other
