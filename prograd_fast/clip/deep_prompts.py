"""Deep prompts: learned tokens in the image tower's and the text tower's inner layers.

MaPLe, IVLP and VPT-deep (the multimodal-prompt-learning code) carry prompts the same way:

- image tower (a ViT): ``n`` shallow prompt tokens are appended after the patch tokens, once
  the positional embedding is added and before ``ln_pre``; before block ``k`` (``k = 1 ..
  len(deep)``) the last ``n`` tokens of the residual stream are *replaced* by ``deep[k-1]``
  (the previous block's outputs at those positions are dropped).  After the last deep layer
  the prompts' outputs flow on.  The feature is the class token's, as without prompts.
- text tower: the shallow context is part of the prompt embeddings (rows ``1 .. n`` after
  [SOS]); before block ``k`` those rows are replaced by ``deep[k-1]``
  (:meth:`TextTower.encode_embeddings`'s ``deep``).  The rows are the same in every class
  prompt, so the shared-prefix encoder stays exact
  (:func:`~prograd_fast.clip.learner.encode_prompts`).

:func:`prompted_image_features` runs an open_clip ``VisionTransformer`` that way and
:func:`check_vision_tower` refuses other image towers with the reason.
:class:`DeepTextPrompts` builds the context prompts MaPLe and IVLP share.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .learner import Learner
from .prompt import _n_tokens, _overflowing, _tokenize, default_tokenizer
from .tower import TextTower

__all__ = ["UnsupportedVisionTowerError", "check_vision_tower", "prompted_image_features",
           "DeepTextPrompts", "check_depth", "tower_layers"]


class UnsupportedVisionTowerError(TypeError):
    """The model's image tower cannot carry deep vision prompts (the reason says why)."""


def check_vision_tower(visual: nn.Module) -> None:
    """Raise :class:`UnsupportedVisionTowerError` (one line) unless ``visual`` is an open_clip
    ``VisionTransformer`` read at its class token, as the official ViT towers are."""
    from open_clip import transformer as oct

    name = type(visual).__name__
    if type(visual) is not oct.VisionTransformer:
        raise UnsupportedVisionTowerError(
            f"deep vision prompts need open_clip's VisionTransformer image tower; this model's is "
            f"a {name} (ResNet, timm and other towers have no token sequence to prompt)")
    if visual.attn_pool is not None:
        raise UnsupportedVisionTowerError(
            "this VisionTransformer pools with attention (attentional_pool): the official "
            "prompted tower reads the class token, so prompts would change a different feature")
    if visual.pool_type != "tok":
        raise UnsupportedVisionTowerError(
            f"this VisionTransformer pools with pool_type={visual.pool_type!r}: only 'tok' (the "
            f"class token, as the official prompted tower) is supported")
    if type(visual.transformer) is not oct.Transformer:
        raise UnsupportedVisionTowerError(
            f"the image transformer is a {type(visual.transformer).__name__}, not open_clip's "
            f"Transformer")


def tower_layers(transformer: nn.Module) -> int:
    """Number of blocks of an open_clip transformer."""
    return len(transformer.resblocks)


def check_depth(name: str, depth: int, n_ctx: int, layers: int, where: str) -> None:
    """Refuse a prompt depth or context length that the tower cannot hold (one line)."""
    if n_ctx < 0 or depth < 0:
        raise ValueError(f"{name}: n_ctx and depth must be >= 0, got {n_ctx} and {depth}")
    if (n_ctx == 0) != (depth == 0):
        raise ValueError(f"{name}: the {where} prompts need both n_ctx and depth > 0 (or both 0 "
                         f"for none), got n_ctx={n_ctx}, depth={depth}")
    if depth > layers:
        raise ValueError(f"{name}: prompt depth {depth} exceeds the {layers} layers of the "
                         f"{where} tower; use a depth <= {layers}")


