"""Truncated text encoding equals open_clip's full 77-token encoding; refused towers."""

import open_clip
import pytest
import torch

from prograd_fast.clip import PromptLearner, TextTower, UnsupportedTextTowerError
from prograd_fast.clip.prompt import default_tokenizer

from clip_helpers import CLASSNAMES, tiny_clip, tiny_cfg


def _full_encode_text(model, embeddings):
    """open_clip's encode_text, step by step, on embeddings instead of token ids (float64)."""
    x = embeddings + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_truncated_prompts_equal_full_encoding(position, class_specific):
    model = tiny_clip().double()
    tower = TextTower.from_model(model)
    kw = dict(n_ctx=5, class_token_position=position, class_specific=class_specific)
    torch.manual_seed(1)
    short = PromptLearner(tower, CLASSNAMES, **kw, truncate=True)
    torch.manual_seed(1)
    full = PromptLearner(tower, CLASSNAMES, **kw, truncate=False)
    assert short.length < 20 and full.length == 77
    torch.testing.assert_close(short.ctx, full.ctx)
    emb_s, eot = short()
    emb_f, _ = full()
    torch.testing.assert_close(emb_f[:, : short.length], emb_s, rtol=0, atol=0)
    got = tower.encode_embeddings(emb_s, eot)
    want = _full_encode_text(model, emb_f)[torch.arange(len(CLASSNAMES)), eot] @ model.text_projection
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the EOT column of the prompts holds the EOT embedding (class name and '.' before it)
    eot_emb = model.token_embedding.weight[49407]
    for i, e in enumerate(eot.tolist()):
        torch.testing.assert_close(emb_s[i, e], eot_emb)


def test_encode_tokens_matches_open_clip_fp32():
    model = tiny_clip(seed=3)
    tower = TextTower.from_model(model)
    tok = default_tokenizer(77)
    tokens = tok([f"a photo of a {c}, a type of thing." for c in CLASSNAMES])
    with torch.no_grad():
        want = model.encode_text(tokens)
        got = tower.encode_tokens(tokens, truncate=True)
        full = tower.encode_tokens(tokens, truncate=False)
    assert (got - want).abs().max() < 1e-5
    assert (full - want).abs().max() < 1e-5


def test_learned_context_gradient_equal_truncated_vs_full():
    model = tiny_clip(seed=4).double()
    tower = TextTower.from_model(model)
    out = []
    for truncate in (True, False):
        torch.manual_seed(2)
        pl = PromptLearner(tower, CLASSNAMES, n_ctx=4, truncate=truncate)
        feats = tower.encode_embeddings(*pl())
        w = torch.linspace(-1, 1, feats.numel(), dtype=feats.dtype).view_as(feats)
        (feats * w).sum().backward()
        out.append(pl.ctx.grad)
    torch.testing.assert_close(out[0], out[1], rtol=1e-9, atol=1e-12)


def test_ctx_init_uses_word_embeddings():
    model = tiny_clip()
    tower = TextTower.from_model(model)
    pl = PromptLearner(tower, CLASSNAMES, ctx_init="a photo of a", n_ctx=16)
    assert pl.n_ctx == 4 and pl.ctx.shape == (4, 32)
    ids = default_tokenizer(77)(["a photo of a"])[0, 1:5]
    torch.testing.assert_close(pl.ctx.detach(), model.token_embedding.weight[ids].detach())


def test_fp32_context_on_fp16_tower():
    model = tiny_clip().half()
    tower = TextTower.from_model(model)
    pl = PromptLearner(tower, CLASSNAMES, n_ctx=3, dtype=torch.float32)
    assert pl.ctx.dtype == torch.float32
    pl16 = PromptLearner(tower, CLASSNAMES, n_ctx=3)
    assert pl16.ctx.dtype == torch.float16


@pytest.mark.parametrize("text, match", [
    (dict(no_causal_mask=True, pool_type="last"), "not causal"),
    (dict(pool_type="first"), "text_pool_type"),
])
def test_refuses_non_causal_towers(text, match):
    model = open_clip.CLIP(**tiny_cfg(**text))
    with pytest.raises(UnsupportedTextTowerError, match=match):
        TextTower.from_model(model)


def test_refuses_coca_and_hf_towers():
    coca_cfg = tiny_cfg()
    coca_cfg["multimodal_cfg"] = dict(context_length=76, width=32, heads=2, layers=1)
    coca_cfg["text_cfg"].update(embed_cls=True, pad_id=0, pool_type="last")
    coca = open_clip.CoCa(**coca_cfg)
    with pytest.raises(UnsupportedTextTowerError, match="CoCa"):
        TextTower.from_model(coca)

    class HFTextEncoder(torch.nn.Module):
        pass

    class CustomTextCLIP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = HFTextEncoder()
    with pytest.raises(UnsupportedTextTowerError, match="Hugging Face"):
        TextTower.from_model(CustomTextCLIP())


