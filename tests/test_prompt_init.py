"""Official ProGrad's CTX_INIT: the template's words right-aligned in N_CTX after zeros, the
extra init tokens fixed before the class name, kept when the context moves to new classes."""

import pytest
import torch

from prograd_fast.clip import PromptedCLIP
from prograd_fast.clip.prompt import PromptLearner, default_tokenizer
from prograd_fast.clip.tower import TextTower
from prograd_fast.clip.trainer import transfer_context

from clip_helpers import tiny_clip

INIT = "a type of pet, a photo of a"  # 8 words, 9 tokens ("pet," is two)


def _expected(tower, tok, text_prefix, names, n_zero):
    tokens = tok([f"{text_prefix} {n}." for n in names])
    emb = tower.token_embedding(tokens).detach()
    emb[:, 1:1 + n_zero] = 0
    return emb


def test_prograd_style_is_zeros_then_template_with_fixed_extra_tokens():
    clip = tiny_clip()
    tower = TextTower.from_model(clip)
    tok = default_tokenizer(77)
    names = ["abyssinian", "great pyrenees"]
    pl = PromptLearner(tower, names, tok, n_ctx=16, ctx_init=INIT, ctx_init_mode="prograd",
                       truncate=False)
    assert pl.n_ctx == 16 and pl.ctx.shape == (16, tower.width)
    assert torch.equal(pl.ctx[:8], torch.zeros(8, tower.width))
    emb, eot = pl()
    want = _expected(tower, tok, "X X X X X X X X " + INIT, names, 8)
    torch.testing.assert_close(emb, want.to(emb.dtype), rtol=0, atol=0)
    assert pl.prompt_prefix == "X X X X X X X X " + INIT
    # the CoOp style fixes n_ctx to the init's token count instead
    coop = PromptLearner(tower, names, tok, n_ctx=16, ctx_init=INIT)
    assert coop.n_ctx == 9
    with pytest.raises(ValueError, match=r"n_ctx \(4\) is smaller than the 8 words"):
        PromptLearner(tower, names, tok, n_ctx=4, ctx_init=INIT, ctx_init_mode="prograd")
    with pytest.raises(ValueError, match="ctx_init_mode"):
        PromptLearner(tower, names, tok, ctx_init=INIT, ctx_init_mode="cocoop")


def test_transfer_keeps_the_prograd_prompt_structure():
    clip = tiny_clip()
    model = PromptedCLIP(clip, ["a", "b"], n_ctx=16, ctx_init=INIT, ctx_init_mode="prograd")
    with torch.no_grad():
        model.prompt_learner.ctx.normal_()
    other = transfer_context(model, ["sphynx", "bengal", "pug"])
    assert other.prompt_learner.prompt_prefix == model.prompt_learner.prompt_prefix
    assert torch.equal(other.prompt_learner.ctx, model.prompt_learner.ctx)
    # a target data set's own template, as official ProGrad evaluates cross-data-set
    target = transfer_context(model, ["tench"], ctx_init="a photo of a")
    assert target.prompt_learner.prompt_prefix == " ".join(["X"] * 12 + ["a photo of a"])
    assert torch.equal(target.prompt_learner.ctx, model.prompt_learner.ctx)
