"""Shared-prefix text encoding equals the full 77-token encoder; where it applies, where not.

The reference is open_clip's own transformer run on the full 77-token prompts (float64),
pooled at the end-of-text tokens; compared are the features and the gradients with respect
to the learned context under two cotangents (ProGrad's domain and general gradients).
"""

import warnings

import open_clip
import pytest
import torch
from torch import nn

from prograd_fast import prograd_losses
from prograd_fast.amp import pending_general_grads
from prograd_fast.clip import PromptedCLIP, PromptLearner, TextTower, build_optimizer, compute_grads, train_step
from prograd_fast.clip import train as train_mod
from prograd_fast.clip.prompt import default_tokenizer
from prograd_fast.clip.shared_prefix import (LAYOUTS, NotShareable, SharedPrefixEncoder,
                                             shared_prefix_encoder)

from clip_helpers import CLASSNAMES, tiny_cfg

TOK = default_tokenizer(77)  # built once: loading the BPE vocabulary takes a while

# class names of 1 to 6 BPE tokens, so suffix lengths differ
NAMES = ["dog", "golden retriever", "sea_lion", "x", "traffic light", "a", "great white shark",
         "hen", "tree frog", "Komodo dragon", "king penguin", "crane", "bittern bird of prey"]

TOWERS = {  # text-tower options of open_clip (CLIP kwargs under "clip")
    "default": {},
    "width48_heads3_layers3": dict(width=48, heads=3, layers=3),
    "width64_heads4_layers1": dict(width=64, heads=4, layers=1),
    "layer_scale": dict(ls_init_value=0.5),
    "custom_block": dict(block_type="custom"),
    "qk_norm": dict(qk_norm=True, ls_init_value=0.3),
    "normformer": dict(scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True),
    "eos_pool_linear_proj_mlp2": dict(pool_type="eos", eos_id=49407, proj_bias=True, mlp_ratio=2.0),
    "quick_gelu": dict(clip=dict(quick_gelu=True)),
    "custom_text_clip": dict(clip=dict(custom_text=True)),
    "sequence_first": dict(clip=dict(sequence_first=True)),  # Transformer(batch_first=False)
}


def make_clip(seed: int = 0, clip=None, **text) -> nn.Module:
    """A tiny random open_clip model whose 1-D parameters (norms, biases, layer scales, head
    scales) are perturbed too, so that a block part left out cannot go unnoticed."""
    clip = dict(clip or {})
    torch.manual_seed(seed)
    cls = open_clip.CustomTextCLIP if clip.pop("custom_text", False) else open_clip.CLIP
    sequence_first = clip.pop("sequence_first", False)
    model = cls(**tiny_cfg(**text), **clip).eval()
    if sequence_first:  # what Transformer(batch_first=False) builds
        model.transformer.batch_first = False
        for blk in model.transformer.resblocks:
            blk.attn.batch_first = False
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 or p.shape[1:] == (1, 1):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def reference_features(tower: TextTower, learner: PromptLearner) -> torch.Tensor:
    """Features through open_clip's own transformer at the full context length."""
    emb, eot = learner()
    length = tower.context_length
    assert emb.shape[1] == length
    x = emb.to(tower.dtype) + tower.positional_embedding.to(tower.dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask)
    x = tower.ln_final(x[torch.arange(len(eot)), eot])
    proj = tower.text_projection
    return proj(x) if isinstance(proj, nn.Module) else x @ proj


def features_and_grads(learner, encode, cotangents, batched=True):
    feats = encode()
    if batched:
        grads, = torch.autograd.grad(feats, learner.ctx, grad_outputs=cotangents.to(feats.dtype),
                                     is_grads_batched=True)
    else:
        grads = torch.stack([torch.autograd.grad(feats, learner.ctx, grad_outputs=c.to(feats.dtype),
                                                 retain_graph=True)[0] for c in cotangents])
    return feats.detach(), grads


def learners(tower, names, position="end", n_ctx=5, **kw):
    """The same prompt learner (same context) truncated and at full length."""
    out = []
    for truncate in (True, False):
        torch.manual_seed(7)
        out.append(PromptLearner(tower, names, TOK, n_ctx=n_ctx, class_token_position=position,
                                 truncate=truncate, **kw))
    return out


