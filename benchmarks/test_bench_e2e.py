"""One CoOp+ProGrad training step end to end: the paper-style loop vs prograd_fast.

Run: ``pytest benchmarks/test_bench_e2e.py --benchmark-only``.  Ids: ``e2e-paper_style``
(the official loop, DESIGN.md section 2), ``e2e-prograd_fast`` (shared image pass,
truncated text, one batched backward, fused ProGradSGD), ``e2e-prograd_fast_two_pass``
(the same with :func:`prograd_fast.backward`'s two backward calls) and ``e2e-coop_fast``
(``lam=0``: plain CoOp through the same code, the cost ProGrad should approach).
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
IMPLS = ["paper_style", "prograd_fast", "prograd_fast_two_pass", "coop_fast"]


@functools.lru_cache(maxsize=1)
def _setup():
    return gpu_e2e.setup(DEVICE)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda s: f"e2e-{s}")
def test_e2e_step(benchmark, impl: str) -> None:
    paper, fast, images, labels, size, clip, names = _setup()
    if impl == "paper_style":
        step = functools.partial(paper.step, images, labels)
    else:
        ctx0 = paper.prompts.ctx.detach().float()
        runner = gpu_e2e.Fast.build(clip, names, ctx0, autocast=fast.autocast,
                                    lam=0.0 if impl == "coop_fast" else 1.0)
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
                                prompt_tokens=77 if impl == "paper_style"
                                else fast.model.prompt_learner.length, **size)
    benchmark.pedantic(run, rounds=5 if DEVICE.type == "cpu" else 30, iterations=1,
                       warmup_rounds=1)
