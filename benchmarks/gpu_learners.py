"""GPU check of the prompt learners with ProGrad: a device step against float64, ms per step.

For every registered method with a learner and ProGrad (``prograd_fast.methods.METHODS``:
kgcoop+prograd, cocoop+prograd, maple+prograd, ...), on a small random open_clip model with
a ViT image tower (12 layers in each tower, so deep prompts of every official depth fit),
``PromptedCLIP(model, classnames, learner=method.learner)`` with the learner's defaults:

  fp32  one ``prograd_fast.clip.train_step`` with ``ProGradSGD`` (backend auto: the fused
        Triton / CUDA backend on a GPU; lr 0.002, momentum 0.9, weight decay 5e-4, lam 1) in
        fp32, TF32 off, against the same step on the CPU in float64 (backend torch) from the
        same weights, images and labels: for every trained tensor, the 2-norm of the
        difference of the updates within FP32_TOL (1e-3) of the float64 update's norm
        (measured on CPUs: 1e-6 to 6e-5);
  bf16  the same step under bf16 autocast: every parameter finite, and the difference
        within BF16_TOL (0.25) of the float64 update, all tensors as one vector (measured
        with CPU autocast: 1e-2 to 0.12);
  time  ms per step after warm-up (CUDA events on a GPU), fp32 and bf16.

The learner starts away from zero-shot CLIP (its tensors plus N(0, 0.02^2) noise: a learner
that starts as its teacher has no KL gradient), and the labels are, for each image, the class
the student over-rates most against the teacher, so the two gradients conflict and ProGrad's
projection runs (``fired`` in the rows).
One PASS / FAIL line per method and check, each row appended to ``$OUT/gpu_learners.jsonl``
as it is measured (flushed).  Exit status 1 when a check fails; 0 with a message without CUDA.

Run: ``python benchmarks/gpu_learners.py`` (a budget of 40 s, imports included,
``--budget-s``: work that would not fit in what is left is skipped, with a line saying so),
``python benchmarks/gpu_learners.py --device cpu --tiny`` (the same on the CPU, fp32 and bf16
against float64: a rehearsal).
``--perturb EPS`` scales the device update by ``1 + EPS`` (tests that a wrong step fails).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

START = time.perf_counter()  # the budget counts the imports too (the device check's limit does)

import torch  # noqa: E402

from prograd_fast import ProGradSGD  # noqa: E402
from prograd_fast.clip import PromptedCLIP, train_step  # noqa: E402
from prograd_fast.methods import METHODS  # noqa: E402

FP32_TOL = 1e-3  # fp32 against float64, per tensor: ~1e-5 measured (12-layer towers)
BF16_TOL = 0.25  # bf16 autocast, all tensors as one vector: 1e-2 to 0.12 measured (CPU)
ROUNDING = 1e-3  # an update below this fraction of a tensor's size is compared at that size
HYPER = dict(lr=0.002, momentum=0.9, weight_decay=5e-4, lam=1.0)
SIZES = {  # (text width, vision width, image size, patch, embed dim, classes, batch)
    "small": dict(text=256, vision=384, image=64, patch=16, embed=256, classes=20, batch=8),
    "tiny": dict(text=32, vision=32, image=16, patch=8, embed=24, classes=5, batch=2),
}
ROWS_FILE = "gpu_learners.jsonl"
FUSED = ("triton", "cuda", "cpp")  # ProGradSGD's fused backends


def prograd_learner_methods() -> list[str]:
    """The registered methods with a prompt learner of their own and ProGrad."""
    return [name for name, m in METHODS.items() if m.learner is not None and m.prograd]


def make_clip(size: dict, seed: int = 0):
    """A random open_clip CLIP (fp32, CPU, frozen, eval) with 12-layer ViT and text towers."""
    import open_clip

    torch.manual_seed(seed)
    heads = lambda width: width // 64 if width >= 128 else 2  # noqa: E731
    vision, text = size["vision"], size["text"]
    cfg = dict(embed_dim=size["embed"],
               vision_cfg=dict(image_size=size["image"], patch_size=size["patch"], layers=12,
                               width=vision, head_width=vision // heads(vision)),
               text_cfg=dict(context_length=77, vocab_size=49408, width=text,
                             heads=heads(text), layers=12))
    clip = open_clip.CLIP(**cfg)
    for p in clip.parameters():
        p.requires_grad_(False)
    return clip.eval()


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def classnames(n: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES[:n])


def optimizer(model: PromptedCLIP, backend: str) -> ProGradSGD:
    """ProGradSGD over the learner's parameter groups (one group unless it splits them)."""
    learner = model.prompt_learner
    groups = (learner.param_groups() if hasattr(learner, "param_groups")
              else [{"params": [p for p in learner.parameters() if p.requires_grad]}])
    return ProGradSGD(groups, backend=backend, **HYPER)