def test_custom_text_clip_with_causal_tower_is_accepted():
    model = open_clip.CustomTextCLIP(**tiny_cfg()).eval()
    tower = TextTower.from_model(model)
    tokens = default_tokenizer(77)(["a photo of a dog.", "cat"])
    with torch.no_grad():
        torch.testing.assert_close(tower.encode_tokens(tokens), model.encode_text(tokens),
                                   rtol=1e-5, atol=1e-5)


def test_prompt_too_long_is_an_error():
    model = tiny_clip(context_length=12)
    tower = TextTower.from_model(model)
    with pytest.raises(ValueError, match="do not fit"):
        PromptLearner(tower, ["a very long class name indeed"], n_ctx=8)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_truncation_in_low_precision_matches_full_in_same_dtype(dtype, tol):
    """In the model's own dtype, truncated and full encodings agree to that dtype's rounding,
    and both are close to the float64 features."""
    model = tiny_clip(seed=9)
    ref_tower = TextTower.from_model(tiny_clip(seed=9).double())
    model = model.to(dtype)
    tower = TextTower.from_model(model)
    tokens = default_tokenizer(77)([f"a photo of a {c}." for c in CLASSNAMES])
    with torch.no_grad():
        short = tower.encode_tokens(tokens, truncate=True).double()
        full = tower.encode_tokens(tokens, truncate=False).double()
        want = ref_tower.encode_tokens(tokens, truncate=False)
    assert short.dtype == full.dtype and torch.isfinite(short).all()
    scale = want.abs().max()
    assert (short - full).abs().max() <= tol * scale
    assert (short - want).abs().max() <= tol * scale


@pytest.mark.parametrize("class_specific,share_prefix", [(False, False), (True, True),
                                                         (False, True)])
def test_encoder_follows_the_model_to_another_device(class_specific, share_prefix):
    """The Dassl example builds on the CPU, then moves the model (``.to(cuda)``): the full
    encoder (class-specific context, share_prefix off) must use the moved causal mask, not
    the one the tower saw at construction (``meta`` stands in for a GPU here)."""
    from prograd_fast.clip import PromptedCLIP

    model = PromptedCLIP(tiny_clip(), CLASSNAMES, n_ctx=4, class_specific=class_specific,
                         share_prefix=share_prefix)
    model.to("meta")
    assert model.tower.attn_mask.device.type == "meta"
    assert model.text_features().device.type == "meta"


def _official_layout(pl):
    """CoOp's PromptLearner.forward for "middle" / "front", class by class."""
    ctx = pl.ctx if pl.ctx.dim() == 3 else pl.ctx.unsqueeze(0).expand(pl.n_cls, -1, -1)
    half, out = pl.n_ctx // 2, []
    for i, n in enumerate(pl.name_lens):
        pre, name, rest, c = (pl.token_prefix[i:i + 1], pl.token_suffix[i:i + 1, :n],
                              pl.token_suffix[i:i + 1, n:], ctx[i:i + 1])
        parts = ([pre, c[:, :half], name, c[:, half:], rest] if pl.class_token_position == "middle"
                 else [pre, name, c, rest])
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out)


def _graph_size(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return len(seen)


@pytest.mark.parametrize("position", ["middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_moved_class_token_prompts_are_one_gather_not_a_loop_over_classes(position, class_specific):
    """The "middle" / "front" prompts equal CoOp's class-by-class assembly, exactly, with an
    autograd graph that does not grow with the classes (a slice per class of the expanded
    context costs one full-size gradient per class in the backward: 1000 classes made the
    prompt assembly alone take seconds per step)."""
    tower = TextTower.from_model(tiny_clip())
    sizes = []
    for names in (CLASSNAMES, CLASSNAMES * 3):
        torch.manual_seed(0)
        pl = PromptLearner(tower, names, n_ctx=5, class_token_position=position,
                           class_specific=class_specific)
        prompts, _ = pl()
        torch.testing.assert_close(prompts, _official_layout(pl), rtol=0, atol=0)
        g = torch.randn_like(prompts)
        got, = torch.autograd.grad(prompts, pl.ctx, g)
        want, = torch.autograd.grad(_official_layout(pl), pl.ctx, g)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        sizes.append(_graph_size(prompts))
    assert sizes[0] == sizes[1] < 10