def _plain_block(block: nn.Module) -> bool:
    """``block`` is open_clip's own ResidualAttentionBlock with torch's multi-head attention
    (self-attention, batch first): :func:`_batch_first_block` computes it exactly."""
    from open_clip import transformer as oct

    attn = getattr(block, "attn", None)
    return (type(block) is oct.ResidualAttentionBlock and type(attn) is nn.MultiheadAttention
            and attn.batch_first and attn._qkv_same_embed_dim and attn.in_proj_bias is not None
            and not hasattr(block, "ln_1_kv"))


def _batch_first_block(block: nn.Module, x: Tensor) -> Tensor:
    """open_clip's ResidualAttentionBlock on contiguous (B, L, width) rows, the same math.
    ``nn.MultiheadAttention(batch_first=True)`` transposes its input, so with grad its
    projections run as strided batched products (about 3.5x slower on a CPU at ViT-B/16's
    size); here every projection is one matrix product over all rows and the attention is
    ``scaled_dot_product_attention`` (its default scale is the 1/sqrt(head_dim) of torch's)."""
    attn = block.attn
    b, rows, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, rows, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, rows, width)
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _block(transformer: nn.Module, block: nn.Module, x: Tensor, batch_first: bool = True) -> Tensor:
    """One block, through activation checkpointing when the transformer asks for it (as
    open_clip's ``Transformer.forward``)."""
    if batch_first and _plain_block(block) and not (block.training and block.attn.dropout > 0):
        run = functools.partial(_batch_first_block, block)
    else:
        run = block
    if getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled():
        if run is block:
            return checkpoint(block, x, None, None, None, use_reentrant=False)
        return checkpoint(run, x, use_reentrant=False)
    return run(x)