def backends_run(opt: ProGradSGD) -> str:
    """The backend each group's last step ran on (``auto`` resolved)."""
    caches = getattr(opt, "_backend_cache", [{}] * len(opt.param_groups))
    return ",".join(c.get("auto_backend") or g["backend"] for g, c in zip(opt.param_groups, caches))


def trained(model: PromptedCLIP) -> dict[str, torch.Tensor]:
    """The trained tensors by name, detached copies in float64 on the CPU."""
    return {n: p.detach().to("cpu", torch.float64).clone()
            for n, p in model.prompt_learner.named_parameters() if p.requires_grad}


def moved_away(state: dict, std: float = 0.02, seed: int = 3) -> dict:
    """fp32 copies of a learner's state with N(0, std^2) added to its float tensors: a start
    away from zero-shot CLIP (a learner that starts as its teacher has no KL gradient)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + std * torch.randn(v.shape, generator=g, dtype=v.dtype)).float()
            if v.is_floating_point() else v for k, v in state.items()}


def conflicting_labels(model: PromptedCLIP, images: torch.Tensor) -> torch.Tensor:
    """For each image, the class the student over-rates most against the teacher."""
    with torch.no_grad():
        student, teacher = model(images)
    return (student.softmax(1) - teacher.softmax(1)).argmax(1)


def one_step(model, images, labels, backend, autocast=None, perturb=0.0):
    """One train_step from the current weights: ``(update per tensor, whether the projection
    fired, the backends that ran, the tensors after the step)`` (float64 CPU copies)."""
    before = trained(model)
    opt = optimizer(model, backend)
    train_step(model, opt, images, labels, autocast_dtype=autocast)
    if perturb:  # for the tests of this script: a wrong device result
        with torch.no_grad():
            for name, p in model.prompt_learner.named_parameters():
                if name in before:
                    p.add_((p - before[name].to(p)) * perturb)
    after = trained(model)
    stats = [s for s in opt.stats() if s is not None]
    fired = bool(any(bool(s["conflict"].any()) for s in stats))
    return {n: after[n] - before[n] for n in before}, fired, backends_run(opt), after


def relative_error(update: dict, ref: dict, before: dict, per_tensor: bool) -> tuple[float, str]:
    """``||update - ref|| / ||ref||`` (2-norms of the updates): the worst tensor's and its
    name, or (``per_tensor=False``) of all tensors as one vector.  ``||ref||`` counts as at
    least ROUNDING of the parameter's norm (fp32 holds a parameter to 6e-8 of its size: an
    update far below it, weight decay alone, is mostly rounding)."""
    parts = {n: (float((update[n] - r).norm()),
                 max(float(r.norm()), ROUNDING * float(before[n].norm()), 1e-30))
             for n, r in ref.items()}
    if not per_tensor:
        return (sum(e * e for e, _ in parts.values()) ** 0.5
                / sum(s * s for _, s in parts.values()) ** 0.5), "all"
    worst, name = 0.0, ""
    for n, (e, s) in parts.items():
        if not e / s <= worst:  # NaN counts as the worst
            worst, name = e / s, n
    return worst, name


def time_steps(model, images, labels, backend, autocast, iters: int, warmup: int = 2) -> float:
    """Median ms per training step (CUDA events around each step on a GPU)."""
    opt = optimizer(model, backend)
    step = lambda: train_step(model, opt, images, labels, autocast_dtype=autocast)  # noqa: E731
    for _ in range(warmup):
        step()
    cuda = images.device.type == "cuda"
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class Rows:
    """Each row as it is measured: a JSON line in ``$OUT/gpu_learners.jsonl``, flushed."""

    def __init__(self, out: str | None) -> None:
        self.file = open(Path(out) / ROWS_FILE, "w") if out else None
        self.failed = 0

    def add(self, row: dict) -> None:
        self.failed += row.get("status") == "FAIL"
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())


class Budget:
    """Seconds left; a piece of work runs only if its kind's last run fits in them (the
    device check's time limit kills a script that overruns, losing its summary)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start, self.last = seconds, START, {}

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def run(self, kind: str, rows: Rows, row: dict, fn):
        """``fn()``, or None with a SKIP line and row when the budget cannot hold it."""
        need = self.last.get(kind, 0.0)
        if self.left() <= need:
            print(f"SKIP  {row['method']:16s} {row['check']}: {max(self.left(), 0):.0f} s of the "
                  f"{self.seconds:g} s budget left, ~{need:.0f} s needed (--budget-s raises it)",
                  flush=True)
            rows.add(dict(row, kind="skip", status="SKIP"))
            return None
        t = time.perf_counter()
        out = fn()
        self.last[kind] = time.perf_counter() - t
        return out


