"""One CoOp+ProGrad training step end to end: the paper-style loop vs prograd_fast.

Run: ``pytest benchmarks/test_bench_e2e.py --benchmark-only``.  Ids: ``e2e-paper_style``
(the official loop, DESIGN.md section 2), ``e2e-coop_official`` (the official CoOp step:
77-token prompts, one backward, torch SGD: what plain CoOp costs users today),
``e2e-prograd_fast`` (shared image pass, shared prompt prefix, suffixes cut at their EOT,
one batched backward, fused ProGradSGD), ``e2e-prograd_fast_two_pass`` (the same with
:func:`prograd_fast.backward`'s two backward calls), ``e2e-prograd_fast_unshared`` (no
shared prefix: every prompt truncated after the longest EOT) and ``e2e-coop_fast``
(``lam=0``: plain CoOp through the same code).
CUDA: ViT-B-16 with random weights, 100 classes, batch 32, 224 px (paper student fp16,
prograd_fast bf16 autocast); CPU: 8 classes, batch 4, 64 px, fp32 (see ``gpu_e2e.SIZES``).
"""

from __future__ import annotations

import functools

import pytest
import torch

import gpu_e2e
import scenarios

DEVICE = scenarios.bench_device()
IMPLS = ["paper_style", "coop_official", "prograd_fast", "prograd_fast_two_pass",
         "prograd_fast_unshared", "coop_fast"]


@functools.lru_cache(maxsize=1)
def _setup():
    return gpu_e2e.setup(DEVICE)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda s: f"e2e-{s}")
def test_e2e_step(benchmark, impl: str) -> None:
    paper, fast, images, labels, size, clip, names = _setup()
    ctx0 = paper.prompts.ctx.detach().float()
    tokens = 77
    if impl == "paper_style":
        step = functools.partial(paper.step, images, labels)
    elif impl == "coop_official":
        official = gpu_e2e.OfficialCoOp(clip, names, ctx0, student_dtype=paper.dtype)
        step = functools.partial(official.step, images, labels)
    else:
        runner = gpu_e2e.Fast.build(clip, names, ctx0, autocast=fast.autocast,
                                    lam=0.0 if impl == "coop_fast" else 1.0,
                                    share_prefix=impl != "prograd_fast_unshared")
        shared = runner.model.shared_prefix
        tokens = (shared.tokens_per_step / len(names) if shared is not None
                  else runner.model.prompt_learner.length)
        mode = "two_pass" if impl.endswith("two_pass") else "auto"
        step = functools.partial(gpu_e2e.train_step, runner.model, runner.opt, images, labels,
                                 autocast_dtype=runner.autocast, grad_mode=mode)
    for _ in range(2):
        step()

    def run() -> None:
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.group = "e2e_step"
    benchmark.extra_info.update(kind="e2e_step", implementation=impl, device=str(DEVICE),
                                prompt_tokens=round(tokens, 1), **size)
    benchmark.pedantic(run, rounds=5 if DEVICE.type == "cpu" else 30, iterations=1,
                       warmup_rounds=1)
