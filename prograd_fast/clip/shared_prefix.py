"""Shared-prefix text encoding: the prompt prefix common to all classes runs once.

With CoOp's prompts ``[SOS] ctx_1 .. ctx_n CLASSNAME . [EOT]`` (one context for every class)
the first ``1 + n`` tokens are the same in every prompt, and the CLIP text transformer is
causal: their hidden states are the same for every class at every layer.  This encoder runs
them once (batch 1) and runs per class only the suffix (name, '.', EOT; with the class name
in the middle, also the second half of the context); in every block a suffix token attends
to the prefix's keys and values and to the earlier tokens of its own suffix.  Autograd sums
the gradients of all suffixes into the one prefix.  Exact: the block math of open_clip on
fewer tokens (tested in float64 against the full 77-token encoder).

Two extensions for later prompt learners, both still exact: several prefixes at once
(``per_prefix=True``: CoCoOp's context depends on the image, not the class, so each image's
prefix runs once and every class suffix attends to its own image's prefix), and deep text
prompts (``deep``: MaPLe / IVLP overwrite the same context rows of every prompt before each
block up to their depth; rows inside the prefix keep it shared).

All tokens (prefix first, then the stored suffix tokens) go through the per-token layers
(norms, projections, MLP: nearly all the FLOPs) as one (rows, width) matrix.  Attention is
split: the prefix attends causally to itself; the suffixes' scores against the prefix are
one product with the prefix keys (never copied per class), joined with their causal scores
within their own suffix before one softmax.  Suffix layouts, all exact (``"bucketed"`` by
measurement, BENCHMARKS.md):

- ``"bucketed"``: classes sorted by suffix length, each suffix stored up to its EOT; one
  attention call per distinct length.  No padding.
- ``"packed"``: each suffix stored up to its EOT; attention gathers them into one (classes,
  longest suffix) rectangle and scatters its output back.  One attention call.
- ``"padded"``: every suffix padded to the longest one, as the truncated encoder pads.

Handled (checked at construction, from the blocks' own weights): open_clip
``ResidualAttentionBlock`` (``nn.MultiheadAttention`` with a packed in-projection, no
``bias_k``/``bias_v``, no zero attention) and ``CustomResidualAttentionBlock`` (open_clip
``Attention``: qk-norm, head scale, inner norm, ``scale_attn`` / ``scale_fc`` norms), with or
without layer scale, per-token norms and MLPs built from known layers.  Anything else -
scaled cosine attention, other block or layer classes - gets a reason from
:func:`shared_prefix_encoder` and the caller keeps today's encoder.  Hooks on the
transformer or dropout in training mode send a call to today's encoder as well
(:meth:`SharedPrefixEncoder.applies`).  So does a transformer changed after construction
(``prune_intermediate_layers``, a replaced block or ``attn``) that cannot be shared; one that
can is planned for again.  Each call checks this by module identity (no tensor is read).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tower import TextTower, check_deep

__all__ = ["DEFAULT_LAYOUT", "LAYOUTS", "SharedPrefixEncoder", "NotShareable", "shared_prefix_encoder"]

LAYOUTS = ("bucketed", "packed", "padded")
DEFAULT_LAYOUT = "bucketed"  # fastest measured (CPU, BENCHMARKS.md)


class NotShareable(ValueError):
    """The tower or the prompts do not allow an exact shared-prefix encoding (the reason)."""


def _open_clip_classes():
    from open_clip import transformer as oct

    return oct


def _per_token_types() -> tuple[type, ...]:
    """Layers that act on each token on its own (norms, activations, linear maps, identity):
    these exact classes, as a subclass may override ``forward`` with anything."""
    oct = _open_clip_classes()
    return (nn.LayerNorm, oct.LayerNorm, oct.LayerNormFp32, nn.RMSNorm, nn.Identity, nn.Linear,
            oct.LayerScale, oct.QuickGELU, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid,
            nn.Mish, nn.Hardswish, nn.LeakyReLU, nn.ELU)


def _check_per_token(module: nn.Module, where: str) -> None:
    ok = _per_token_types()
    for name, m in module.named_modules():
        if m is module and type(m) is nn.Sequential:
            continue
        if type(m) not in ok:
            raise NotShareable(f"{where}{'.' + name if name else ''} is a {type(m).__name__}, "
                               f"not a layer known to act per token")


def _check_block(i: int, blk: nn.Module) -> None:
    oct = _open_clip_classes()
    where = f"transformer.resblocks[{i}]"
    kind = type(blk)
    if kind is oct.ResidualAttentionBlock:
        attn = blk.attn
        if type(attn) is not nn.MultiheadAttention:
            raise NotShareable(f"{where}.attn is a {type(attn).__name__}, not a "
                               f"torch.nn.MultiheadAttention")
        if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            raise NotShareable(f"{where}.attn has separate q/k/v projections")
        if attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
            raise NotShareable(f"{where}.attn has bias_k/bias_v or add_zero_attn")
        if type(attn.out_proj) not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
            raise NotShareable(f"{where}.attn.out_proj is a {type(attn.out_proj).__name__}")
        parts = ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")
    elif kind is oct.CustomResidualAttentionBlock:
        attn = blk.attn
        if type(attn) is not oct.Attention:
            raise NotShareable(f"{where}.attn is a {type(attn).__name__}")
        if attn.logit_scale is not None:
            raise NotShareable(f"{where} uses scaled cosine attention: open_clip's own Attention "
                               f"fails on it (bmm on 4-D tensors), so there is no reference to match")
        for name in ("ln_q", "ln_k", "ln_inner", "out_proj"):
            _check_per_token(getattr(attn, name), f"{where}.attn.{name}")
        parts = ("ln_1", "ln_attn", "ls_1", "ln_2", "mlp", "ls_2")
    else:
        raise NotShareable(f"{where} is a {kind.__module__}.{kind.__name__}, not an open_clip "
                           f"ResidualAttentionBlock / CustomResidualAttentionBlock")
    for name in parts:
        _check_per_token(getattr(blk, name), f"{where}.{name}")


def _checked_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's blocks, each checked (:class:`NotShareable` names the first that
    cannot be shared)."""
    oct = _open_clip_classes()
    if type(transformer) not in (oct.Transformer, oct.CustomTransformer):
        kind = type(transformer)
        raise NotShareable(f"the text transformer is a {kind.__module__}.{kind.__name__}, not "
                           f"an open_clip Transformer")
    blocks = list(transformer.resblocks)
    for i, blk in enumerate(blocks):
        _check_block(i, blk)
    return blocks


