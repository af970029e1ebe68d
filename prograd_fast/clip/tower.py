"""The CLIP causal text tower of an open_clip model, and its truncated encoder.

CoOp-style prompt tuning feeds learned embeddings straight into the text transformer, so
the package needs the tower's parts, not only ``encode_text``.  Only towers that are the
CLIP causal transformer are supported: every token attends to itself and earlier tokens
only (``attn_mask`` causal) and the feature is read at the end-of-text token
(``text_pool_type`` ``"argmax"`` or ``"eos"``).  For such a tower the output at position
``t`` depends on tokens ``<= t`` only, so cutting every prompt after the longest
end-of-text position gives exactly the features of the full 77-token encoding for a
fraction of the work (DESIGN.md section 2).

Refused, with the reason in the error: Hugging Face text towers (``hf_model_name``:
bidirectional encoders, no embedding-level entry point), CoCa (its contrastive feature is a
CLS token appended after the padding), SigLIP-style towers (``no_causal_mask``, pooled at
the last position: every token, padding included, changes the feature), and any tower
with a class embedding or pooling other than the end-of-text token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["TextTower", "UnsupportedTextTowerError"]


class UnsupportedTextTowerError(TypeError):
    """The model's text tower is not a CLIP causal transformer (see module docstring)."""


def _refuse(reason: str) -> UnsupportedTextTowerError:
    return UnsupportedTextTowerError(
        f"prograd_fast.clip supports open_clip models whose text tower is the CLIP causal "
        f"transformer (causal attn_mask, features read at the end-of-text token); {reason}")


def _is_causal(mask: Tensor) -> bool:
    n = mask.shape[-1]
    if mask.dim() != 2 or mask.shape[0] != n:
        return False
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask.cpu(), torch.ones(n, n, dtype=torch.bool).triu(1)))
    m = mask.detach().float().cpu()
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(m[upper]).all() and (m[~upper] == 0).all())


