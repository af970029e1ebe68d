"""CoOp's prompt learner for open_clip models: learned context vectors around class names."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .learner import Learner
from .tower import TextTower

__all__ = ["CTX_INIT_MODES", "PromptLearner", "default_tokenizer", "template_context"]

POSITIONS = ("end", "middle", "front")
#: How ``ctx_init`` initialises the context: ``"coop"`` (CoOp: the words are the whole
#: context, ``n_ctx`` becomes their token count) or ``"prograd"`` (official ProGrad's
#: ``CTX_INIT: True``: ``n_ctx`` is kept, the words fill its last positions, zeros before).
CTX_INIT_MODES = ("coop", "prograd")
# Keys of CoOp / ProGrad prompt-learner checkpoints that hold fixed token embeddings of the
# class names of the run that saved them; they are recomputed here from the current names.
_FIXED_KEYS = ("token_prefix", "token_suffix")


def template_context(template: str) -> str:
    """The context official ProGrad initialises from a data set's template (``CTX_INIT:
    True``): the template without its trailing class slot, ``"a type of pet, a photo of a
    {}."`` -> ``"a type of pet, a photo of a"``."""
    if not template.endswith(" {}.") or template.count("{}") != 1:
        raise ValueError(f"template {template!r} does not end with its class slot ' {{}}.': it "
                         f"cannot initialise the context the way official ProGrad does")
    return template[:-len(" {}.")].replace("_", " ")


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


def _overflowing(tokenizer: Callable, prompts: list[str], length: int) -> list[str]:
    """The prompts (among those whose end-of-text token sits in the last slot) that the
    tokenizer cut to fit ``length`` tokens.  A prompt of exactly ``length`` tokens fits, as
    in open_clip and OpenAI's tokenizer; a cut one looks the same after tokenizing, so it is
    counted again: with the tokenizer's ``encode``, else one slot longer (a tokenizer that
    allows neither: every such prompt counts as cut)."""
    if not prompts:
        return []
    if hasattr(tokenizer, "encode"):
        return [p for p in prompts if len(tokenizer.encode(p)) + 2 > length]
    try:
        longer = tokenizer(prompts, context_length=length + 1)
    except TypeError:
        return prompts
    if longer.shape[-1] != length + 1:
        return prompts
    return [p for p, last in zip(prompts, longer[:, length].tolist()) if last != 0]


def _prograd_init(emb: nn.Embedding, tokenizer: Callable, ctx_init: str, n_ctx: int,
                  length: int, position: str) -> tuple[Tensor, str]:
    """Official ProGrad's context from ``ctx_init`` (its PromptLearner, ``CTX_INIT: True``):
    ``n_ctx`` vectors, zeros then the first ``w`` token embeddings of ``ctx_init`` where
    ``w`` counts its space-separated words; the prompt text is ``"X .. X " + ctx_init``."""
    ctx_init = ctx_init.replace("_", " ")
    words = len(ctx_init.split(" "))
    if n_ctx < words:
        raise ValueError(f"n_ctx ({n_ctx}) is smaller than the {words} words of the initial "
                         f"context {ctx_init!r}")
    if position != "end" and _n_tokens(tokenizer, ctx_init, length) != words:
        raise ValueError(f"the initial context {ctx_init!r} has more tokens than words: part of "
                         f"it stays before the class name, which then cannot be moved "
                         f"(class_token_position {position!r}); use 'end'")
    tokens = _tokenize(tokenizer, [ctx_init], length).to(emb.weight.device)
    ctx = torch.zeros(n_ctx, emb.weight.shape[1], device=emb.weight.device)
    ctx[n_ctx - words:] = emb(tokens)[0, 1:1 + words].float()
    return ctx, " ".join(["X"] * (n_ctx - words) + [ctx_init])


