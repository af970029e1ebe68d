"""The text encoder of a CoOp/ProGrad step: today's truncated encoder vs the shared prefix.

What one ProGrad step spends in the text tower: the forward of every class prompt and one
backward with both ProGrad cotangents (``is_grads_batched``, as ``train_step``'s
``grad_mode="batched"`` does) down to the learned context.  Implementations:

- ``truncated``: every prompt cut after the longest end-of-text token, all classes through
  the whole tower (``TextTower.encode_embeddings``, the encoder before the shared prefix);
- ``shared-packed`` / ``shared-bucketed`` / ``shared-padded``: the shared-prefix encoder
  (``prograd_fast.clip.shared_prefix``) with each suffix layout.

Run: ``python benchmarks/text_encoder.py --classes 100 1000`` (CPU by default; ``--device
cuda --autocast bf16`` on a GPU).  ViT-B-16's text tower with random weights, ImageNet class
names, 16 context tokens, class token at the end.  Before timing, every implementation is
checked against the truncated encoder (features and both context gradients).  Times are
medians of interleaved rounds, so a busy machine slows all alike: compare the ratios.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

import torch

from prograd_fast.clip import PromptLearner, TextTower
from prograd_fast.clip.shared_prefix import LAYOUTS, SharedPrefixEncoder

import gpu_e2e


def build(clip, n_classes: int, layouts=LAYOUTS, n_ctx: int = 16, position: str = "end"):
    """``(learner, {name: encode() -> features of the learner's prompts}, tokens per step)``."""
    tower = TextTower.from_model(clip)
    torch.manual_seed(0)
    learner = PromptLearner(tower, gpu_e2e.classnames(n_classes), n_ctx=n_ctx,
                            class_token_position=position, dtype=torch.float32)
    learner.to(tower.positional_embedding.device)
    encoders = {"truncated": lambda: tower.encode_embeddings(*learner())}
    tokens = {"truncated": learner.length * n_classes}
    for layout in layouts:
        enc = SharedPrefixEncoder(tower, learner.shared_prefix_length, learner.eot,
                                  learner.length, layout)
        encoders[f"shared-{layout}"] = lambda enc=enc: enc(*learner.prefix_and_suffixes())
        tokens[f"shared-{layout}"] = enc.tokens_per_step
    return learner, encoders, tokens


def make_clip(model: str, device, text_layers: int | None = None):
    """The random open_clip model, optionally with only ``text_layers`` text blocks (every
    block costs the same, so the ratios per block are those of the whole tower)."""
    clip = gpu_e2e.make_clip(model, 64, device)
    if text_layers is not None:
        clip.transformer.resblocks = clip.transformer.resblocks[:text_layers]
    return clip


def fwd_bwd(learner, encode, cotangents, autocast):
    """Forward of all prompts, then one backward with both cotangents: d/d ctx, (2, n, width)."""
    with autocast():
        feats = encode()
    grads, = torch.autograd.grad(feats, learner.ctx, grad_outputs=cotangents.to(feats.dtype),
                                 is_grads_batched=True)
    return feats.detach(), grads


def check(learner, encoders, cotangents, autocast, tol: float) -> float:
    """Largest relative difference to the truncated encoder (features, both gradients)."""
    ref = fwd_bwd(learner, encoders["truncated"], cotangents, autocast)
    worst = 0.0
    for name, enc in encoders.items():
        got = fwd_bwd(learner, enc, cotangents, autocast)
        for a, b in zip(got, ref):
            worst = max(worst, float((a.float() - b.float()).abs().max() / b.float().abs().max()))
    if not worst <= tol:
        raise AssertionError(f"shared-prefix encoders differ from the truncated one: {worst:.2e}")
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    ap.add_argument("--text-layers", type=int, default=None,
                    help="fewer text blocks than the model has (memory: 1000 classes at 12 "
                         "layers hold ~17 GB of activations in the truncated encoder)")
    args = gpu_e2e.parse_args(ap, argv, device="cpu", iters=3)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("text_encoder: no CUDA device here; skipped")
        return 0
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    autocast = ((lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext)
    clip = make_clip(args.model, device, args.text_layers)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    layers = len(clip.transformer.resblocks)
    print(f"text encoder fwd + both-cotangent bwd, {args.model} (random weights, {layers} text "
          f"blocks), {name}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, autocast "
          f"{args.autocast}")
    for n in args.classes:
        learner, encoders, tokens = build(clip, n, args.layouts)
        g = torch.Generator().manual_seed(n)
        dim = encoders["truncated"]().shape[-1]
        cotangents = torch.randn(2, n, dim, generator=g).to(device)
        worst = check(learner, encoders, cotangents, autocast, 1e-4 if amp is None else 5e-2)
        fns = {k: (lambda enc=enc: fwd_bwd(learner, enc, cotangents, autocast)) for k, enc in encoders.items()}
        ms = dict(zip(fns, gpu_e2e.time_steps(list(fns.values()), device, args.iters, warmup=1)))
        print(f"\n{n} classes, prompt length {learner.length}, prefix {learner.shared_prefix_length}, "
              f"max relative difference to truncated {worst:.1e}")
        print(f"{'encoder':18s} {'tokens':>7s} {'ms':>10s} {'speed-up':>9s}")
        for k, t in ms.items():
            print(f"{k:18s} {tokens[k]:7d} {t:10.1f} {ms['truncated'] / t:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
