"""CoOp's prompt learner for open_clip models: learned context vectors around class names."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .tower import TextTower

__all__ = ["PromptLearner", "default_tokenizer"]

POSITIONS = ("end", "middle", "front")
CTX_INIT_STYLES = ("coop", "prograd")


def default_tokenizer(context_length: int) -> Callable:
    """open_clip's CLIP BPE tokenizer (its vocabulary ships with the package: no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def _tokenize(tokenizer: Callable, texts: list[str], context_length: int) -> Tensor:
    try:
        tokens = tokenizer(texts, context_length=context_length)
    except TypeError:
        tokens = tokenizer(texts)
    if tokens.shape[-1] != context_length:
        raise ValueError(f"tokenizer returned {tokens.shape[-1]} tokens, the model's context "
                         f"length is {context_length}")
    return tokens


def _n_tokens(tokenizer: Callable, text: str, context_length: int) -> int:
    """Number of BPE tokens of ``text`` without start/end tokens."""
    if hasattr(tokenizer, "encode"):
        return len(tokenizer.encode(text))
    tokens = _tokenize(tokenizer, [text], context_length)[0]
    return int((tokens != 0).sum()) - 2


class PromptLearner(nn.Module):
    """``n_ctx`` learned context vectors placed around each class name, as CoOp does.

    Prompt ``i`` is ``[SOT] ctx_1 .. ctx_n CLASSNAME_i . [EOT]`` (``class_token_position``
    ``"end"``; ``"middle"`` splits the context around the name, ``"front"`` puts the name
    first).  ``ctx_init`` ("a photo of a") initialises the context from word embeddings
    and fixes ``n_ctx`` to its token count; otherwise the context is drawn from
    N(0, 0.02^2).  ``class_specific=True`` learns one context per class.  ``dtype`` of the
    context: ``None`` keeps the tower's dtype (CoOp), e.g. ``torch.float32`` for an fp32
    master copy of an fp16 model.

    ``truncate=True`` stores every prompt cut after the longest end-of-text position among
    the classes, so each forward encodes only the tokens that matter (exact for a causal
    tower).  :meth:`forward` returns ``(embeddings, eot)`` for :class:`TextTower`.
    """

    def __init__(
        self,
        tower: TextTower,
        classnames: Sequence[str],
        tokenizer: Callable | None = None,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_token_position: str = "end",
        dtype: torch.dtype | None = None,
        truncate: bool = True,
        init_std: float = 0.02,
        ctx_init_style: str = "coop",
    ) -> None:
        super().__init__()
        if ctx_init_style not in CTX_INIT_STYLES:
            raise ValueError(f"ctx_init_style must be one of {CTX_INIT_STYLES}, got {ctx_init_style!r}")
        if not classnames:
            raise ValueError("classnames is empty")
        if class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position must be one of {POSITIONS}, "
                             f"got {class_token_position!r}")
        length = tower.context_length
        tokenizer = tokenizer if tokenizer is not None else default_tokenizer(length)
        emb = tower.token_embedding
        ctx_dtype = dtype if dtype is not None else tower.dtype
        names = [str(c).replace("_", " ") for c in classnames]
        n_cls = len(names)
        with torch.no_grad():
            if ctx_init and ctx_init_style == "prograd":
                ctx_init = ctx_init.replace("_", " ").strip()
                n_words = len(ctx_init.split(" "))
                if n_ctx < n_words:
                    raise ValueError(f"n_ctx={n_ctx} is smaller than the {n_words} words of "
                                     f"ctx_init {ctx_init!r}")
                init_tokens = _tokenize(tokenizer, [ctx_init], length).to(emb.weight.device)
                words = emb(init_tokens)[0, 1:1 + n_words].float()
                ctx = torch.cat([words.new_zeros(n_ctx - n_words, words.shape[1]), words])
                if class_specific:
                    ctx = ctx.unsqueeze(0).repeat(n_cls, 1, 1)
                prefix_text = " ".join(["X"] * (n_ctx - n_words) + [ctx_init])
            elif ctx_init:
                ctx_init = ctx_init.replace("_", " ").strip()
                n_ctx = _n_tokens(tokenizer, ctx_init, length)
                init_tokens = _tokenize(tokenizer, [ctx_init], length).to(emb.weight.device)
                ctx = emb(init_tokens)[0, 1:1 + n_ctx].float()
                if class_specific:
                    ctx = ctx.unsqueeze(0).repeat(n_cls, 1, 1)
                prefix_text = ctx_init
            else:
                if n_ctx < 1:
                    raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
                shape = (n_cls, n_ctx, tower.width) if class_specific else (n_ctx, tower.width)
                ctx = torch.empty(shape, device=emb.weight.device).normal_(0.0, init_std)
                prefix_text = " ".join(["X"] * n_ctx)
            prompts = [f"{prefix_text} {name}." for name in names]
            tokens = _tokenize(tokenizer, prompts, length).to(emb.weight.device)
            eot = tower.eot_positions(tokens)
            longest = int(eot.max()) + 1
            if longest >= length and bool((tokens[:, -1] != 0).any()):
                too_long = [p for p, e in zip(prompts, eot.tolist()) if e == length - 1]
                raise ValueError(f"prompts do not fit in {length} tokens (context too long or "
                                 f"class names too long): {too_long[:3]}")
            keep = longest if truncate else length
            embedding = emb(tokens[:, :keep]).to(ctx_dtype)
        self.ctx = nn.Parameter(ctx.to(ctx_dtype))
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:].clone(), persistent=False)
        self.register_buffer("eot", eot.clone(), persistent=False)
        self.register_buffer("tokenized_prompts", tokens.clone(), persistent=False)
        self.name_lens = [_n_tokens(tokenizer, n, length) for n in names]
        self.n_ctx, self.n_cls = n_ctx, n_cls
        self.classnames = names
        self.class_token_position = class_token_position
        self.class_specific = class_specific
        self.truncate = truncate
        self.prompt_prefix = prefix_text
        self.ctx_init = ctx_init or None
        self.ctx_init_style = ctx_init_style

    @property
    def length(self) -> int:
        """Number of tokens each prompt is encoded with."""
        return 1 + self.n_ctx + self.token_suffix.shape[1]

    def forward(self) -> tuple[Tensor, Tensor]:
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        ctx = ctx.to(self.token_prefix.dtype)
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.class_token_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1), self.eot
        half = self.n_ctx // 2
        prompts = []
        for i, n in enumerate(self.name_lens):
            name, rest = suffix[i:i + 1, :n], suffix[i:i + 1, n:]
            c = ctx[i:i + 1]
            if self.class_token_position == "middle":
                parts = [prefix[i:i + 1], c[:, :half], name, c[:, half:], rest]
            else:
                parts = [prefix[i:i + 1], name, c, rest]
            prompts.append(torch.cat(parts, dim=1))
        return torch.cat(prompts, dim=0), self.eot