@dataclass(eq=False)
class TextTower:
    """References to the parts of a CLIP causal text tower (no copies, no parameters).

    The modules and tensors are read from ``owner`` (the model or its ``.text``) on each use,
    so the tower follows the model when a part is replaced (``prune_intermediate_layers``,
    ``.to(device)``, a new ``ln_final``)."""

    owner: nn.Module  # holds the modules and tensors below
    pool_type: str
    eos_id: int | None
    context_length: int

    @classmethod
    def from_model(cls, model: nn.Module) -> "TextTower":
        """The text tower of an open_clip ``CLIP`` (or ``CustomTextCLIP`` whose ``.text`` is a
        causal ``TextTransformer``); raises :class:`UnsupportedTextTowerError` otherwise."""
        name = type(model).__name__
        if name == "CoCa" or hasattr(model, "text_decoder"):
            raise _refuse("CoCa is refused: its contrastive text feature is a CLS token appended "
                          "after the padding, so learned prompts and truncation do not apply")
        text = getattr(model, "text", None)
        if text is not None and not hasattr(model, "token_embedding"):
            if type(text).__name__ == "HFTextEncoder" or not hasattr(text, "token_embedding"):
                raise _refuse(f"{name} has a Hugging Face / custom text tower "
                              f"({type(text).__name__}): bidirectional, refused")
            src, pool, eos = text, getattr(text, "pool_type", None), getattr(text, "eos_id", None)
            if getattr(text, "cls_emb", None) is not None:
                raise _refuse("this TextTransformer has a class embedding (CoCa-style), refused")
        elif hasattr(model, "token_embedding") and hasattr(model, "transformer"):
            src, pool, eos = model, getattr(model, "text_pool_type", None), getattr(model, "text_eos_id", None)
        else:
            raise _refuse(f"{name} has no open_clip text transformer")
        mask = getattr(src, "attn_mask", None)
        if mask is None or not _is_causal(mask):
            raise _refuse("this tower is not causal (no_causal_mask, e.g. SigLIP): every token "
                          "changes the pooled feature, so truncation would not be exact; refused")
        if pool not in ("argmax", "eos"):
            raise _refuse(f"text_pool_type={pool!r} is refused (only 'argmax' / 'eos', the "
                          f"end-of-text token, are supported)")
        if pool == "eos" and eos is None:
            raise _refuse("text_pool_type='eos' without an eos token id")
        return cls(src, pool, eos, int(src.positional_embedding.shape[0]))

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.owner.token_embedding

    @property
    def transformer(self) -> nn.Module:
        return self.owner.transformer

    @property
    def ln_final(self) -> nn.Module:
        return self.owner.ln_final

    @property
    def attn_mask(self) -> Tensor:
        """The causal mask, read from the tower's module on each use, as are the two tensors
        below: ``.to(device)`` / ``.half()`` replace buffers (and, across some devices,
        parameters), so a reference kept at construction would stay on the old device."""
        return self.owner.attn_mask

    @property
    def positional_embedding(self) -> Tensor:
        return self.owner.positional_embedding

    @property
    def text_projection(self) -> Tensor | nn.Module | None:
        return self.owner.text_projection

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in (open_clip's cast dtype)."""
        get = getattr(self.transformer, "get_cast_dtype", None)
        return get() if get is not None else self.token_embedding.weight.dtype

    def eot_positions(self, tokens: Tensor) -> Tensor:
        """Position of the end-of-text token of each tokenized prompt (the pooled position).
        An ``"eos"``-pooled tower checks that every prompt holds its eos id (one sync: call
        it outside training steps) and otherwise raises a ``ValueError`` naming both ids."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        found = tokens == self.eos_id
        missing = ~found.any(dim=-1)
        if bool(missing.any()):
            row = tokens[int(missing.int().argmax())]
            ends = row[row != 0]
            theirs = int(ends[-1]) if len(ends) else None
            raise ValueError(f"this text tower pools at its eos id {self.eos_id}, but the "
                             f"tokenizer's prompts end with id {theirs} and never hold "
                             f"{self.eos_id}: use the tokenizer made for this model "
                             f"(open_clip.get_tokenizer) or a tower with eos_id={theirs}")
        return found.int().argmax(dim=-1)

    def encode_embeddings(self, x: Tensor, eot: Tensor, *, deep: Sequence[Tensor] | None = None,
                          deep_start: int = 1) -> Tensor:
        """Text features of prompts given as token embeddings ``x`` (N, L, width), read at
        ``eot`` (N,).  ``L`` may be anything from ``eot.max() + 1`` to the context length:
        positions and the causal mask are sliced to ``L``, which is exact.

        ``deep``: deep text prompts as MaPLe / IVLP learn them, one (n, width) tensor per
        block from the second on: before block ``j + 1`` the hidden rows ``deep_start ..
        deep_start + n - 1`` of every prompt are replaced by ``deep[j]`` (cast to the tower's
        dtype); block 0 sees ``x`` as given (its context rows are the shallow prompt) and
        blocks after ``len(deep)`` carry the rows on unchanged.  The blocks then run one by
        one (the reference path); without ``deep`` nothing changes."""
        n, length, _ = x.shape
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        x = x.to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        mask = self.attn_mask[:length, :length]
        if deep is None:
            x = self.transformer(x, attn_mask=mask)
        else:
            x = self._run_deep(x, mask, check_deep(deep, deep_start, length, self.width,
                                                   len(self.transformer.resblocks)), deep_start)
        return self.head(x[torch.arange(n, device=x.device), eot])  # pool first: ln_final is per token

    def _run_deep(self, x: Tensor, mask: Tensor, deep: list[Tensor], start: int) -> Tensor:
        """open_clip's ``Transformer.forward`` (batch-first input, either block layout, grad
        checkpointing honoured) with the deep prompts put in before blocks 1 .. len(deep)."""
        transformer = self.transformer
        batch_first = getattr(transformer, "batch_first", True)
        seq = 1 if batch_first else 0  # the token dimension inside the blocks
        if not batch_first:
            x = x.transpose(0, 1)
        for i, blk in enumerate(transformer.resblocks):
            if 1 <= i <= len(deep):
                ctx = deep[i - 1].to(x.dtype)
                ctx = ctx.unsqueeze(0) if batch_first else ctx.unsqueeze(1)
                before, _, after = x.split([start, ctx.shape[seq], x.shape[seq] - start - ctx.shape[seq]], seq)
                shape = list(x.shape)
                shape[seq] = ctx.shape[seq]
                x = torch.cat([before, ctx.expand(shape), after], dim=seq)
            if getattr(transformer, "grad_checkpointing", False) and not torch.jit.is_scripting():
                x = checkpoint(blk, x, None, None, mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask=mask)
        return x if batch_first else x.transpose(0, 1)

    def head(self, pooled: Tensor) -> Tensor:
        """Text features from the transformer's outputs at the end-of-text tokens (N, width):
        ``ln_final`` and the text projection."""
        x = self.ln_final(pooled)
        proj = self.text_projection
        if proj is None:
            return x
        if isinstance(proj, nn.Module):
            return proj(x)
        return x @ proj

    def encode_tokens(self, tokens: Tensor, truncate: bool = True) -> Tensor:
        """Text features of token ids (N, context_length), optionally truncated."""
        eot = self.eot_positions(tokens)
        if truncate:
            tokens = tokens[:, : int(eot.max()) + 1]  # one sync, outside any training step
        return self.encode_embeddings(self.token_embedding(tokens), eot)


def check_deep(deep: Sequence[Tensor], start: int, rows: int, width: int, blocks: int
               ) -> list[Tensor]:
    """The deep prompts as a list, or a ``ValueError`` saying what does not fit: each must be
    (n, width) with rows ``start .. start + n - 1`` inside the first ``rows`` tokens, and
    there is one per block after the first at most."""
    deep = list(deep)
    if len(deep) > blocks - 1:
        raise ValueError(f"{len(deep)} deep prompts for a {blocks}-block transformer: at most "
                         f"{blocks - 1} (one per block after the first)")
    if start < 0:
        raise ValueError(f"deep_start must be >= 0, got {start}")
    for j, ctx in enumerate(deep):
        if ctx.dim() != 2 or ctx.shape[1] != width:
            raise ValueError(f"deep[{j}] must be (n, {width}), got {tuple(ctx.shape)}")
        if start + ctx.shape[0] > rows:
            raise ValueError(f"deep[{j}] replaces rows {start}..{start + ctx.shape[0] - 1}, "
                             f"beyond the {rows} rows it may replace")
    return deep


def normalize(x: Tensor) -> Tensor:
    """L2-normalise features along the last dimension."""
    return F.normalize(x, dim=-1)