_CHILDREN = operator.attrgetter("_modules")


def _layout_key(transformer: nn.Module, watched: list[nn.Module]) -> tuple:
    """What the plan depends on, by identity: the transformer, the class of every module
    under it and each one's child modules (a replaced block, ``attn`` or layer, a removed
    block and a reassigned ``__class__`` all change it).  Cheap: no tensor is read."""
    return (transformer, *map(type, watched),
            *[child for children in map(_CHILDREN, watched) for child in children.values()])


def _dropout_active(blk: nn.Module) -> bool:
    """Whether the block's attention would drop anything now (its modules in training mode
    with a dropout probability above 0)."""
    attn = blk.attn
    if isinstance(attn, nn.MultiheadAttention):
        return attn.training and attn.dropout > 0
    return ((attn.training and attn.attn_drop.p > 0)
            or (attn.out_drop.training and attn.out_drop.p > 0))


@dataclass(frozen=True)
class _Segment:
    """One attention call over the next ``rows`` stored suffix rows (segments follow each
    other): ``n_cls`` suffixes of ``length`` tokens each; ``gathered`` when the rows must be
    gathered into that rectangle (and scattered back), otherwise they are the rectangle."""

    rows: int
    n_cls: int
    length: int
    gathered: bool


def _plan(suffix_lengths: list[int], layout: str):
    """``(storage, segments, gather, scatter, eot_rows)``: ``storage`` lists ``(class, j)``
    for every stored suffix row (``j``: position within the suffix); ``eot_rows[c]`` is the
    row (after the prefix) that holds class ``c``'s EOT."""
    n_cls, longest = len(suffix_lengths), max(suffix_lengths)
    if layout == "padded":
        storage = [(c, j) for c in range(n_cls) for j in range(longest)]
        eot = [c * longest + n - 1 for c, n in enumerate(suffix_lengths)]
        return storage, [_Segment(len(storage), n_cls, longest, False)], None, None, eot
    if layout == "packed":
        storage = [(c, j) for c, n in enumerate(suffix_lengths) for j in range(n)]
        starts, eot = [], []
        for n in suffix_lengths:
            starts.append(eot[-1] + 1 if eot else 0)
            eot.append(starts[-1] + n - 1)
        # padded slot (c, j) reads the stored row of (c, min(j, n - 1)): slots past a class's
        # EOT repeat its EOT row; they are only seen by later (padded) queries, whose outputs
        # are dropped, so they neither change a feature nor receive a gradient.
        gather = [starts[c] + min(j, n - 1) for c, n in enumerate(suffix_lengths)
                  for j in range(longest)]
        scatter = [c * longest + j for c, n in enumerate(suffix_lengths) for j in range(n)]
        return (storage, [_Segment(len(storage), n_cls, longest, True)], gather, scatter,
                eot)
    if layout == "bucketed":
        storage, segments, eot = [], [], [0] * n_cls
        for n in sorted(set(suffix_lengths)):
            members = [c for c, m in enumerate(suffix_lengths) if m == n]
            for c in members:
                storage.extend((c, j) for j in range(n))
                eot[c] = len(storage) - 1
            segments.append(_Segment(len(members) * n, len(members), n, False))
        return storage, segments, None, None, eot
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