CHECKS = (("fp32", None, FP32_TOL), ("bf16", torch.bfloat16, BF16_TOL))


def reference(name: str, clip64, size: dict) -> dict:
    """The float64 CPU step of ``name``: its start, images, labels, updates."""
    names = classnames(size["classes"])
    g = torch.Generator().manual_seed(1)
    images = torch.randn(size["batch"], 3, size["image"], size["image"], generator=g)
    torch.manual_seed(2)
    ref = PromptedCLIP(clip64, names, learner=METHODS[name].learner)
    init = moved_away(ref.prompt_learner.state_dict())
    ref.prompt_learner.load_state_dict(init)  # both start from the same fp32 values
    labels = conflicting_labels(ref, images.double())
    start = trained(ref)
    update, fired, _, _ = one_step(ref, images.double(), labels, "torch")
    return dict(names=names, images=images, labels=labels, init=init, start=start,
                update=update, fired=fired)


def compare_step(name: str, ref: dict, model, images, labels, kind: str, autocast, tol: float,
                 args, base: dict, rows: Rows) -> None:
    """One step of ``model`` on the device from the reference's start: a PASS / FAIL row."""
    model.prompt_learner.load_state_dict(ref["init"])
    update, fired, backend, after = one_step(model, images, labels, args.backend, autocast,
                                             args.perturb)
    err, worst = relative_error(update, ref["update"], ref["start"], per_tensor=autocast is None)
    finite = all(bool(torch.isfinite(t).all()) for t in after.values())
    status = "PASS" if finite and err <= tol else "FAIL"
    fused = all(b in FUSED for b in backend.split(","))
    note = "" if fused or images.device.type != "cuda" else " (NOT a fused backend)"
    print(f"{status}  {name:16s} {kind}: relative error {err:.2e} (tolerance {tol:g}, "
          f"{'tensor ' + worst if worst != 'all' else 'all tensors'})"
          f"{'' if finite else ', NOT FINITE'}; projection fired {fired} (float64 "
          f"{ref['fired']}); backend {backend}{note}", flush=True)
    rows.add(dict(base, kind="check", check=kind, status=status, rel_err=err, tol=tol,
                  worst=worst, finite=finite, fired=fired, ref_fired=ref["fired"],
                  backend=backend, fused=fused))