def _token_order(position: str, n_ctx: int, name_lens: list[int], length: int) -> Tensor:
    """(classes, length) source positions in the "end" layout ``[SOS, ctx, name, rest]`` of
    each token of the "middle" (``[SOS, ctx[:n//2], name, ctx[n//2:], rest]``) or "front"
    (``[SOS, name, ctx, rest]``) prompt."""
    half = n_ctx // 2 if position == "middle" else 0
    ctx = list(range(1, 1 + n_ctx))
    rows = []
    for k in name_lens:
        name = list(range(1 + n_ctx, 1 + n_ctx + k))
        rows.append([0] + ctx[:half] + name + ctx[half:] + list(range(1 + n_ctx + k, length)))
    return torch.tensor(rows, dtype=torch.long)


class PromptLearner(Learner):
    """``n_ctx`` learned context vectors placed around each class name, as CoOp does.

    Prompt ``i`` is ``[SOT] ctx_1 .. ctx_n CLASSNAME_i . [EOT]`` (``class_token_position``
    ``"end"``; ``"middle"`` splits the context around the name, ``"front"`` puts the name
    first).  ``ctx_init`` ("a photo of a") initialises the context from word embeddings
    and fixes ``n_ctx`` to its token count (``ctx_init_mode="coop"``); with
    ``ctx_init_mode="prograd"`` (official ProGrad's ``CTX_INIT: True``, with
    :func:`template_context`) ``n_ctx`` is kept, the context is zeros followed by the
    embeddings of the first ``w`` tokens of ``ctx_init``, ``w`` its number of
    space-separated words (as the official code counts; a comma makes one token more, which
    then stays fixed after the context, as there).  Otherwise the context is drawn from
    N(0, 0.02^2).  ``class_specific=True`` learns one context per class.  ``dtype`` of the
    context: ``None`` keeps the tower's dtype (CoOp), e.g. ``torch.float32`` for an fp32
    master copy of an fp16 model.

    ``truncate=True`` stores every prompt cut after the longest end-of-text position among
    the classes, so each forward encodes only the tokens that matter (exact for a causal
    tower).  :meth:`forward` returns ``(embeddings, eot)`` for :class:`TextTower`.

    Loading a state dict ignores ``token_prefix`` / ``token_suffix`` (CoOp and ProGrad
    checkpoints hold these fixed embeddings of their own class names; they are rebuilt here
    from the current ones, as CoOp's ``load_model`` does) and explains a context of the
    wrong shape.
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
        ctx_init_mode: str = "coop",
    ) -> None:
        super().__init__()
        if ctx_init_mode not in CTX_INIT_MODES:
            raise ValueError(f"ctx_init_mode must be one of {CTX_INIT_MODES}, got {ctx_init_mode!r}")
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
            if ctx_init and ctx_init_mode == "prograd":
                ctx, prefix_text = _prograd_init(emb, tokenizer, ctx_init, n_ctx, length,
                                                 class_token_position)
                if class_specific:
                    ctx = ctx.unsqueeze(0).repeat(n_cls, 1, 1)
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
            if longest >= length:
                too_long = _overflowing(tokenizer, [p for p, e in zip(prompts, eot.tolist())
                                                    if e == length - 1], length)
                if too_long:
                    raise ValueError(f"prompts do not fit in {length} tokens (context too long "
                                     f"or class names too long): {too_long[:3]}")
            keep = longest if truncate else length
            embedding = emb(tokens[:, :keep]).to(ctx_dtype)
        self.ctx = nn.Parameter(ctx.to(ctx_dtype))
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:].clone(), persistent=False)
        self.register_buffer("eot", eot.clone(), persistent=False)
        self.register_buffer("tokenized_prompts", tokens.clone(), persistent=False)
        self.name_lens = [_n_tokens(tokenizer, n, length) for n in names]
        # "middle" / "front": each prompt is a reordering of the "end" layout's tokens,
        # gathered in one call (a per-class slice of the context would cost a full-size
        # gradient per class in the backward)
        order = (None if class_token_position == "end" else _token_order(
            class_token_position, n_ctx, self.name_lens, embedding.shape[1]).to(emb.weight.device))
        self.register_buffer("token_order", order, persistent=False)
        self.n_ctx, self.n_cls = n_ctx, n_cls
        self.classnames = names
        self.class_token_position = class_token_position
        self.class_specific = class_specific
        self.truncate = truncate
        self.prompt_prefix = prefix_text
        self.ctx_init = ctx_init or None
        self.ctx_init_mode = ctx_init_mode

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        for key in _FIXED_KEYS:
            state_dict.pop(prefix + key, None)
        ctx = state_dict.get(prefix + "ctx")
        if isinstance(ctx, Tensor) and ctx.shape != self.ctx.shape:
            error_msgs.append(
                f"the checkpoint's context has shape {tuple(ctx.shape)}, this prompt learner's "
                f"is {tuple(self.ctx.shape)}: n_ctx (CoOp's N_CTX), class_specific (CSC, and "
                f"then the number of classes) and the text width must match the run that saved it")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def length(self) -> int:
        """Number of tokens each prompt is encoded with."""
        return 1 + self.n_ctx + self.token_suffix.shape[1]

    @property
    def shared_prefix_length(self) -> int:
        """Leading tokens that are the same in every class prompt: [SOS] and the shared context
        before the class name (all of it at ``"end"``, the first half in the ``"middle"``).
        0 when no context is shared (class-specific context, class name in front)."""
        if self.class_specific or self.class_token_position == "front":
            return 0
        shared = self.n_ctx if self.class_token_position == "end" else self.n_ctx // 2
        return 1 + shared if shared else 0

    @property
    def shared_prefix_off(self) -> str:
        if self.class_specific:
            return "class-specific context: every prompt has its own context, nothing is shared"
        if self.class_token_position == "front":
            return "class token in front: only [SOS] comes before the class name"
        return "class token in the middle of a 1-token context: only [SOS] is shared"

    def moved_to(self, tower: TextTower, classnames: Sequence[str],
                 tokenizer: Callable | None = None, ctx_init: str | None = None) -> "PromptLearner":
        """The learned (generic) context on other class names, with this learner's settings.
        A ``ctx_init_mode="prograd"`` prompt keeps its fixed init tokens: ``ctx_init`` (default:
        this one's) are the words official ProGrad builds the tested prompt from."""
        if self.class_specific:
            raise ValueError("a class-specific context cannot be transferred to new classes")
        prograd = self.ctx_init_mode == "prograd"
        init = (ctx_init if ctx_init is not None else self.ctx_init) if prograd else None
        other = PromptLearner(tower, classnames, tokenizer, n_ctx=self.n_ctx, ctx_init=init,
                              class_token_position=self.class_token_position,
                              dtype=self.ctx.dtype, truncate=self.truncate,
                              ctx_init_mode=self.ctx_init_mode)
        with torch.no_grad():
            other.ctx.copy_(self.ctx)
        return other

    def prefix_and_suffixes(self) -> tuple[Tensor, Tensor]:
        """The prompts of :meth:`forward` split after ``shared_prefix_length`` (P) tokens:
        ``(prefix (1, P, width), suffixes (C, length - P, width))``, the prefix once.  At
        the end position the suffixes are a buffer (no gradient flows through them)."""
        p = self.shared_prefix_length
        if p == 0:
            raise ValueError("no prefix is shared by all class prompts")
        if self.class_token_position == "end":
            ctx = self.ctx.to(self.token_prefix.dtype).unsqueeze(0)
            return torch.cat([self.token_prefix[:1], ctx], dim=1), self.token_suffix
        prompts, _ = self.forward()
        return prompts[:1, :p], prompts[:, p:]

    def forward(self) -> tuple[Tensor, Tensor]:
        ctx = self.ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        ctx = ctx.to(self.token_prefix.dtype)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        if self.token_order is not None:  # the class name in the middle or in front
            order = self.token_order.unsqueeze(-1).expand(-1, -1, prompts.shape[-1])
            prompts = prompts.gather(1, order)
        return prompts, self.eot