class SharedPrefixEncoder(nn.Module):
    """Text features of prompts whose first ``prefix_length`` tokens are the same in every
    class, equal to :meth:`TextTower.encode_embeddings` (see the module docstring).

    ``eot`` (C,) are the prompts' end-of-text positions and ``prompt_length`` the number of
    tokens of a whole prompt (prefix and suffix, as :meth:`forward` gets them).  Holds index
    buffers only (no parameters): register it as a submodule so that ``.to(device)`` moves
    them.  Raises
    :class:`NotShareable` when the tower or the prompts do not allow it.
    """

    def __init__(self, tower: TextTower, prefix_length: int, eot: Tensor, prompt_length: int,
                 layout: str = DEFAULT_LAYOUT) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if prefix_length < 1:
            raise NotShareable(f"prefix_length must be >= 1, got {prefix_length}")
        self.tower = tower
        self._take(_checked_blocks(tower.transformer))
        self.off_reason: str | None = None  # why calls fall back (the tower changed)
        eots = [int(e) for e in eot.tolist()]  # once, at construction
        lengths = [e - prefix_length + 1 for e in eots]
        if min(lengths) < 1:
            raise NotShareable("an end-of-text token lies inside the shared prefix")
        if max(eots) >= prompt_length or prompt_length > tower.context_length:
            raise ValueError(f"end-of-text positions {max(eots)} / prompt length {prompt_length} "
                             f"do not fit the context length {tower.context_length}")
        storage, segments, gather, scatter, eot_rows = _plan(lengths, layout)
        device = eot.device
        idx = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        suffix_length = prompt_length - prefix_length
        self.register_buffer("rows", idx([c * suffix_length + j for c, j in storage]),
                             persistent=False)
        self.register_buffer("positions", idx(list(range(prefix_length))
                                              + [prefix_length + j for _, j in storage]),
                             persistent=False)
        self.register_buffer("eot_rows", idx([prefix_length + r for r in eot_rows]), persistent=False)
        self.register_buffer("eot", idx(eots), persistent=False)  # for encode_full
        self.register_buffer("gather", idx(gather) if gather is not None else None, persistent=False)
        self.register_buffer("scatter", idx(scatter) if scatter is not None else None,
                             persistent=False)
        for i, seg in enumerate(segments):  # True: masked out (later tokens of the suffix)
            mask = torch.zeros(seg.length, prefix_length + seg.length, dtype=torch.bool)
            mask[:, prefix_length:] = torch.ones(seg.length, seg.length, dtype=torch.bool).triu(1)
            self.register_buffer(f"mask{i}", mask.to(device), persistent=False)
        self.segments = segments
        self._split_sizes = [prefix_length] + [seg.rows for seg in segments]
        self.prefix_length, self.prompt_length, self.n_cls = prefix_length, prompt_length, len(eots)
        self.layout = layout
        self.suffix_lengths = lengths

    def _take(self, blocks: list[nn.Module] | None) -> None:
        """Plan for these (checked) blocks of the tower's current transformer (``None``:
        it cannot be shared; remembered so that it is not checked again on every call)."""
        transformer = self.tower.transformer
        self._blocks = blocks
        self._watched = list(transformer.modules())
        self._layout_key = _layout_key(transformer, self._watched)

    @property
    def tokens_per_step(self) -> int:
        """Token positions each forward runs through the transformer (prefix once)."""
        return self.prefix_length + int(self.rows.numel())

    def applies(self) -> bool:
        """False when a hook watches the transformer (its modules would not all run, or run
        on differently shaped inputs) or a block with dropout is in training mode, and when
        the transformer is no longer the one planned for (a block or a layer replaced or
        removed, e.g. by ``prune_intermediate_layers``) and the new one cannot be shared:
        ``off_reason`` then says why (a warning says it once).  A changed transformer that
        can be shared is planned for again.  The check compares module identities and
        types only: no tensor is read."""
        if not self._planned():
            return False
        from torch.nn.modules import module as nn_module

        if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks):
            return False
        for m in self._watched:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return False
        return not any(_dropout_active(blk) for blk in self._blocks)

    def _planned(self) -> bool:
        """Whether the tower's transformer is (still, or once more) one this encoder runs."""
        if _layout_key(self.tower.transformer, self._watched) != self._layout_key:
            self._replan()
        return self._blocks is not None

    def _replan(self) -> None:
        """Check the tower's changed transformer again: planned for when its blocks can be
        shared, else the reason in ``off_reason`` (and one warning)."""
        try:
            self._take(_checked_blocks(self.tower.transformer))
        except NotShareable as e:
            self._take(None)
            reason = f"the text transformer changed after the shared-prefix encoder was built: {e}"
            if reason != self.off_reason:
                warnings.warn(f"{reason}; using the full text encoder", stacklevel=5)
            self.off_reason = reason
            return
        self.off_reason = None

    def forward(self, prefix: Tensor, suffixes: Tensor, *, per_prefix: bool = False,
                deep: Sequence[Tensor] | None = None, deep_start: int = 1) -> Tensor:
        """Text features of the prompts ``[prefix[b]; suffixes[c]]``: token embeddings of
        the shared prefixes (B, P, width) and of the class suffixes (C, prompt_length - P,
        width) (:meth:`PromptLearner.prefix_and_suffixes`).

        Without ``per_prefix``: one prefix (1, P, width), features (C, D).  With
        ``per_prefix=True`` (CoCoOp: one prefix per image, its context made from the image):
        B >= 1 prefixes, features (B, C, D), also for B = 1.  Each prefix runs once; every
        class suffix attends to its own image's prefix.

        ``deep``, ``deep_start``: deep text prompts (MaPLe / IVLP), as
        :meth:`TextTower.encode_embeddings` takes them: before block ``j + 1`` the prefix
        rows ``deep_start .. deep_start + n - 1`` of every prefix are replaced by ``deep[j]``
        (n, width).  They are the same rows in every prompt, so the prefix is still shared;
        the rows must lie inside the prefix (else a ``ValueError``)."""
        if not self._planned():
            raise NotShareable(self.off_reason)
        self._check_inputs(prefix, suffixes, per_prefix)
        p = self.prefix_length
        n_cls, length, width = suffixes.shape
        deep = [] if deep is None else check_deep(deep, deep_start, p, width, len(self._blocks))
        tower = self.tower
        dtype = tower.dtype
        n_img = prefix.shape[0]
        stored = suffixes.reshape(n_cls * length, width).index_select(0, self.rows)
        x = torch.cat([prefix, stored.expand(n_img, *stored.shape)], dim=1)  # (B, rows, width)
        x = x.to(dtype) + tower.positional_embedding.index_select(0, self.positions).to(dtype)
        for i, blk in enumerate(self._blocks):
            if 1 <= i <= len(deep):
                ctx = deep[i - 1].to(dtype)
                before, _, after = x.split([deep_start, len(ctx), x.shape[1] - deep_start - len(ctx)], 1)
                x = torch.cat([before, ctx.expand(n_img, *ctx.shape), after], dim=1)
            x = self._block(blk, x)
        out = tower.head(x.index_select(1, self.eot_rows))  # (B, C, D)
        return out if per_prefix else out[0]

    def _check_inputs(self, prefix: Tensor, suffixes: Tensor, per_prefix: bool) -> None:
        p = self.prefix_length
        if (prefix.dim() != 3 or suffixes.dim() != 3 or prefix.shape[1:] != (p, suffixes.shape[2])
                or prefix.shape[0] < 1 or (prefix.shape[0] != 1 and not per_prefix)
                or suffixes.shape[:2] != (self.n_cls, self.prompt_length - p)):
            many = "(B" if per_prefix else "(1"
            raise ValueError(f"expected a {many}, {p}, width) prefix and {self.n_cls} x "
                             f"{self.prompt_length - p} suffix tokens (several prefixes need "
                             f"per_prefix=True), got {tuple(prefix.shape)} and {tuple(suffixes.shape)}")

    def encode_full(self, prefix: Tensor, suffixes: Tensor, *, per_prefix: bool = False,
                    deep: Sequence[Tensor] | None = None, deep_start: int = 1) -> Tensor:
        """What :meth:`forward` computes, through :meth:`TextTower.encode_embeddings` on all
        B * C whole prompts: the path for calls where :meth:`applies` is False (hooks,
        dropout in training), same arguments and shapes."""
        self._check_inputs(prefix, suffixes, per_prefix)
        n_img, (n_cls, length, width) = prefix.shape[0], suffixes.shape
        if deep is not None:  # the same check (and message) as forward: rows inside the prefix
            check_deep(deep, deep_start, self.prefix_length, width, len(self.tower.transformer.resblocks))
        prompts = torch.cat([prefix[:, None].expand(n_img, n_cls, -1, -1),
                             suffixes[None].expand(n_img, -1, -1, -1)], dim=2)
        out = self.tower.encode_embeddings(prompts.reshape(n_img * n_cls, -1, width),
                                           self.eot.repeat(n_img), deep=deep, deep_start=deep_start)
        out = out.view(n_img, n_cls, -1)
        return out if per_prefix else out[0]

    def _block(self, blk: nn.Module, x: Tensor) -> Tensor:
        attn = blk.attn
        if isinstance(attn, nn.MultiheadAttention):
            y = self._mha(attn, blk.ln_1(x))
        else:
            y = blk.ln_attn(self._custom_attention(attn, blk.ln_1(x)))
        x = x + blk.ls_1(y)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def _mha(self, attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
        n_img, rows, width = x.shape
        heads = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(n_img, rows, 3, heads, -1)
        q, k, v = qkv.unbind(2)
        out = self._attend(q, k, v).reshape(n_img, rows, width)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)

    def _custom_attention(self, attn: nn.Module, x: Tensor) -> Tensor:
        n_img, rows, width = x.shape
        heads = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(n_img, rows, 3, heads, -1)
        q, k, v = qkv.unbind(2)
        out = self._attend(attn.ln_q(q), attn.ln_k(k), v)
        if attn.head_scale is not None:
            out = out * attn.head_scale.view(heads, 1)
        return attn.out_proj(attn.ln_inner(out.reshape(n_img, rows, width)))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of rows ``[prefix; stored suffixes]`` of each prefix, given as (B, rows,
        heads, head_dim)."""
        # one split per tensor (its backward is one cat), not a slice per segment (whose
        # backwards would each write and add a full-size gradient)
        sizes = self._split_sizes
        (qp, *qs), (kp, *ks), (vp, *vs) = (t.split(sizes, dim=1) for t in (q, k, v))
        kp, vp = kp.transpose(1, 2), vp.transpose(1, 2)  # (B, H, P, d)
        outs = [F.scaled_dot_product_attention(qp.transpose(1, 2), kp, vp, is_causal=True).transpose(1, 2)]
        for i, seg in enumerate(self.segments):
            qi, ki, vi = qs[i], ks[i], vs[i]
            if seg.gathered:
                qi, ki, vi = (t.index_select(1, self.gather) for t in (qi, ki, vi))
            out = _suffix_attention(qi, ki, vi, kp, vp, seg.n_cls, seg.length,
                                    getattr(self, f"mask{i}"))
            outs.append(out.index_select(1, self.scatter) if seg.gathered else out)
        return torch.cat(outs, dim=1)


def _suffix_attention(q: Tensor, k: Tensor, v: Tensor, kp: Tensor, vp: Tensor, n: int, s: int,
                      masked: Tensor) -> Tensor:
    """Attention of ``n`` suffixes of ``s`` rows each per prefix (q, k, v: (B, n*s, H, d))
    over their own prefix's keys/values ``kp``, ``vp`` (B, H, P, d) and their own causal keys
    (``masked``: (s, P + s), True where a key is later than the query), without copying a
    prefix per suffix: the prefix scores are one (B, H, n*s, P) product.  Softmax in at
    least fp32."""
    b, heads, p, d = kp.shape
    q = q * d ** -0.5  # scaled before the products, as torch's attention does (fp16 range)
    pre = torch.matmul(q.transpose(1, 2), kp.transpose(2, 3)).view(b, heads, n, s, p).transpose(1, 2)
    q5 = q.view(b, n, s, heads, d).transpose(2, 3)  # (B, n, H, s, d)
    own = torch.matmul(q5, k.view(b, n, s, heads, d).permute(0, 1, 3, 4, 2))  # (B, n, H, s, s)
    scores = torch.cat([pre, own], dim=-1).masked_fill(masked, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    out = torch.matmul(probs[..., p:], v.view(b, n, s, heads, d).transpose(2, 3))  # (B, n, H, s, d)
    pre_out = torch.matmul(probs[..., :p].transpose(1, 2).reshape(b, heads, n * s, p), vp)
    return (out.transpose(2, 3) + pre_out.view(b, heads, n, s, d).permute(0, 2, 3, 1, 4)
            ).reshape(b, n * s, heads, d)


def shared_prefix_encoder(tower: TextTower, prompt_learner: nn.Module, layout: str = DEFAULT_LAYOUT
                          ) -> tuple[SharedPrefixEncoder | None, str | None]:
    """``(encoder, None)`` where sharing the prompt prefix is exact, else ``(None, reason)``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    prefix = prompt_learner.shared_prefix_length
    if prefix == 0:  # the learner says why nothing is shared
        return None, getattr(prompt_learner, "shared_prefix_off", "no prompt prefix is shared")
    try:
        return (SharedPrefixEncoder(tower, prefix, prompt_learner.eot, prompt_learner.length, layout),
                None)
    except NotShareable as e:
        return None, str(e)