def check_method(name: str, clip, clip64, size: dict, device, args, rows: Rows,
                 budget: Budget) -> None:
    """The fp32 and bf16 checks of one method, then its timings, each a row."""
    row = dict(method=name, check="float64 reference and device model")
    ref = budget.run("reference", rows, row, lambda: reference(name, clip64, size))
    if ref is None:
        return
    # the first CUDA call of the script (a rehearsal stops here)
    model = PromptedCLIP(copy.deepcopy(clip).to(device), ref["names"],
                         learner=METHODS[name].learner)
    images, labels = ref["images"].to(device), ref["labels"].to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    base = dict(method=name, device=where, size=args.size, classes=size["classes"],
                batch=size["batch"], params=sum(t.numel() for t in ref["update"].values()))
    for kind, autocast, tol in CHECKS:
        budget.run("check", rows, dict(base, check=kind), partial(
            compare_step, name, ref, model, images, labels, kind, autocast, tol, args, base, rows))
    for kind, autocast, _ in CHECKS if args.iters > 0 else ():
        budget.run("time", rows, dict(base, check=f"time {kind}"), partial(
            timing, name, ref, model, images, labels, kind, autocast, args, base, rows))


def timing(name: str, ref: dict, model, images, labels, kind: str, autocast, args, base: dict,
           rows: Rows) -> None:
    """ms per training step of ``model`` from the reference's start: a row."""
    model.prompt_learner.load_state_dict(ref["init"])
    ms = time_steps(model, images, labels, args.backend, autocast, args.iters)
    print(f"time  {name:16s} {kind}: {ms:.2f} ms/step (median of {args.iters} steps after 2 "
          f"warm-up)", flush=True)
    rows.add(dict(base, kind="time", check=kind, ms_per_step=ms, iters=args.iters))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (CPU tests)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="methods to check (default: every registered learner with ProGrad)")
    ap.add_argument("--backend", default="auto", help="ProGradSGD backend on the device")
    ap.add_argument("--iters", type=int, default=5,
                    help="timed steps per method and dtype (0: no timing)")
    ap.add_argument("--budget-s", type=float, default=40.0,
                    help="seconds; work that would not fit in what is left is skipped")
    ap.add_argument("--perturb", type=float, default=0.0,
                    help="for tests: scale the device update by 1 + PERTURB (a check must fail)")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_learners: no CUDA device here; skipped (--device cpu runs it on the CPU)")
        return 0
    methods = args.methods or prograd_learner_methods()
    unknown = [m for m in methods if m not in METHODS or METHODS[m].learner is None]
    if unknown:
        ap.error(f"not a registered method with a learner: {', '.join(unknown)}")
    args.size = "tiny" if args.tiny else "small"
    size = SIZES[args.size]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (cuDNN's conv too)
    torch.backends.cudnn.allow_tf32 = False
    rows = Rows(os.environ.get("OUT"))
    rows.add(dict(kind="meta", date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                  python=platform.python_version(), torch=torch.__version__,
                  triton=triton_version(), methods=methods, size=size))
    print(f"gpu_learners: {', '.join(methods)}; {args.size} random ViT CLIP (12+12 layers, "
          f"text {size['text']}, vision {size['vision']}), {size['classes']} classes, batch "
          f"{size['batch']}; torch {torch.__version__}; budget {args.budget_s:g} s", flush=True)
    clip = make_clip(size)
    clip64 = copy.deepcopy(clip).double()
    for name in methods:
        try:
            check_method(name, clip, clip64, size, device, args, rows, budget)
        except Exception as exc:  # one method's failure does not hide the others'
            print(f"FAIL  {name:16s}: {type(exc).__name__}: {exc}", flush=True)
            rows.add(dict(method=name, kind="check", check="error", status="FAIL",
                          error=f"{type(exc).__name__}: {exc}"))
    print(f"gpu_learners: {rows.failed} failed, {budget.seconds - budget.left():.1f} s",
          flush=True)
    return 1 if rows.failed else 0


if __name__ == "__main__":
    sys.exit(main())
