"""Shared-prefix encoding with one prefix per image (CoCoOp) and deep text prompts (MaPLe,
IVLP) equals the full 77-token encoding.

The reference is built here, independently of both encoders: every image's prefix joined
with every class suffix and padded to 77 tokens, run block by block through open_clip's
own blocks with the deep prompt written into rows ``deep_start ..`` before blocks 1 ..
depth (as the official MaPLe / IVLP blocks do), pooled at the end-of-text tokens.  Compared
in float64: the features and the gradients with respect to the prefixes, the suffix
embeddings and every deep prompt.  The last test checks :meth:`TextTower.encode_embeddings`
with deep prompts against the official MaPLe ``TextEncoder`` (skips without the vendor
folder).
"""

from __future__ import annotations


import open_clip
import pytest
import torch

from clip_helpers import tiny_cfg
from prograd_fast.clip import TextTower
from prograd_fast.clip.shared_prefix import LAYOUTS, SharedPrefixEncoder
from vendor_sources import import_tree, unpack, vendor_dir

MAPLE = "multimodal-prompt-learning-69bce21.tar.gz"
TOWERS = {  # both block kinds the shared-prefix encoder runs, and sequence-first blocks
    "default": {},
    "custom_block": dict(block_type="custom", qk_norm=True, ls_init_value=0.3),
    "sequence_first": {},
}