def cotangents_for(tower, n_cls, seed=0, dtype=torch.float64):
    dim = tower.text_projection.shape[-1] if isinstance(tower.text_projection, torch.Tensor) \
        else tower.text_projection.out_features
    return torch.randn(2, n_cls, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("position", ["end", "middle"])
@pytest.mark.parametrize("config", list(TOWERS))
def test_features_and_both_grads_equal_full_encoder_float64(config, position, truncate):
    model = make_clip(seed=len(config), **TOWERS[config]).double()
    tower = TextTower.from_model(model)
    short, full = learners(tower, NAMES, position)
    learner = short if truncate else full
    enc = SharedPrefixEncoder(tower, learner.shared_prefix_length, learner.eot, learner.length)
    cot = cotangents_for(tower, len(NAMES))
    want = features_and_grads(full, lambda: reference_features(tower, full), cot)
    got = features_and_grads(learner, lambda: enc(*learner.prefix_and_suffixes()), cot)
    assert want[1].abs().amax(dim=(1, 2)).min() > 0  # both gradients non-zero
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12 * w.abs().max())


@pytest.mark.parametrize("ctx_init", ["a photo of a", "a type of pet, a photo of a"])
def test_official_prograd_ctx_init_float64(ctx_init):
    """ctx_init_mode="prograd" (zeros, then the template's words; a comma's extra token stays
    fixed after the context, in every suffix): equal to the full encoder."""
    tower = TextTower.from_model(make_clip(seed=21).double())
    short, full = learners(tower, NAMES, "end", n_ctx=8, ctx_init=ctx_init, ctx_init_mode="prograd")
    assert short.shared_prefix_length == 9
    with torch.no_grad():  # the zeros would hide a misplaced context vector
        for pl in (short, full):
            pl.ctx.add_(torch.randn(pl.ctx.shape, generator=torch.Generator().manual_seed(1),
                                    dtype=pl.ctx.dtype))
    enc = SharedPrefixEncoder(tower, short.shared_prefix_length, short.eot, short.length)
    cot = cotangents_for(tower, len(NAMES))
    want = features_and_grads(full, lambda: reference_features(tower, full), cot)
    got = features_and_grads(short, lambda: enc(*short.prefix_and_suffixes()), cot)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12 * w.abs().max())


def test_transferred_context_keeps_the_share_prefix_choice():
    from prograd_fast.clip.trainer import transfer_context

    for share in (True, False, "packed"):
        model = PromptedCLIP(make_clip(), CLASSNAMES, tokenizer=TOK, n_ctx=3, share_prefix=share)
        other = transfer_context(model, NAMES[:4], tokenizer=TOK)
        assert other.share_prefix == share
        assert (other.shared_prefix is None) == (share is False)
        if share == "packed":
            assert other.shared_prefix.layout == "packed"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_cls", [1, 2, 3, 5, 11, 13])
def test_layouts_and_odd_class_counts(layout, n_cls):
    model = make_clip(seed=n_cls).double()
    tower = TextTower.from_model(model)
    names = NAMES[-n_cls:]
    short, full = learners(tower, names, "end", n_ctx=3)
    enc = SharedPrefixEncoder(tower, short.shared_prefix_length, short.eot, short.length, layout)
    cot = cotangents_for(tower, n_cls, seed=n_cls)
    want = features_and_grads(full, lambda: reference_features(tower, full), cot)
    for batched in (True, False):
        got = features_and_grads(short, lambda: enc(*short.prefix_and_suffixes()), cot, batched)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12 * w.abs().max())
    lengths = enc.suffix_lengths
    assert enc.tokens_per_step == enc.prefix_length + (
        n_cls * max(lengths) if layout == "padded" else sum(lengths))