def prompted_image_features(visual: nn.Module, images: Tensor, shallow: Tensor | None,
                            deep: Sequence[Tensor] = ()) -> Tensor:
    """Unnormalised image features (B, D) of an open_clip ``VisionTransformer`` with
    ``shallow`` (n, width) prompt tokens appended after the positional embedding (before
    ``ln_pre``) and ``deep[k-1]`` (n, width) replacing them before block ``k``.  ``shallow``
    None: no prompts (the plain tower).  Grad flows to the prompts; the tower stays frozen."""
    dtype = visual.conv1.weight.dtype
    x = visual.conv1(images.to(dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    n = 0
    if shallow is not None and shallow.shape[0] > 0:
        n = shallow.shape[0]
        x = torch.cat([x, shallow.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    transformer = visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    deep = list(deep) if n else []
    for k, block in enumerate(transformer.resblocks):
        if 1 <= k <= len(deep):  # the previous block's outputs at the prompts are dropped
            ctx = deep[k - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :x.shape[1] - n], ctx], dim=1)
        x = _block(transformer, block, x if batch_first else x.transpose(0, 1), batch_first)
        x = x if batch_first else x.transpose(0, 1)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


class DeepTextPrompts(nn.Module):
    """The text prompts MaPLe and IVLP learn: ``[SOS] ctx_1 .. ctx_n <rest of ctx_init>
    CLASSNAME . [EOT]``, each prompt cut after the longest end-of-text position (exact for
    the causal tower).

    ``ctx_init`` (official "a photo of a") initialises the ``n_ctx`` vectors from its first
    ``n_ctx`` token embeddings; its remaining tokens stay in the prompt as fixed words, as the
    official code builds it.  ``ctx_init=None``: N(0, 0.02^2) and "X" placeholders.  The
    context (``ctx``) is a parameter of the learner that owns this module."""

    def __init__(self, tower: TextTower, classnames: Sequence[str], tokenizer: Callable | None,
                 n_ctx: int, ctx_init: str | None, owner: str) -> None:
        super().__init__()
        if not classnames:
            raise ValueError(f"{owner}: classnames is empty")
        length = tower.context_length
        tokenizer = tokenizer if tokenizer is not None else default_tokenizer(length)
        emb = tower.token_embedding
        device = emb.weight.device
        names = [str(c).replace("_", " ") for c in classnames]
        with torch.no_grad():
            if ctx_init:
                ctx_init = ctx_init.replace("_", " ")
                have = _n_tokens(tokenizer, ctx_init, length)
                if n_ctx > have:
                    raise ValueError(f"{owner}: n_ctx ({n_ctx}) exceeds the {have} tokens of "
                                     f"ctx_init {ctx_init!r}; use ctx_init=None for a random "
                                     f"context")
                init_tokens = _tokenize(tokenizer, [ctx_init], length).to(device)
                ctx = emb(init_tokens)[0, 1:1 + n_ctx].float()
                prefix_text = ctx_init
            else:
                ctx = torch.empty(n_ctx, tower.width, device=device).normal_(0.0, 0.02)
                prefix_text = " ".join(["X"] * n_ctx)
            prompts = [f"{prefix_text} {name}." for name in names]
            tokens = _tokenize(tokenizer, prompts, length).to(device)
            eot = tower.eot_positions(tokens)
            longest = int(eot.max()) + 1
            if longest >= length:
                cut = _overflowing(tokenizer, [p for p, e in zip(prompts, eot.tolist())
                                               if e == length - 1], length)
                if cut:
                    raise ValueError(f"{owner}: prompts do not fit in {length} tokens: {cut[:3]}")
            embedding = emb(tokens[:, :longest]).to(tower.dtype)
        self.initial_ctx = ctx
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:].clone(), persistent=False)
        self.register_buffer("eot", eot.clone(), persistent=False)
        # tokens of ctx_init after the learned ones: the same in every prompt
        self.fixed_words = _n_tokens(tokenizer, prefix_text, length) - n_ctx
        self.classnames, self.n_ctx, self.prompt_prefix = names, n_ctx, prefix_text

    @property
    def length(self) -> int:
        return 1 + self.n_ctx + self.token_suffix.shape[1]

    def prompts(self, ctx: Tensor) -> Tensor:
        """(C, length, width) prompt embeddings with the learned context ``ctx`` (n, width)."""
        ctx = ctx.to(self.token_prefix.dtype).unsqueeze(0).expand(len(self.classnames), -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)

    def prefix_and_suffixes(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """``(prefix (1, P, width), suffixes (C, length - P, width))`` with P = 1 + n_ctx +
        the fixed words of ctx_init (all the same in every prompt)."""
        fixed = self.token_suffix[:1, :self.fixed_words]
        prefix = torch.cat([self.token_prefix[:1], ctx.to(fixed.dtype).unsqueeze(0), fixed], 1)
        return prefix, self.token_suffix[:, self.fixed_words:]

    @property
    def shared_length(self) -> int:
        return 1 + self.n_ctx + self.fixed_words


class DeepTextLearner(Learner):
    """What MaPLe's and IVLP's learners share: text prompts held in ``self.text``
    (:class:`DeepTextPrompts`) around the context ``self.ctx``, whose prefix ([SOS], the
    context and the fixed words of ctx_init) is the same in every prompt, so the shared-prefix
    encoder applies (the deep text prompts replace context rows, inside it)."""

    text: DeepTextPrompts
    ctx: nn.Parameter

    def forward(self) -> tuple[Tensor, Tensor]:
        """The shallow text prompts (C, length, width) and their end-of-text positions."""
        return self.text.prompts(self.ctx), self.text.eot

    @property
    def eot(self) -> Tensor:
        return self.text.eot

    @property
    def shared_prefix_length(self) -> int:
        """[SOS], the context and the fixed words of ctx_init."""
        return self.text.shared_length

    def prefix_and_suffixes(self) -> tuple[Tensor, Tensor]:
        return self.text.prefix_and_suffixes(self.ctx)

    @property
    def length(self) -> int:
        return self.text.length
