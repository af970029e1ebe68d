"""The end-to-end benchmark's two loops compute the same update (paper-style vs prograd_fast)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_e2e  # noqa: E402

from clip_helpers import CLASSNAMES, tiny_clip  # noqa: E402


@pytest.mark.parametrize("steps", [1, 3])
def test_paper_style_and_prograd_fast_same_update(steps):
    clip = tiny_clip(seed=11)
    for p in clip.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 16, 16, generator=g)
    rel, fired = gpu_e2e.check_same_math(clip, CLASSNAMES, images, None, steps=steps, n_ctx=4,
                                         ctx_scale=1.0)
    # 1e-6, not 1e-12: prograd_losses computes the KL in fp32 even for fp64 logits
    assert rel < 1e-6
    assert fired >= 1  # the projection was exercised


def _conflicting_labels(clip, images, ctx0):
    """For each image the class the student over-rates against the teacher: CE and KL
    pull apart."""
    fast = gpu_e2e.Fast.build(clip, CLASSNAMES, ctx0)
    with torch.no_grad():
        student, teacher = fast.model(images)
    return (student.softmax(1) - teacher.softmax(1)).argmax(1)


def test_paper_style_projection_really_fires():
    """The comparison must exercise the projection: the paper-style loop's update must differ
    from plain SGD on the domain gradient."""
    clip = tiny_clip(seed=12)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, 16, 16, generator=g)
    ctx0 = torch.randn(4, 32, generator=g)
    labels = _conflicting_labels(clip, images, ctx0)
    moved = {}
    for lam in (0.0, 1.0):
        paper = gpu_e2e.PaperStyle(clip, CLASSNAMES, ctx0, student_dtype=torch.float32, lam=lam)
        paper.step(images, labels)
        moved[lam] = paper.prompts.ctx.detach().clone()
    assert (moved[0.0] - moved[1.0]).abs().max() > 1e-7


def test_gpu_script_skips_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_e2e.main(["--device", "cuda"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_official_coop_and_prograd_fast_coop_same_update():
    """The official-style CoOp step (77 tokens, one backward, torch SGD) and prograd_fast
    CoOp (lam=0, shared prefix, suffixes cut at their EOT) move the context alike (fp64)."""
    clip = tiny_clip(seed=13)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(5, 3, 16, 16, generator=g)
    labels = torch.tensor([0, 6, 2, 3, 1])
    assert gpu_e2e.check_same_coop(clip, CLASSNAMES, images, labels, steps=3, n_ctx=4) < 1e-9
    assert gpu_e2e.Fast.build(clip, CLASSNAMES, torch.zeros(4, 32)).model.shared_prefix is not None


def test_text_encoder_benchmark_checks_and_times_every_layout(monkeypatch):
    """benchmarks/text_encoder.py at a tiny size: every layout is checked against the
    truncated encoder, then timed; the GPU script skips without CUDA."""
    import gpu_shared_prefix
    import text_encoder
    from contextlib import nullcontext

    learner, encoders, tokens = text_encoder.build(tiny_clip(seed=14), 11, n_ctx=4)
    assert set(encoders) == {"truncated"} | {f"shared-{lay}" for lay in text_encoder.LAYOUTS}
    assert tokens["shared-bucketed"] < tokens["truncated"]
    cot = torch.randn(2, 11, 24)
    assert text_encoder.check(learner, encoders, cot, nullcontext, 1e-4) < 1e-4
    fns = {k: (lambda e=e: text_encoder.fwd_bwd(learner, e, cot, nullcontext)) for k, e in encoders.items()}
    assert len(gpu_e2e.time_steps(list(fns.values()), torch.device("cpu"), iters=1, warmup=0)) == len(fns)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_shared_prefix.main([]) == 0
