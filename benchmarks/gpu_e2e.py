"""End-to-end: one CoOp+ProGrad training step, the paper-style loop vs prograd_fast.

Paper-style (DESIGN.md section 2, what the official ProGrad trainer does): two CLIP copies
(fp16 student, fp32 zero-shot teacher), a separate teacher image pass every step, every
class prompt encoded at the full 77 tokens, ``general.backward(retain_graph=True)``, the
``.grad`` cloned, ``ce.backward()``, a per-tensor projection decided by a Python ``if``,
``torch.optim.SGD`` and the host syncs of its loss checks and logging.

Official-style CoOp (what users pay today for plain CoOp, the official CoOp trainer): one
CLIP, every class prompt at the full 77 tokens, cross-entropy, one backward,
``torch.optim.SGD``, the ``.item()`` of its logging.

prograd_fast: one frozen CLIP, one image pass shared by student and teacher, the prompt
prefix common to all classes encoded once and the class suffixes cut at their end-of-text
tokens (``prograd_fast.clip.shared_prefix``), both gradients from one batched backward
through the text encoder, and the fused ``ProGradSGD`` step (no host sync), under bf16
autocast on CUDA.  ``prograd_fast_unshared``: the same without the shared prefix (every
prompt through the tower, truncated after the longest end-of-text token); ``coop_fast``:
prograd_fast with ``lam=0`` (plain CoOp).

Run: ``python benchmarks/gpu_e2e.py`` (CUDA: ViT-B-16, random weights, 100 classes, batch
32; exits 0 with a message when CUDA is missing) or ``python benchmarks/gpu_e2e.py
--device cpu`` (small size; ``--classes 100`` for the size of BENCHMARKS.md).  It first
checks in float64 that paper-style and prograd_fast ProGrad, and official-style and
prograd_fast CoOp, compute the same updates.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prograd_fast import ProGradSGD
from prograd_fast.clip import PromptedCLIP, PromptLearner, TextTower, train_step

SIZES = {  # device type -> (classes, batch, image size)
    "cuda": dict(n_classes=100, batch=32, image_size=224),
    "cpu": dict(n_classes=8, batch=4, image_size=64),
}
HYPER = dict(lr=0.002, momentum=0.9, weight_decay=5e-4)


def classnames(n: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES[:n])


def make_clip(model: str = "ViT-B-16", image_size: int | None = None, device="cpu", seed: int = 0):
    """A randomly initialised open_clip model (``pretrained=None``), fp32, frozen, eval."""
    import open_clip

    torch.manual_seed(seed)
    kw = {"force_image_size": image_size} if image_size else {}
    clip = open_clip.create_model(model, pretrained=None, device=device, **kw)
    for p in clip.parameters():
        p.requires_grad_(False)
    return clip.eval()


class PaperStyle:
    """The official ProGrad step, as described in DESIGN.md section 2."""

    def __init__(self, clip, names, ctx_init: torch.Tensor, template="a photo of a {}.",
                 student_dtype=torch.float16, lam: float = 1.0, temperature: float = 1.0):
        self.teacher = clip
        self.student = copy.deepcopy(clip).to(student_dtype)
        self.tower = TextTower.from_model(self.student)
        n_ctx = ctx_init.shape[-2]
        self.prompts = PromptLearner(self.tower, names, n_ctx=n_ctx, truncate=False)
        with torch.no_grad():
            self.prompts.ctx.copy_(ctx_init.to(student_dtype))
        teacher = PromptedCLIP(clip, names, templates=template, n_ctx=1)  # features only
        self.teacher_text = teacher.teacher.text_features.detach()
        self.params = [self.prompts.ctx]
        self.opt = torch.optim.SGD(self.params, **HYPER)
        self.lam, self.T, self.dtype = lam, temperature, student_dtype

    def student_logits(self, images):
        s = self.student
        img = F.normalize(s.encode_image(images.to(self.dtype)), dim=-1)
        emb, eot = self.prompts()
        txt = F.normalize(self.tower.encode_embeddings(emb, eot), dim=-1)  # 77 tokens
        return s.logit_scale.exp() * img @ txt.t()

    def step(self, images, labels) -> float:
        logits = self.student_logits(images)
        with torch.no_grad():  # the teacher's own image pass
            t_img = F.normalize(self.teacher.encode_image(images), dim=-1)
            zs = self.teacher.logit_scale.exp() * t_img @ self.teacher_text.t()
        ce = F.cross_entropy(logits, labels)
        T = self.T
        general = -(F.softmax(zs / T, 1) * F.log_softmax(logits / T, 1)).sum(1).mean() * T * T
        if not torch.isfinite(ce) or not torch.isfinite(general):  # host syncs
            raise FloatingPointError("loss is infinite or NaN")
        self.opt.zero_grad()
        general.backward(retain_graph=True)
        kept = [p.grad.clone() for p in self.params]
        self.opt.zero_grad()
        ce.backward()
        for p, g in zip(self.params, kept):
            d = p.grad
            if F.cosine_similarity(d.flatten(), g.flatten(), dim=0) < 0:  # host sync per tensor
                gn = g / torch.linalg.norm(g)
                p.grad = d - self.lam * (d * gn).sum() * gn
        self.opt.step()
        return ce.item()  # logging


class OfficialCoOp(PaperStyle):
    """The official CoOp step: the student of :class:`PaperStyle` (77-token prompts, no
    teacher), cross-entropy, one backward, ``torch.optim.SGD``, the loss logged."""

    def step(self, images, labels) -> float:
        loss = F.cross_entropy(self.student_logits(images), labels)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()  # logging


@dataclass
class Fast:
    """prograd_fast: PromptedCLIP + ProGradSGD + train_step."""

    model: PromptedCLIP
    opt: ProGradSGD
    autocast: torch.dtype | None

    @classmethod
    def build(cls, clip, names, ctx_init, template="a photo of a {}.", autocast=None,
              lam: float = 1.0, share_prefix: bool | str = True):
        model = PromptedCLIP(clip, names, templates=template, n_ctx=ctx_init.shape[-2],
                             dtype=torch.promote_types(ctx_init.dtype, torch.float32),
                             share_prefix=share_prefix)
        with torch.no_grad():
            model.prompt_learner.ctx.copy_(ctx_init)
        opt = ProGradSGD([model.prompt_learner.ctx], lam=lam, granularity="tensor", **HYPER)
        return cls(model, opt, autocast)

    def step(self, images, labels) -> None:
        train_step(self.model, self.opt, images, labels, autocast_dtype=self.autocast)


def check_same_math(clip, names, images, labels=None, steps: int = 2, n_ctx: int = 16,
                    ctx_scale: float = 0.02) -> tuple[float, int]:
    """Both loops in float64 (copies) from the same context: ``(max difference of the
    context after `steps` steps (momentum included) relative to how far it moved, number of
    steps whose projection fired)``.  Raises if the difference exceeds 1e-6 (not ~1e-12:
    ``prograd_losses`` evaluates the KL in fp32 even for fp64 logits).  (In fp32 the
    rounding of the context itself, ~1e-7 of its size, swamps a 0.002-lr update.)  ``labels=None``: for each image the class the
    student over-rates most against the teacher, so cross-entropy and KL pull apart and
    the projection is exercised."""
    clip, images = copy.deepcopy(clip).double(), images.double()
    g = torch.Generator().manual_seed(1)
    dtype = torch.float64
    ctx0 = (torch.randn(n_ctx, clip.token_embedding.weight.shape[1], generator=g) * ctx_scale).to(images.device, dtype)
    paper = PaperStyle(clip, names, ctx0, student_dtype=dtype)
    fast = Fast.build(clip, names, ctx0)
    if labels is None:
        with torch.no_grad():
            student, teacher = fast.model(images)
            labels = (student.softmax(1) - teacher.softmax(1)).argmax(1)
    fired = 0
    for _ in range(steps):
        paper.step(images, labels)
        fast.step(images, labels)
        fired += int(fast.opt.stats()[0]["conflict"].any())
    a, b = paper.prompts.ctx.detach(), fast.model.prompt_learner.ctx.detach()
    moved = (a - ctx0).abs().max()
    rel = float((a - b).abs().max() / moved)
    if not rel < 1e-6:
        raise AssertionError(f"paper-style and prograd_fast updates differ: rel {rel:.2e}")
    return rel, fired


def check_same_coop(clip, names, images, labels, steps: int = 2, n_ctx: int = 16,
                    ctx_scale: float = 1.0) -> float:
    """Official-style CoOp and prograd_fast CoOp (``lam=0``, shared prefix) in float64 from
    the same context: the max difference of the context after ``steps`` steps relative to
    how far it moved; raises above 1e-9."""
    clip, images = copy.deepcopy(clip).double(), images.double()
    g = torch.Generator().manual_seed(2)
    ctx0 = (torch.randn(n_ctx, clip.token_embedding.weight.shape[1], generator=g) * ctx_scale).to(
        images.device, torch.float64)
    official = OfficialCoOp(clip, names, ctx0, student_dtype=torch.float64)
    fast = Fast.build(clip, names, ctx0, lam=0.0)
    for _ in range(steps):
        official.step(images, labels)
        fast.step(images, labels)
    a, b = official.prompts.ctx.detach(), fast.model.prompt_learner.ctx.detach()
    rel = float((a - b).abs().max() / (a - ctx0).abs().max())
    if not rel < 1e-9:
        raise AssertionError(f"official-style and prograd_fast CoOp updates differ: rel {rel:.2e}")
    return rel


def setup(device: torch.device, model="ViT-B-16", n_classes=None, batch=None, image_size=None,
          paper_dtype=None, fast_autocast=None):
    """``(paper, fast, images, labels)`` at the device's default size."""
    size = dict(SIZES[device.type])
    size.update({k: v for k, v in dict(n_classes=n_classes, batch=batch,
                                       image_size=image_size).items() if v})
    clip = make_clip(model, size["image_size"], device)
    names = classnames(size["n_classes"])
    g = torch.Generator().manual_seed(0)
    images = torch.randn(size["batch"], 3, size["image_size"], size["image_size"], generator=g).to(device)
    labels = torch.randint(0, size["n_classes"], (size["batch"],), generator=g).to(device)
    ctx0 = (torch.randn(16, clip.token_embedding.weight.shape[1], generator=g) * 0.02).to(device)
    cuda = device.type == "cuda"
    paper = PaperStyle(clip, names, ctx0, student_dtype=paper_dtype or (torch.float16 if cuda else torch.float32))
    fast = Fast.build(clip, names, ctx0, autocast=fast_autocast or (torch.bfloat16 if cuda else None))
    return paper, fast, images, labels, size, clip, names