def make_tower(config: str, layers: int = 4, seed: int = 0) -> TextTower:
    """A tiny random float64 text tower with its 1-D parameters perturbed too."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**tiny_cfg(layers=layers, width=32, heads=2, **TOWERS[config])).eval()
    if config == "sequence_first":  # what Transformer(batch_first=False) builds
        model.transformer.batch_first = False
        for blk in model.transformer.resblocks:
            blk.attn.batch_first = False
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return TextTower.from_model(model.double())


def reference(tower: TextTower, prefix, suffixes, eot, deep, deep_start):
    """(B, C, D) features of all B * C prompts at the full context length, deep rows written
    with an in-place slice assignment before each block 1 .. len(deep)."""
    n_img, n_cls = prefix.shape[0], suffixes.shape[0]
    width, full = suffixes.shape[2], tower.context_length
    pad = torch.randn(full - prefix.shape[1] - suffixes.shape[1], width, dtype=prefix.dtype,
                      generator=torch.Generator().manual_seed(5))
    prompts = torch.stack([torch.cat([prefix[b], suffixes[c], pad])
                           for b in range(n_img) for c in range(n_cls)])
    x = prompts + tower.positional_embedding
    batch_first = tower.transformer.batch_first
    for i, blk in enumerate(tower.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = x.clone()
            x[:, deep_start:deep_start + len(deep[i - 1])] = deep[i - 1]
        if batch_first:
            x = blk(x, attn_mask=tower.attn_mask)
        else:
            x = blk(x.transpose(0, 1), attn_mask=tower.attn_mask).transpose(0, 1)
    x = tower.ln_final(x[torch.arange(n_img * n_cls), eot.repeat(n_img)])
    return (x @ tower.text_projection).view(n_img, n_cls, -1)


def inputs(tower, n_img, n_cls, prefix_len, suffix_len, n_deep, depth, seed=1):
    """Leaf tensors: prefixes (B, P, W), suffixes (C, S, W), deep prompts (n, W) each, and
    end-of-text positions of suffixes of differing lengths (1 .. S tokens)."""
    g = torch.Generator().manual_seed(seed)
    w = tower.width
    leaf = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    lengths = torch.randint(1, suffix_len + 1, (n_cls,), generator=g)
    lengths[0] = suffix_len  # the longest suffix reaches the end of the prompt
    eot = prefix_len + lengths - 1
    return (leaf(n_img, prefix_len, w), leaf(n_cls, suffix_len, w),
            [leaf(n_deep, w) for _ in range(depth)], eot)


def values_and_grads(fn, leaves, cotangent):
    out = fn()
    grads = torch.autograd.grad(out, leaves, grad_outputs=cotangent)
    return out.detach(), grads


CASES = {  # (images, classes, prefix, suffix, deep rows, depth, deep_start)
    "maple_batch3_cls5": (3, 5, 3, 7, 2, 2, 1),       # depth 3 of 4 blocks: block 3 carries on
    "one_image_one_class": (1, 1, 3, 5, 2, 3, 1),     # every block after the first replaced
    "primes_start2": (2, 7, 5, 11, 3, 1, 2),
    "whole_prefix_from_sos": (3, 2, 4, 3, 4, 2, 0),  # rows 0..3: the whole prefix
    "no_deep": (2, 3, 2, 5, 1, 0, 1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", list(TOWERS))
def test_batched_prefixes_and_deep_prompts_equal_full_encoding_float64(config, layout, case):
    n_img, n_cls, p, s, n_deep, depth, start = CASES[case]
    tower = make_tower(config, seed=len(case))
    prefix, suffixes, deep, eot = inputs(tower, n_img, n_cls, p, s, n_deep, depth)
    leaves = [prefix, suffixes, *deep]
    enc = SharedPrefixEncoder(tower, p, eot, p + s, layout)
    dim = tower.text_projection.shape[1]
    cot = torch.randn(n_img, n_cls, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = values_and_grads(lambda: reference(tower, prefix, suffixes, eot, deep, start), leaves, cot)
    assert all(g.abs().max() > 0 for g in want[1])  # every leaf gets a gradient
    got = values_and_grads(lambda: enc(prefix, suffixes, per_prefix=True, deep=deep, deep_start=start),
                           leaves, cot)
    full = values_and_grads(lambda: enc.encode_full(prefix, suffixes, per_prefix=True, deep=deep,
                                                    deep_start=start), leaves, cot)

    def tower_77():  # TextTower.encode_embeddings over all B * C prompts at 77 tokens
        pad = torch.zeros(tower.context_length - p - s, tower.width, dtype=torch.float64)
        prompts = torch.stack([torch.cat([prefix[b], suffixes[c], pad])
                               for b in range(n_img) for c in range(n_cls)])
        out = tower.encode_embeddings(prompts, eot.repeat(n_img), deep=deep, deep_start=start)
        return out.view(n_img, n_cls, -1)

    long = values_and_grads(tower_77, leaves, cot)
    for result in (got, full, long):
        torch.testing.assert_close(result[0], want[0], rtol=1e-10, atol=1e-10 * want[0].abs().max())
        for g, w in zip(result[1], want[1]):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * w.abs().max())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_prefix_keeps_the_class_shape_and_per_prefix_keeps_the_batch(layout):
    tower = make_tower("default")
    prefix, suffixes, deep, eot = inputs(tower, 1, 4, 3, 5, 2, 2)
    enc = SharedPrefixEncoder(tower, 3, eot, 8, layout)
    one = enc(prefix, suffixes, deep=deep)
    batched = enc(prefix, suffixes, per_prefix=True, deep=deep)
    assert one.shape == (4, 24) and batched.shape == (1, 4, 24)
    torch.testing.assert_close(batched[0], one, rtol=0, atol=0)
    assert enc.encode_full(prefix, suffixes, deep=deep).shape == (4, 24)


def test_bad_deep_prompts_and_prefix_batches_are_refused():
    tower = make_tower("default", layers=3)
    prefix, suffixes, deep, eot = inputs(tower, 2, 3, 3, 5, 2, 2)
    enc = SharedPrefixEncoder(tower, 3, eot, 8)
    with pytest.raises(ValueError, match="per_prefix=True"):
        enc(prefix, suffixes)
    with pytest.raises(ValueError, match="beyond the 3 rows"):  # rows 2, 3: past the prefix
        enc(prefix, suffixes, per_prefix=True, deep=deep, deep_start=2)
    with pytest.raises(ValueError, match="beyond the 3 rows"):
        enc.encode_full(prefix, suffixes, per_prefix=True, deep=deep, deep_start=2)
    with pytest.raises(ValueError, match="at most 2"):
        enc(prefix, suffixes, per_prefix=True, deep=deep * 2)
    with pytest.raises(ValueError, match=r"must be \(n, 32\)"):
        enc(prefix, suffixes, per_prefix=True, deep=[deep[0][:, :-1]])
    with pytest.raises(ValueError, match="deep_start"):
        enc(prefix, suffixes, per_prefix=True, deep=deep, deep_start=-1)
    x = torch.randn(2, 6, tower.width, dtype=torch.float64)
    with pytest.raises(ValueError, match="beyond the 6 rows"):
        tower.encode_embeddings(x, torch.tensor([5, 5]), deep=deep, deep_start=5)


def test_truncated_prompts_with_deep_prompts_equal_the_full_context():
    """Cutting the prompts after the longest end-of-text token stays exact with deep
    prompts (they sit before it)."""
    tower = make_tower("custom_block")
    prefix, suffixes, deep, eot = inputs(tower, 1, 3, 4, 6, 3, 3)
    prompts = torch.cat([prefix.expand(3, -1, -1), suffixes], dim=1)
    full = torch.cat([prompts, torch.zeros(3, 77 - 10, tower.width, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(tower.encode_embeddings(prompts, eot, deep=deep),
                               tower.encode_embeddings(full, eot, deep=deep), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def official_clip(tmp_path_factory):
    """The official multimodal-prompt-learning ``clip.model`` and ``trainers.maple`` (with
    upstream Dassl for its imports); top-level names put back as they were after."""
    vendor = vendor_dir()
    for archive in (MAPLE, "Dassl.pytorch-c61a1b5.tar.gz"):
        if not (vendor / archive).is_file():
            pytest.skip(f"{archive} not found in {vendor}")
    root = unpack(MAPLE, tmp_path_factory.getbasetemp() / "maple")
    dassl = unpack("Dassl.pytorch-c61a1b5.tar.gz", tmp_path_factory.getbasetemp() / "maple_dassl")
    return import_tree([root, dassl], dict(model="clip.model", maple="trainers.maple"))


def test_deep_prompts_equal_the_official_maple_text_encoder(official_clip):
    """Same tiny weights (OpenAI layout loaded into open_clip), same prompts, same deep
    prompts (fp16 values: the official blocks cast them with ``.half()``): features and the
    prompts' gradients equal the official MaPLe ``TextEncoder`` in float32; the deep
    prompts' gradients to fp16 precision (the official ``.half()`` casts them back in fp16,
    a known difference: here they stay in the tower's dtype)."""
    n_ctx, depth, layers, n_cls = 2, 3, 4, 3
    design = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0,
              "language_ctx": 0, "maple_length": n_ctx}
    torch.manual_seed(0)
    weights = official_clip.model.CLIP(
        embed_dim=24, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
        context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=2,
        transformer_layers=layers, design_details=design).float().eval()
    ref = official_clip.maple.TextEncoder(weights)
    clip = open_clip.CLIP(embed_dim=24, quick_gelu=True,
                          vision_cfg=dict(image_size=16, layers=1, width=64, patch_size=8, head_width=64),
                          text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2,
                                        layers=layers)).eval()
    missing, unexpected = clip.load_state_dict(weights.state_dict(), strict=False)
    assert not unexpected and all("attn_mask" in k or "logit_bias" in k for k in missing)
    tower = TextTower.from_model(clip)
    g = torch.Generator().manual_seed(2)
    prompts = torch.randn(n_cls, 77, 64, generator=g).requires_grad_()
    eot = torch.tensor([6, 9, 4])
    tokens = torch.zeros(n_cls, 77, dtype=torch.long)
    tokens[torch.arange(n_cls), eot] = 49407  # argmax pooling reads the end-of-text id
    deep = [torch.randn(n_ctx, 64, generator=g).half().float().requires_grad_()
            for _ in range(depth - 1)]
    cot = torch.randn(n_cls, 24, generator=g)
    want = values_and_grads(lambda: ref(prompts, tokens, deep), [prompts, *deep], cot)
    got = values_and_grads(lambda: tower.encode_embeddings(prompts, eot, deep=deep),
                           [prompts, *deep], cot)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5 * want[0].abs().max())
    torch.testing.assert_close(got[1][0], want[1][0], rtol=1e-5, atol=1e-5 * want[1][0].abs().max())
    for a, b in zip(got[1][1:], want[1][1:]):  # the official .half() rounds these to fp16
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max())
        assert (a.half() - b).abs().max() <= 2 ** -10 * b.abs().max()


def test_deep_prompts_with_grad_checkpointing_equal_without():
    tower = make_tower("default", layers=3)
    prefix, suffixes, deep, eot = inputs(tower, 1, 3, 3, 4, 2, 2)
    prompts = torch.cat([prefix.expand(3, -1, -1), suffixes], dim=1)
    leaves, cot = [prefix, suffixes, *deep], torch.randn(3, 24, dtype=torch.float64)
    want = values_and_grads(lambda: tower.encode_embeddings(prompts, eot, deep=deep), leaves, cot)
    tower.transformer.grad_checkpointing = True
    got = values_and_grads(lambda: tower.encode_embeddings(prompts, eot, deep=deep), leaves, cot)
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
