"""KgCoOp (Yao et al., CVPR 2023): CoOp's prompt plus a knowledge-guided loss.

The learned class features are kept near zero-shot CLIP's: the loss adds
``kg_weight * (1 - mean_c cos(t_c, w_c))``, with ``t_c`` the learned prompt's text feature of
class ``c`` and ``w_c`` the normalised feature of the data set's hand-crafted prompt
(KgCoOp's per-data-set template, :data:`KGCOOP_TEMPLATES`).  The prompt itself is CoOp's
(:class:`~prograd_fast.clip.PromptLearner`, same layout), so the shared prefix applies as for
CoOp.  Under ProGrad the knowledge-guided loss is part of the domain loss (see docs/coop.md).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .prompt import PromptLearner, _tokenize, default_tokenizer
from .teacher import get_templates
from .tower import TextTower, normalize

__all__ = ["KgCoOpLearner", "KGCOOP_WEIGHT", "KGCOOP_CTX_INIT", "KGCOOP_N_CTX"]

KGCOOP_WEIGHT = 8.0  # TRAINER.COOP.W of the official scripts (scripts/run.sh)
KGCOOP_CTX_INIT = "a photo of a"  # what CTX_INIT: True means in the official trainer
KGCOOP_N_CTX = 4


class KgCoOpLearner(PromptLearner):
    """CoOp's prompt learner with KgCoOp's knowledge-guided loss (:meth:`extra_loss`).

    ``kg_weight``: W (official 8.0).  ``kg_templates``: the hand-crafted prompts the learned
    class features are kept near -- a data set name (its template in the ``"kgcoop"`` set of
    :func:`~prograd_fast.clip.get_templates`) or templates; several are averaged and
    renormalised.  Other arguments are :class:`PromptLearner`'s; the defaults are the
    official settings (context from "a photo of a", 4 tokens).
    """

    def __init__(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, *, kg_weight: float = KGCOOP_WEIGHT,
                 kg_templates: str | Sequence[str] | None = None, n_ctx: int = KGCOOP_N_CTX,
                 ctx_init: str | None = KGCOOP_CTX_INIT, **settings) -> None:
        if not kg_weight >= 0:
            raise ValueError(f"kg_weight must be >= 0, got {kg_weight}")
        super().__init__(tower, classnames, tokenizer, n_ctx=n_ctx, ctx_init=ctx_init, **settings)
        self.kg_weight = float(kg_weight)
        self.kg_templates = get_templates(kg_templates, "kgcoop")
        self._settings = settings
        tokenizer = tokenizer if tokenizer is not None else default_tokenizer(tower.context_length)
        device = tower.token_embedding.weight.device
        feats = []
        with torch.no_grad():
            for template in self.kg_templates:
                tokens = _tokenize(tokenizer, [template.format(n) for n in self.classnames],
                                   tower.context_length).to(device)
                out = tower.encode_tokens(tokens)
                feats.append(normalize(out.to(torch.promote_types(out.dtype, torch.float32))))
            target = normalize(torch.stack(feats).mean(0))
        self.register_buffer("kg_features", target, persistent=False)

    def extra_loss(self, text_features: Tensor, zeroshot_features: Tensor | None = None) -> Tensor:
        """``W * (1 - mean cosine)`` between the learned class features (C, D, raw) and the
        hand-crafted prompts' (the official eps 1e-7 of ``CosineSimilarity``)."""
        dtype = torch.promote_types(text_features.dtype, torch.float32)
        learned = normalize(text_features.to(dtype))
        cos = torch.nn.functional.cosine_similarity(learned, self.kg_features.to(dtype), dim=1,
                                                    eps=1e-7)
        return self.kg_weight * (1.0 - cos.mean())

    def moved_to(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, ctx_init: str | None = None,
                 **settings) -> "KgCoOpLearner":
        """The learned context on other class names (their own knowledge-guided targets)."""
        if self.class_specific:
            raise ValueError("a class-specific context cannot be transferred to new classes")
        other = KgCoOpLearner(tower, classnames, tokenizer, kg_weight=self.kg_weight,
                              kg_templates=self.kg_templates, n_ctx=self.n_ctx,
                              ctx_init=self.ctx_init,
                              **{**self._settings, "dtype": self.ctx.dtype})
        with torch.no_grad():
            other.ctx.copy_(self.ctx)
        return other
