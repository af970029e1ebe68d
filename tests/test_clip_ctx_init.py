"""Official ProGrad's ``CTX_INIT: True`` (``ctx_init_mode="prograd"``) against a construction
written here from its description, and loading CoOp / ProGrad prompt-learner checkpoints."""

import pytest
import torch

from prograd_fast.clip import (PROGRAD_TEMPLATES, PromptLearner, TextTower, default_tokenizer,
                               template_context)

from clip_helpers import CLASSNAMES, tiny_clip


@pytest.fixture(scope="module")
def tower():
    return TextTower.from_model(tiny_clip(seed=3))


def _expected(tower, init, n_ctx, names):
    """Zeros, then the embeddings of the first ``w`` tokens of ``init`` (``w`` = its words);
    the prompt is ``X`` * (n_ctx - w) + init + name + "." and the learned part is the n_ctx
    positions after the start token: the tokens of ``init`` beyond the ``w``-th stay fixed."""
    tok = default_tokenizer(77)
    emb = tower.token_embedding
    words = len(init.split(" "))
    ctx = torch.zeros(n_ctx, tower.width)
    init_ids = tok([init])[0]
    ctx[n_ctx - words:] = emb(init_ids[1:1 + words]).detach()
    prompts = [" ".join(["X"] * (n_ctx - words) + [init, f"{n.replace('_', ' ')}."]) for n in names]
    ids = tok(prompts)
    full = emb(ids).detach()
    return ctx, ids, torch.cat([full[:, :1], ctx.expand(len(names), -1, -1), full[:, 1 + n_ctx:]], 1)


@pytest.mark.parametrize("dataset", ["OxfordPets", "Food101", "EuroSAT", "ImageNet",
                                     "DescribableTextures"])
@pytest.mark.parametrize("n_ctx", [16, 9])
def test_prograd_init_is_zeros_then_the_template_words(tower, dataset, n_ctx):
    init = template_context(PROGRAD_TEMPLATES[dataset])
    pl = PromptLearner(tower, CLASSNAMES, n_ctx=n_ctx, ctx_init=init, ctx_init_mode="prograd",
                       truncate=False)
    ctx, ids, prompts = _expected(tower, init, n_ctx, CLASSNAMES)
    assert pl.n_ctx == n_ctx and pl.ctx.shape == (n_ctx, tower.width)
    torch.testing.assert_close(pl.ctx.detach(), ctx, rtol=0, atol=0)
    assert torch.equal(pl.tokenized_prompts, ids)
    embeddings, eot = pl()
    torch.testing.assert_close(embeddings.detach(), prompts, rtol=0, atol=0)
    assert torch.equal(eot, ids.argmax(-1))


def test_comma_leaves_the_last_template_token_fixed_after_the_context(tower):
    """"a type of pet, a photo of a": 8 words, 9 tokens; the official code learns the first 8
    and keeps the final "a" in the fixed suffix, before the class name."""
    init = template_context(PROGRAD_TEMPLATES["OxfordPets"])
    assert init == "a type of pet, a photo of a"
    pl = PromptLearner(tower, ["dog"], n_ctx=16, ctx_init=init, ctx_init_mode="prograd")
    tok = default_tokenizer(77)
    a_id = tok.encode("a")[0]
    assert pl.tokenized_prompts[0, 1 + 16].item() == a_id  # first suffix token: the last "a"
    assert pl.ctx[:8].abs().sum() == 0 and pl.ctx[8:].abs().sum() > 0


def test_prograd_init_refusals(tower):
    with pytest.raises(ValueError, match="smaller than the 8 words"):
        PromptLearner(tower, ["dog"], n_ctx=4, ctx_init="a type of pet, a photo of a",
                      ctx_init_mode="prograd")
    with pytest.raises(ValueError, match="more tokens than words"):
        PromptLearner(tower, ["dog"], n_ctx=16, ctx_init="a type of pet, a photo of a",
                      ctx_init_mode="prograd", class_token_position="middle")
    with pytest.raises(ValueError, match="ctx_init_mode"):
        PromptLearner(tower, ["dog"], ctx_init="a photo", ctx_init_mode="left")
    with pytest.raises(ValueError, match="class slot"):
        template_context("{} texture.")  # CoOp's DTD template has no trailing slot
    # without a comma the class position may move, as in the official code
    pl = PromptLearner(tower, ["dog"], n_ctx=6, ctx_init="a photo of a", ctx_init_mode="prograd",
                       class_token_position="front")
    assert pl.n_ctx == 6


def test_class_specific_prograd_init_repeats_the_context(tower):
    pl = PromptLearner(tower, CLASSNAMES, n_ctx=6, ctx_init="a photo of a",
                       ctx_init_mode="prograd", class_specific=True)
    assert pl.ctx.shape == (len(CLASSNAMES), 6, tower.width)
    assert torch.equal(pl.ctx[0], pl.ctx[-1]) and pl.ctx[:, :2].abs().sum() == 0


def _official_state(pl, n_cls):
    """A prompt learner state dict as CoOp / official ProGrad save it (fp16, fixed vectors)."""
    return {"ctx": torch.randn_like(pl.ctx).half(),
            "token_prefix": torch.randn(n_cls, 1, pl.ctx.shape[-1]).half(),
            "token_suffix": torch.randn(n_cls, 77 - 1 - pl.n_ctx, pl.ctx.shape[-1]).half()}


def test_official_checkpoint_loads_ignoring_its_fixed_token_vectors(tower):
    pl = PromptLearner(tower, CLASSNAMES, n_ctx=4, dtype=torch.float32)
    suffix = pl.token_suffix.clone()
    state = _official_state(pl, n_cls=3)  # trained on other classes: base-to-new
    pl.load_state_dict(state)  # strict
    assert pl.ctx.dtype == torch.float32 and torch.equal(pl.ctx.detach(), state["ctx"].float())
    assert torch.equal(pl.token_suffix, suffix)  # rebuilt from the current class names
    assert set(pl.state_dict()) == {"ctx"}


def test_checkpoint_with_another_context_shape_is_refused_clearly(tower):
    pl = PromptLearner(tower, CLASSNAMES, n_ctx=4)
    other = PromptLearner(tower, CLASSNAMES, n_ctx=8)
    with pytest.raises(RuntimeError, match=r"context has shape \(8, 32\).*N_CTX"):
        pl.load_state_dict(_official_state(other, len(CLASSNAMES)))