def test_prefix_rows_are_identical_in_every_prompt():
    """What sharing relies on: the first shared_prefix_length embeddings of every prompt are
    the same (and the next one is not, at the end position)."""
    tower = TextTower.from_model(make_clip())
    for position, n_ctx in (("end", 4), ("middle", 5), ("middle", 2)):
        pl = PromptLearner(tower, NAMES, TOK, n_ctx=n_ctx, class_token_position=position)
        emb, _ = pl()
        p = pl.shared_prefix_length
        assert p == 1 + (n_ctx if position == "end" else n_ctx // 2)
        assert torch.equal(emb[:, :p], emb[:1, :p].expand(len(NAMES), -1, -1))
        assert not torch.equal(emb[:, p], emb[:1, p].expand(len(NAMES), -1))
        prefix, suffixes = pl.prefix_and_suffixes()
        assert torch.equal(prefix, emb[:1, :p]) and torch.equal(suffixes, emb[:, p:])
    for kw in (dict(class_specific=True), dict(class_token_position="front")):
        pl = PromptLearner(tower, NAMES, TOK, n_ctx=4, **kw)
        assert pl.shared_prefix_length == 0
        with pytest.raises(ValueError, match="no prefix"):
            pl.prefix_and_suffixes()


@pytest.mark.parametrize("mode", ["batched", "two_pass"])
@pytest.mark.parametrize("position", ["end", "middle"])
def test_prograd_grads_through_prompted_clip_equal_full_encoder(mode, position):
    """compute_grads (both ProGrad gradients) with the shared prefix == without it at full
    77-token length, float64, both grad modes."""
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3)).double()
    labels = torch.tensor([0, 3, 5, 6, 2, 1])
    out = []
    for share, truncate in ((True, True), (False, False)):
        torch.manual_seed(5)
        model = PromptedCLIP(make_clip(seed=9).double(), CLASSNAMES, tokenizer=TOK, n_ctx=4, share_prefix=share,
                             truncate=truncate, class_token_position=position)
        assert (model.shared_prefix is not None) == share
        with torch.no_grad():
            model.prompt_learner.ctx.add_(torch.randn_like(model.prompt_learner.ctx))
        opt = build_optimizer(model, lam=1.0)
        img = model.encode_image(images)
        feats = model.text_features()
        ce, kl = prograd_losses(model.logits(img, feats), model.zeroshot_logits(img), labels)
        compute_grads(opt, feats, ce, kl, grad_mode=mode)
        ctx = model.prompt_learner.ctx
        out.append((ctx.grad.clone(), pending_general_grads(opt)[0].clone()))
    for g, w in zip(*out):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-13)