def time_steps(fns, device, iters: int, warmup: int = 2) -> list[float]:
    """Median wall time of one step in ms for each of ``fns`` (synchronised on CUDA),
    interleaved so that a busy, shared machine slows all of them alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, times):
            t = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


IMPLS = ("paper_style", "coop_official", "prograd_fast", "prograd_fast_unshared", "coop_fast")


def step_fns(paper, fast, images, labels, clip, names) -> dict:
    """One training step of each implementation of :data:`IMPLS`, from the same context."""
    ctx0 = paper.prompts.ctx.detach().float().clone()
    official = OfficialCoOp(clip, names, ctx0, student_dtype=paper.dtype)
    unshared = Fast.build(clip, names, ctx0, autocast=fast.autocast, share_prefix=False)
    coop = Fast.build(clip, names, ctx0, autocast=fast.autocast, lam=0.0)
    return {"paper_style": lambda: paper.step(images, labels),
            "coop_official": lambda: official.step(images, labels),
            "prograd_fast": lambda: fast.step(images, labels),
            "prograd_fast_unshared": lambda: unshared.step(images, labels),
            "coop_fast": lambda: coop.step(images, labels)}


def parse_args(ap: argparse.ArgumentParser, argv, device: str = "cuda", iters=None):
    """Parse ``argv`` with the options every e2e-style script has (``--device``, ``--model``,
    ``--iters``, ``--threads``) added to ``ap``; applies ``--threads``."""
    ap.add_argument("--device", default=device)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    args = parse_args(ap, argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_e2e: no CUDA device here; skipped (use --device cpu for the small CPU size)")
        return 0
    paper, fast, images, labels, size, clip, names = setup(
        device, args.model, args.classes, args.batch, args.image_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shared = fast.model.shared_prefix
    print(f"\nOne CoOp / ProGrad step, {args.model} (random weights), {size['n_classes']} classes, "
          f"batch {size['batch']}, image {size['image_size']}px, {name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, prograd_fast autocast {fast.autocast}", flush=True)
    # Each fact as soon as it is known: a run cut short by its time limit keeps them.
    rel, fired = check_same_math(clip, names[:10], images[:4], ctx_scale=1.0)
    rel_coop = check_same_coop(clip, names[:10], images[:4], labels[:4] % 10)
    print(f"same math (fp64, 2 steps): ProGrad max relative difference of the context {rel:.1e} "
          f"(projection fired in {fired}), CoOp {rel_coop:.1e}")
    print(f"prompt tokens through the text tower per step: official/paper 77 x {len(names)} = "
          f"{77 * len(names)}, prograd_fast_unshared {fast.model.prompt_learner.length} x "
          f"{len(names)} = {fast.model.prompt_learner.length * len(names)}, prograd_fast "
          f"{shared.tokens_per_step if shared is not None else 'n/a'} "
          f"({shared.layout if shared is not None else 'off'})", flush=True)
    iters = args.iters or (20 if device.type == "cuda" else 5)
    fns = step_fns(paper, fast, images, labels, clip, names)
    times = dict(zip(fns, time_steps(list(fns.values()), device, iters)))
    print(f"{'implementation':22s} {'ms/step':>10s} {'vs paper':>9s} {'cost vs coop_official':>22s}")
    for k, t in times.items():
        print(f"{k:22s} {t:10.1f} {times['paper_style'] / t:8.2f}x {t / times['coop_official']:21.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