def test_train_steps_equal_with_and_without_sharing():
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(4)).double()
    labels = torch.tensor([1, 0, 4, 6, 3])
    ctxs = []
    for share in ("bucketed", "packed", False):
        torch.manual_seed(6)
        model = PromptedCLIP(make_clip(seed=2).double(), CLASSNAMES, tokenizer=TOK, n_ctx=4, share_prefix=share)
        opt = build_optimizer(model, lr=0.5, lam=1.0)
        for _ in range(3):
            train_step(model, opt, images, labels)
        ctxs.append(model.prompt_learner.ctx.detach())
    for c in ctxs[:-1]:
        torch.testing.assert_close(c, ctxs[-1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("config", ["default", "qk_norm"])
def test_fp32_and_bf16_autocast_as_close_to_float64_as_todays_encoder(config, amp):
    """fp32 model (with and without bf16 autocast): the shared encoder's error against the
    float64 reference is within the dtype's rounding and no larger than the truncated
    encoder's own error (up to a factor for rounding noise)."""
    ref_model = make_clip(seed=11, **TOWERS[config]).double()
    model = make_clip(seed=11, **TOWERS[config])
    ref_tower, tower = TextTower.from_model(ref_model), TextTower.from_model(model)
    ref, _ = learners(ref_tower, NAMES, "end")
    short, _ = learners(tower, NAMES, "end", dtype=torch.float32)
    enc = SharedPrefixEncoder(tower, short.shared_prefix_length, short.eot, short.length)
    cot = cotangents_for(tower, len(NAMES))
    want = features_and_grads(ref, lambda: ref_tower.encode_embeddings(*ref()), cot)
    ctx = torch.autocast("cpu", dtype=amp) if amp else torch.autocast("cpu", enabled=False)

    def run(encode):
        with ctx:
            return features_and_grads(short, encode, cot.float())

    got = run(lambda: enc(*short.prefix_and_suffixes()))
    today = run(lambda: tower.encode_embeddings(*short()))
    # bf16 rounding (2**-8) compounds through the blocks; the backward more so: today's
    # truncated encoder is off by ~0.8% (features) and ~2% (gradients) here
    tols = (1.6e-2, 4e-2) if amp else (1e-5, 1e-5)
    for g, t, w, tol in zip(got, today, want, tols):
        scale = w.abs().max()
        err, err_today = (g.double() - w).abs().max() / scale, (t.double() - w).abs().max() / scale
        assert err <= tol, (err, err_today)
        assert err <= 3 * err_today + tol / 10, (err, err_today)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tower(dtype):
    """A CLIP in bf16 / fp16 as open_clip builds it (low-precision linear layers,
    LayerNormFp32), fp32 context: shared and truncated encoders agree to the dtype's
    rounding."""
    model = make_clip(seed=12, clip=dict(cast_dtype=dtype))
    open_clip.model.convert_weights_to_lp(model, dtype)  # what open_clip does for fp16/bf16
    assert isinstance(model.transformer.resblocks[0].ln_1, open_clip.transformer.LayerNormFp32)
    assert model.transformer.resblocks[0].mlp.c_fc.weight.dtype == dtype
    tower = TextTower.from_model(model)
    short, _ = learners(tower, NAMES, "end", dtype=torch.float32)
    enc = SharedPrefixEncoder(tower, short.shared_prefix_length, short.eot, short.length)
    cot = cotangents_for(tower, len(NAMES), dtype=torch.float32)
    got = features_and_grads(short, lambda: enc(*short.prefix_and_suffixes()), cot)
    want = features_and_grads(short, lambda: tower.encode_embeddings(*short()), cot)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.isfinite(g).all()
        assert (g.float() - w.float()).abs().max() <= 3e-2 * w.float().abs().max()


def test_batched_backward_has_batching_rules():
    """No op of the shared encoder makes vmap fall back to a slow loop (grad_mode "auto"
    would then give up the batched backward)."""
    model = PromptedCLIP(make_clip(seed=1), CLASSNAMES, tokenizer=TOK, n_ctx=4)
    images = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    train_mod._AUTO.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step(model, build_optimizer(model), images, labels, grad_mode="auto")
    assert not [w for w in caught if "batching rule" in str(w.message)]
    assert train_mod._AUTO[("cpu", torch.float32)] == "batched"
    train_mod._AUTO.clear()


# ---- where sharing does not apply: today's path, with the reason -------------------------

@pytest.mark.parametrize("kw, why", [
    (dict(class_specific=True), "class-specific"),
    (dict(class_token_position="front"), "in front"),
    (dict(class_token_position="middle", n_ctx=1), "middle"),
    (dict(share_prefix=False), "share_prefix=False"),
])
def test_no_shared_prefix_falls_back_to_todays_encoder(kw, why):
    kw.setdefault("n_ctx", 4)
    model = PromptedCLIP(make_clip(seed=3).double(), CLASSNAMES, tokenizer=TOK, **kw)
    assert model.shared_prefix is None and why in model.shared_prefix_off
    feats = model.text_features()
    torch.testing.assert_close(feats, model.tower.encode_embeddings(*model.prompt_learner()),
                               rtol=0, atol=0)


def _refusals():
    def cosine(m):
        return make_clip(scaled_cosine_attn=True)

    def subclass_block(m):
        blk = m.transformer.resblocks[1]
        blk.__class__ = type("MyBlock", (open_clip.transformer.ResidualAttentionBlock,), {})
        return m

    def dropout_mlp(m):
        m.transformer.resblocks[0].mlp.add_module("drop", nn.Dropout(0.1))
        return m

    def bias_kv(m):
        blk = m.transformer.resblocks[0]
        blk.attn = nn.MultiheadAttention(32, 2, add_bias_kv=True, batch_first=True)
        return m

    def mha_subclass(m):
        class ScaledMHA(nn.MultiheadAttention):
            def forward(self, *a, **kw):
                out, w = super().forward(*a, **kw)
                return 2 * out, w

        blk = m.transformer.resblocks[0]
        old = blk.attn
        blk.attn = ScaledMHA(32, 2, batch_first=True)
        blk.attn.load_state_dict(old.state_dict())
        return m

    def separate_qkv(m):
        blk = m.transformer.resblocks[0]
        blk.attn = nn.MultiheadAttention(32, 2, kdim=16, vdim=16, batch_first=True)
        return m

    def foreign_attention(m):
        blk = m.transformer.resblocks[0]
        blk.attn = open_clip.transformer.Attention(32, 2)
        return m

    def mixing_linear(m):  # a per-token layer's subclass whose forward mixes the tokens
        class MixingLinear(nn.Linear):
            def forward(self, x):
                return super().forward(x) + x.mean(-2, keepdim=True).sum(-1, keepdim=True)

        mlp = m.transformer.resblocks[1].mlp
        old = mlp.c_fc
        mlp.c_fc = MixingLinear(old.in_features, old.out_features)
        mlp.c_fc.load_state_dict(old.state_dict())
        return m

    def subclass_transformer(m):
        m.transformer.__class__ = type("MyTransformer", (open_clip.transformer.Transformer,), {})
        return m

    return {"scaled cosine": cosine, "MyBlock": subclass_block, "MyTransformer": subclass_transformer, "Dropout": dropout_mlp,
            "bias_k": bias_kv, "ScaledMHA": mha_subclass, "separate q/k/v": separate_qkv,
            "attn is a Attention": foreign_attention, "MixingLinear": mixing_linear}


@pytest.mark.parametrize("why", list(_refusals()))
def test_unhandled_blocks_fall_back_with_the_reason(why):
    clip = _refusals()[why](make_clip())
    tower = TextTower.from_model(clip)
    pl = PromptLearner(tower, CLASSNAMES, TOK, n_ctx=3)
    enc, reason = shared_prefix_encoder(tower, pl)
    assert enc is None and why in reason
    # the others do not run in open_clip either (3.3 cannot run scaled cosine attention)
    if why in ("MyBlock", "MyTransformer", "Dropout", "bias_k", "ScaledMHA", "MixingLinear"):
        model = PromptedCLIP(clip, CLASSNAMES, n_ctx=3, tokenizer=TOK)
        assert model.shared_prefix is None and why in model.shared_prefix_off
        torch.testing.assert_close(model.text_features(),
                                   tower.encode_embeddings(*model.prompt_learner()))


def test_hooks_and_training_dropout_use_todays_encoder_at_call_time(monkeypatch):
    model = PromptedCLIP(make_clip(seed=4).double(), CLASSNAMES, tokenizer=TOK, n_ctx=3)
    enc = model.shared_prefix
    calls = []
    monkeypatch.setattr(type(enc), "forward",
                        lambda self, p, s: calls.append(1) or self.tower.head(s[:, 0]))
    model.text_features()
    assert calls == [1] and enc.applies()
    seen = []
    handle = model.clip.transformer.resblocks[1].mlp.register_forward_hook(lambda *a: seen.append(1))
    assert not enc.applies()
    model.text_features()
    assert calls == [1] and seen == [1]  # today's encoder ran, the hook fired once
    handle.remove()
    assert enc.applies()
    model.clip.transformer.resblocks[0].attn.dropout = 0.1
    assert enc.applies()  # eval mode: dropout is off
    model.clip.transformer.train()
    assert not enc.applies()
    model.train()  # PromptedCLIP keeps the frozen CLIP in eval mode
    assert enc.applies()
    custom = PromptedCLIP(make_clip(block_type="custom"), CLASSNAMES, tokenizer=TOK, n_ctx=3)
    custom.clip.transformer.resblocks[1].attn.attn_drop.p = 0.1
    assert custom.shared_prefix.applies()
    custom.clip.transformer.resblocks[1].attn.train()
    assert not custom.shared_prefix.applies()


def test_bad_inputs():
    model = PromptedCLIP(make_clip(), CLASSNAMES, tokenizer=TOK, n_ctx=3)
    with pytest.raises(ValueError, match="layout"):
        PromptedCLIP(make_clip(), CLASSNAMES, tokenizer=TOK, n_ctx=3, share_prefix="ragged")
    prefix, suffixes = model.prompt_learner.prefix_and_suffixes()
    for args in ((prefix, suffixes[:, :-1]), (prefix, suffixes[:-1]), (prefix[:, 1:], suffixes),
                 (prefix.expand(2, -1, -1), suffixes)):
        with pytest.raises(ValueError, match="expected a"):
            model.shared_prefix(*args)


def test_state_dict_and_dtype_moves_keep_the_index_buffers():
    plain = PromptedCLIP(make_clip(), CLASSNAMES, tokenizer=TOK, n_ctx=3, share_prefix=False)
    model = PromptedCLIP(make_clip(), CLASSNAMES, tokenizer=TOK, n_ctx=3)
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints unchanged
    model.double()
    assert model.shared_prefix.rows.dtype == torch.long and model.shared_prefix.mask0.dtype == torch.bool
    torch.testing.assert_close(model.text_features(),
                               model.tower.encode_embeddings(*model.prompt_learner()),
                               rtol=1e-9, atol=1e-12)


# ---- the tower changed after the encoder was built: checked at call time -----------------

CTX_INIT = "a photo of a"  # the context is these words' embeddings: open_clip can encode it


def _open_clip_features(clip, model):
    """open_clip's own encode_text of the prompt learner's prompts (untrained ctx_init)."""
    texts = [f"{CTX_INIT} {name}." for name in model.prompt_learner.classnames]
    with torch.no_grad():
        return clip.encode_text(TOK(texts))


def _edits():
    oct = open_clip.transformer

    def prune_custom_text(clip):  # open_clip's own pruning of a CustomTextCLIP text tower
        clip.text.prune_intermediate_layers([0], prune_norm=True)

    def prune_blocks(clip):
        clip.transformer.prune_intermediate_layers([1])

    def new_block(clip):
        torch.manual_seed(11)
        clip.transformer.resblocks[1] = oct.ResidualAttentionBlock(32, 2, batch_first=True).double()

    def new_attn(clip):
        torch.manual_seed(12)
        attn = nn.MultiheadAttention(32, 2, batch_first=True).double()
        with torch.no_grad():
            attn.in_proj_bias.normal_()
        clip.transformer.resblocks[0].attn = attn

    def unshareable_block(clip):  # a block of another class: no plan, open_clip's encoder
        class MyBlock(oct.ResidualAttentionBlock):
            pass
        clip.transformer.resblocks[0].__class__ = MyBlock

    def unshareable_attn(clip):
        clip.transformer.resblocks[1].attn = nn.MultiheadAttention(
            32, 2, add_bias_kv=True, batch_first=True).double()

    return {"prune_custom_text": (prune_custom_text, None),
            "prune_blocks": (prune_blocks, None), "new_block": (new_block, None),
            "new_attn": (new_attn, None), "unshareable_block": (unshareable_block, "MyBlock"),
            "unshareable_attn": (unshareable_attn, "bias_k")}


@pytest.mark.parametrize("edit", list(_edits()))
def test_encoder_follows_a_changed_tower_or_falls_back_with_the_reason(edit):
    """After open_clip's ``prune_intermediate_layers`` or a replaced block / ``attn``, the
    text features are open_clip's own (float64), never the blocks seen at build: the
    encoder plans again where it can share, else falls back, saying why once."""
    change, why = _edits()[edit]
    clip = make_clip(seed=5, clip=dict(custom_text=edit == "prune_custom_text"),
                     layers=3).double()
    model = PromptedCLIP(clip, NAMES, tokenizer=TOK, n_ctx=4, ctx_init=CTX_INIT)
    enc = model.shared_prefix
    assert enc is not None and enc.applies()
    torch.testing.assert_close(model.text_features().detach(), _open_clip_features(clip, model),
                               rtol=1e-10, atol=1e-12)
    change(clip)
    want = _open_clip_features(clip, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.text_features().detach()
        assert enc.applies() is (why is None)
        model.text_features()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if why is None:
        assert enc.off_reason is None and not caught
    else:
        assert "changed" in enc.off_reason and why in enc.off_reason
        assert len(caught) == 1 and why in str(caught[0].message)
        with pytest.raises(NotShareable, match=why):  # called directly: refuses, never stale
            enc(*model.prompt_learner.prefix_and_suffixes())


def test_prompt_of_exactly_the_context_length_is_accepted():
    """A prompt filling all 77 tokens (its end-of-text in the last slot) fits, as in open_clip;
    one token more is still refused.  Its features are open_clip's."""
    clip = make_clip(seed=6).double()
    name = " ".join(["dog"] * (77 - 2 - len(TOK.encode(CTX_INIT)) - 1))  # SOS, ctx, name, '.', EOT
    assert len(TOK.encode(f"{CTX_INIT} {name}.")) + 2 == 77
    model = PromptedCLIP(clip, [name, "cat"], tokenizer=TOK, ctx_init=CTX_INIT)
    assert model.prompt_learner.eot.tolist()[0] == 76 and model.shared_prefix is not None
    torch.testing.assert_close(model.text_features().detach(), _open_clip_features(clip, model),
                               rtol=1e-10, atol=1e-12)
    full = PromptedCLIP(clip, [name, "cat"], tokenizer=TOK, ctx_init=CTX_INIT, share_prefix=False)
    torch.testing.assert_close(full.text_features().detach(), _open_clip_features(clip, model),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="do not fit in 77"):
        PromptedCLIP(clip, [name + " dog", "cat"], tokenizer=TOK, ctx_init=CTX_INIT)


@pytest.mark.parametrize("position", ["end", "middle"])
def test_eos_pooled_tower_whose_tokenizer_never_emits_its_eos_is_refused(position):
    clip = make_clip(seed=7, pool_type="eos", eos_id=1)
    with pytest.raises(ValueError, match=r"eos id 1\b.*end with id 49407") as info:
        PromptedCLIP(clip, NAMES, tokenizer=TOK, n_ctx=4, class_token_position=position)
    assert "\n" not in str(info.value)
