"""One training step of CoCoOp, MaPLe, IVLP and KgCoOp: the official code (vendored) against
prograd_fast's ``<method>+prograd``, on the same random weights, alternated in one run.

    PROGRAD_BENCH_THREADS=1 python benchmarks/learners_bench.py [--rounds 2]
        [--methods cocoop maple ivlp kgcoop] [--json PATH] [--write BENCHMARKS.md]
    python benchmarks/learners_bench.py --tiny --methods kgcoop    # seconds: a smoke run
    python benchmarks/learners_bench.py --render benchmarks/results/learners.json \\
        --write BENCHMARKS.md                                      # the section from a JSON

The model is a random ViT-B/16 in OpenAI's layout (the official ``clip/model.py`` builds it
through each trainer's own ``load_clip_to_cpu`` and ``design_details``; the same weights
are loaded into open_clip's ViT-B-16 with QuickGELU for ours), 100 classes with synthetic
names of varied token lengths, batch 4, random 224x224 images, fp32.

- official: the trainer's ``forward_backward`` without ProGrad: forward, loss (KgCoOp's
  with W * its knowledge-guided score), ``zero_grad``, backward, Dassl's SGD step on what
  the trainer gives its optimiser.  The official code casts prompts to fp16 (``.half()``;
  fp32 runs would still round them, and MaPLe's ``proj.half()`` would not run in fp32):
  those casts are no-ops here, so the official step runs in fp32 throughout.
- ours: :class:`prograd_fast.clip.PromptedCLIP` with the registered learner of
  ``<method>+prograd``, :func:`prograd_fast.clip.train_step` and ``build_optimizer``
  (``ProGradSGD``, ``lam=1``): the zero-shot teacher's loss and the general gradient are in
  the step.

A warm-up step of the official code and two of ours (prograd_fast's host helper is built or
loaded after its first step), then ``--rounds`` rounds, each one official step then one of ours;
times are wall-clock medians, the ratio is the median of the per-round ratios.  A method
whose ``+prograd`` is not registered is listed as "not registered yet".  Needs the
vendored sources (``../shared/vendor``, or ``PROGRAD_FAST_VENDOR`` / ``--vendor``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace as NS

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import replace_section  # noqa: E402

LABEL = "learners"
MULTIMODAL = "multimodal-prompt-learning-69bce21.tar.gz"
DASSL = "Dassl.pytorch-c61a1b5.tar.gz"
KGCOOP = "KgCoOp-c43ccc3.tar.gz"
BACKBONE = "ViT-B/16"
CTX_INIT = "a photo of a"
KG_WEIGHT = 8.0
KG_DATASET = "ImageNet"  # its KgCoOp and CoOp templates: "a photo of a {}."
#: ours / official at most, per method (the project's targets).
TARGETS = {"cocoop": 0.2, "maple": 0.5, "ivlp": 0.5, "kgcoop": 0.3}
METHODS = tuple(TARGETS)
Step = Callable[[torch.Tensor, torch.Tensor], None]
FP32_NOTE = ("official code in fp32: its .half() casts (prompts in the deep-prompt blocks, "
             "MaPLe's proj, build_model's weights) are no-ops")


@dataclass(frozen=True)
class Scale:
    """The model and batch: OpenAI-layout sizes, open_clip's config, classes, batch, depths."""

    name: str
    image_size: int
    vision_layers: int
    text_layers: int
    classes: int
    batch: int
    maple_depth: int  # MaPLe's PROMPT_DEPTH (its config: 9)
    ivlp_depth: int  # IVLP's PROMPT_DEPTH_TEXT / _VISION (its 2+2ctx config: 12)

    def openai_dims(self) -> dict:
        """Arguments of the official ``CLIP`` constructor (ViT-B/16's widths: the official
        MaPLe and KgCoOp learners hard-code 512 / 768)."""
        return dict(embed_dim=512, image_resolution=self.image_size,
                    vision_layers=self.vision_layers, vision_width=768, vision_patch_size=16,
                    context_length=77, vocab_size=49408, transformer_width=512,
                    transformer_heads=8, transformer_layers=self.text_layers)

    def open_clip_cfg(self) -> dict:
        """open_clip's ViT-B-16 config at this scale, with QuickGELU (OpenAI's activation)."""
        import open_clip

        cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16"))
        cfg["vision_cfg"].update(image_size=self.image_size, layers=self.vision_layers)
        cfg["text_cfg"].update(layers=self.text_layers)
        cfg["quick_gelu"] = True
        return cfg


FULL = Scale("ViT-B/16", 224, 12, 12, classes=100, batch=4, maple_depth=9, ivlp_depth=12)
TINY = Scale("tiny (ViT-B/16 widths, 2 layers, 32x32)", 32, 2, 2, classes=6, batch=4,
             maple_depth=2, ivlp_depth=2)


# --------------------------------------------------------------------------- inputs

_WORDS = ["red", "fox", "golden retriever", "sea lion", "traffic light", "rhododendron", "x",
          "boeing 747-400", "mountain bike", "quokka", "cheeseburger", "african grey parrot",
          "lawn mower", "ant", "crème brûlée", "tabby cat", "stop sign", "snow leopard"]


def classnames(n: int) -> list[str]:
    """``n`` distinct synthetic class names of varied token lengths (1 to about 12)."""
    return [" ".join([_WORDS[(7 * i + 5 * j) % len(_WORDS)] for j in range(i % 4)] + [str(i)])
            for i in range(n)]


def batch(scale: Scale, n_classes: int, size: int,
          seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (standard normal, like normalised pixels) and labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, scale.image_size, scale.image_size, generator=g)
    return images, torch.randint(0, n_classes, (size,), generator=g)


# --------------------------------------------------------------------------- official trees

def unpack(vendor: Path, archive: str, dest: Path) -> Path:
    """``archive`` from ``vendor`` unpacked into ``dest`` (once)."""
    if not (dest / ".unpacked").exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(vendor / archive) as tar:
            tar.extractall(dest, filter="data")
        (dest / ".unpacked").touch()
    return dest


def import_tree(roots: list[Path], modules: list[str]) -> list:
    """Import ``modules`` with ``roots`` first on ``sys.path``; the top-level names the
    official trees define (clip, dassl, trainers) are put back as they were after."""
    saved_path = list(sys.path)
    tops = ("clip", "dassl", "trainers")
    before = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] in tops}
    sys.path[:0] = [str(r) for r in roots]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return [importlib.import_module(m) for m in modules]
    finally:
        sys.path[:] = saved_path
        for name in [m for m in sys.modules if m.split(".")[0] in tops]:
            del sys.modules[name]
        sys.modules.update(before)


@dataclass
class Official:
    """The imported official code: trainer modules by method, Dassl's optimiser builders."""

    trainers: dict
    build_optimizer: dict  # method -> Dassl's build_optimizer of the tree it runs in
    optim_cfg: dict  # method -> Dassl's default OPTIM
    clip_class: type  # the official CLIP (clip/model.py) that makes the random weights


#: The trainer module of each method in its tree.
TRAINER_MODULES = {"cocoop": "trainers.cocoop", "maple": "trainers.maple",
                   "ivlp": "trainers.independentVL", "kgcoop": "trainers.kgcoop"}


@functools.lru_cache(maxsize=None)
def _import_official(vendor: Path, work: Path, kgcoop: bool) -> tuple:
    """One official tree's trainer modules, Dassl's optimiser module and config module and
    its ``clip.model``, imported once per process: the KgCoOp repository with its Dassl
    fork (``kgcoop``), else the MaPLe repository with upstream Dassl."""
    if kgcoop:
        root = unpack(vendor, KGCOOP, work / "kgcoop")
        roots, methods = [root / "KgCoOp", root / "Dassl.ProGrad.pytorch"], ["kgcoop"]
    else:
        roots = [unpack(vendor, MULTIMODAL, work / "multimodal"),
                 unpack(vendor, DASSL, work / "dassl")]
        methods = ["cocoop", "maple", "ivlp"]
    *mods, optim, config, model = import_tree(
        roots, [TRAINER_MODULES[m] for m in methods] + ["dassl.optim", "dassl.config",
                                                        "clip.model"])
    return dict(zip(methods, mods)), optim, config, model


def load_official(vendor: Path, work: Path, methods: list[str]) -> Official:
    """The official code of ``methods``: their trainers, Dassl's optimiser builder and
    default OPTIM of the tree each runs in, and the CLIP class that makes the weights."""
    trainers, builders, optim_cfg, clip_class = {}, {}, {}, None
    for kgcoop in (False, True):
        wanted = [m for m in methods if (m == "kgcoop") == kgcoop]
        if not wanted:
            continue
        mods, optim, config, model = _import_official(Path(vendor), Path(work), kgcoop)
        for m in wanted:
            trainers[m], builders[m] = mods[m], optim.build_optimizer
            optim_cfg[m] = config.get_cfg_default().OPTIM
        clip_class = clip_class or model.CLIP
    return Official(trainers, builders, optim_cfg, clip_class)


@contextlib.contextmanager
def patched(*changes: tuple[object, str, object]) -> Iterator[None]:
    """Set attributes for the duration of the block, then put the old values back."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _not_a_jit_archive(*args, **kwargs):
    raise RuntimeError("not a TorchScript archive")  # the trainers then read a state dict


def fp32_official() -> contextlib.AbstractContextManager:
    """The official code on CPU in fp32: ``.cuda()`` stays on CPU, ``.half()`` is a no-op."""
    identity = lambda self, *a, **k: self  # noqa: E731
    return patched((torch.Tensor, "half", identity), (torch.Tensor, "cuda", identity),
                   (nn.Module, "cuda", identity))


#: Each method's official settings (configs/trainers/<Trainer>/...yaml) and learning rate.
OFFICIAL_LR = {"cocoop": 0.002, "maple": 0.0035, "ivlp": 0.0035, "kgcoop": 0.002}


def official_cfg(method: str, scale: Scale):
    common = dict(INPUT=NS(SIZE=(scale.image_size, scale.image_size)),
                  MODEL=NS(BACKBONE=NS(NAME=BACKBONE)), DATASET=NS(NAME=KG_DATASET))
    trainer = {
        "cocoop": NS(COCOOP=NS(N_CTX=4, CTX_INIT=CTX_INIT, PREC="fp32")),
        "maple": NS(MAPLE=NS(N_CTX=2, CTX_INIT=CTX_INIT, PREC="fp32",
                             PROMPT_DEPTH=scale.maple_depth)),
        "ivlp": NS(IVLP=NS(N_CTX_TEXT=2, N_CTX_VISION=2, CTX_INIT=CTX_INIT, PREC="fp32",
                           PROMPT_DEPTH_TEXT=scale.ivlp_depth,
                           PROMPT_DEPTH_VISION=scale.ivlp_depth)),
        "kgcoop": NS(COOP=NS(N_CTX=4, CTX_INIT=True, CSC=False, CLASS_TOKEN_POSITION="end",
                             W=KG_WEIGHT, PREC="fp32"), COCOOP=NS(PREC="fp32")),
    }[method]
    return NS(TRAINER=trainer, **common)


def build_official(official: Official, method: str, scale: Scale, state: dict,
                   names: list[str]) -> tuple[nn.Module, Step]:
    """The official model (``CustomCLIP``) of ``method`` on ``state`` and its training step."""
    trainer = official.trainers[method]
    cfg = official_cfg(method, scale)
    with fp32_official(), contextlib.redirect_stdout(io.StringIO()), patched(
            (trainer.clip, "_download", lambda url, *a, **k: f"<random {BACKBONE}>"),
            (torch.jit, "load", _not_a_jit_archive),
            (torch, "load", lambda *a, **k: dict(state))):
        clip_model = trainer.load_clip_to_cpu(cfg).float()  # as build_model does for fp32
        torch.manual_seed(1)
        if method == "kgcoop":  # its learner loads a second CLIP for its targets: the same
            with patched((trainer, "load_clip_to_cpu", lambda cfg: clip_model)):
                model = trainer.CustomCLIP(cfg, names, clip_model)
        else:
            model = trainer.CustomCLIP(cfg, names, clip_model)
        model.float()
    # which parameters learn and what the optimiser gets, as each trainer's build_model
    if method in ("maple", "ivlp"):
        learns, optimised = (lambda n: "prompt_learner" in n or "VPT" in n), model
    elif method == "cocoop":
        learns, optimised = (lambda n: "prompt_learner" in n), model.prompt_learner
    else:
        learns, optimised = (lambda n: "ctx" in n), model.prompt_learner
    for name, p in model.named_parameters():
        p.requires_grad_(learns(name))
    optim_cfg = official.optim_cfg[method].clone()
    optim_cfg.defrost()
    optim_cfg.NAME, optim_cfg.LR = "sgd", OFFICIAL_LR[method]
    optim = official.build_optimizer[method](optimised, optim_cfg)
    model.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with fp32_official():
            if method == "kgcoop":
                logits, score = model(images)
                loss = F.cross_entropy(logits, labels) + KG_WEIGHT * score
            else:
                loss = model(images, labels)
            optim.zero_grad()
            loss.backward()
            optim.step()

    return model, step


# --------------------------------------------------------------------------- ours

def ours_settings(method: str, scale: Scale) -> dict:
    """The learner's settings, the official configs' (see ``official_cfg``)."""
    if method == "cocoop":
        return dict(n_ctx=4, ctx_init=CTX_INIT)
    if method == "maple":
        return dict(n_ctx=2, depth=scale.maple_depth, ctx_init=CTX_INIT)
    if method == "ivlp":
        return dict(n_ctx_text=2, n_ctx_vision=2, depth_text=scale.ivlp_depth,
                    depth_vision=scale.ivlp_depth, ctx_init=CTX_INIT)
    return dict(templates=KG_DATASET, template_set="kgcoop", kg_templates=KG_DATASET,
                kg_weight=KG_WEIGHT)


def registered(method: str):
    """The registry's ``<method>+prograd``, or None while it is not registered."""
    from prograd_fast.methods import METHODS as REGISTRY

    return REGISTRY.get(f"{method}+prograd")


def open_clip_model(scale: Scale, state: dict) -> nn.Module:
    """open_clip's ViT-B-16 (at ``scale``) holding the OpenAI-layout ``state``."""
    import open_clip

    model = open_clip.CLIP(**scale.open_clip_cfg())
    mine = model.state_dict()
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k in mine},
                                                strict=False)
    if unexpected or any("attn_mask" not in k and "logit_bias" not in k for k in missing):
        raise RuntimeError(f"open_clip and the official layout differ: missing {missing}")
    return model.eval()


def build_ours(method: str, scale: Scale, state: dict,
               names: list[str]) -> tuple[nn.Module, Step]:
    """prograd_fast's ``<method>+prograd`` (``PromptedCLIP``) on ``state`` and its step."""
    from prograd_fast.clip import PromptedCLIP, train_step
    from prograd_fast.clip.train import build_optimizer

    entry = registered(method)
    torch.manual_seed(1)
    model = PromptedCLIP(open_clip_model(scale, state), names, learner=entry.learner,
                         **ours_settings(method, scale))
    optim = build_optimizer(model, lr=OFFICIAL_LR[method], lam=1.0)
    model.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        train_step(model, optim, images, labels)

    return model, step


# --------------------------------------------------------------------------- timing

@dataclass
class Row:
    method: str
    target: float
    status: str = "measured"  # or "not registered yet" / "skipped: ..." / "error: ..."
    official_ms: list[float] = field(default_factory=list)
    ours_ms: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if not self.ours_ms:
            return None
        return statistics.median(o / f for o, f in zip(self.ours_ms, self.official_ms))

    def as_dict(self) -> dict:
        ratio = self.ratio
        return dict(method=self.method, status=self.status, target=self.target,
                    official_ms=_median(self.official_ms), ours_ms=_median(self.ours_ms),
                    ratio=ratio, met=None if ratio is None else ratio <= self.target,
                    official_rounds_ms=self.official_ms, ours_rounds_ms=self.ours_ms)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


#: Memory an official step keeps for backward per text sequence and layer, in (77 x 512)
#: fp32 tensors: about 24 (measured: ~45 MB per prompt through ViT-B/16's 12 text layers).
SAVED_PER_LAYER = 24


def official_memory_gb(method: str, scale: Scale, n_classes: int, size: int) -> float:
    """About how much memory the official step needs for its backward: every class prompt
    through every text layer, and CoCoOp's for every image of the batch at once."""
    sequences = n_classes * (size if method == "cocoop" else 1)
    per_sequence = 77 * 512 * 4 * SAVED_PER_LAYER * scale.text_layers
    models = 2 * 0.6 * (scale.text_layers + scale.vision_layers) / 24  # official's and ours
    return sequences * per_sequence / 1e9 + models + 0.5  # + the image tower's, the rest


#: Memory left to the rest of the machine (a shared one) when an official step runs.
HEADROOM_GB = 2.0


def available_gb() -> float | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        pass
    return None


def timed(step: Callable, images: torch.Tensor, labels: torch.Tensor) -> float:
    start = time.perf_counter()
    step(images, labels)
    return (time.perf_counter() - start) * 1e3


def base_state(official: Official, scale: Scale) -> dict:
    """Random OpenAI-layout CLIP weights: the official ``clip/model.py``'s CLIP (seed 0)."""
    torch.manual_seed(0)
    kwargs = scale.openai_dims()
    if "design_details" in official.clip_class.__init__.__code__.co_varnames:  # deep prompts'
        kwargs["design_details"] = {"trainer": "CoOp", "vision_depth": 0, "language_depth": 0,
                                    "vision_ctx": 0, "language_ctx": 0}
    return {k: v.float() for k, v in official.clip_class(**kwargs).state_dict().items()}


def run(args) -> dict:
    scale = TINY if args.tiny else FULL
    n_classes = args.classes or scale.classes
    size = args.batch or scale.batch
    names = classnames(n_classes)
    images, labels = batch(scale, n_classes, size)
    rows = {m: Row(m, TARGETS[m]) for m in args.methods}
    todo = [m for m in args.methods if registered(m) is not None]
    for m in args.methods:
        rows[m].status = "pending (the run stopped before it)" if m in todo else \
            "not registered yet"
    facts = report(args, scale, n_classes, size)

    def results() -> dict:
        return dict(facts, rows=[rows[m].as_dict() for m in args.methods])

    official = state = None
    for method in todo:
        row = rows[method]
        need, free = official_memory_gb(method, scale, n_classes, size), available_gb()
        if args.memory_check and free is not None and need > free - HEADROOM_GB:
            row.status = (f"skipped: its official step needs about {need:.0f} GB of memory, "
                          f"{free:.0f} GB available")
            print(f"{method}: {row.status}", flush=True)
            continue
        print(f"{method}: building the official model and ours ...", flush=True)
        row.status, theirs, ours = "measured", None, None
        try:
            if official is None:  # imported once, for the methods to measure
                official = load_official(args.vendor, args.work, todo)
                state = base_state(official, scale)
            _, theirs = build_official(official, method, scale, state, names)
            _, ours = build_ours(method, scale, state, names)
            # warm-up: ours twice (its host helper is built or loaded after the first step)
            timed(theirs, images, labels), timed(ours, images, labels), timed(ours, images, labels)
            for r in range(args.rounds):
                row.official_ms.append(timed(theirs, images, labels))
                row.ours_ms.append(timed(ours, images, labels))
                print(f"  round {r + 1}: official {row.official_ms[-1]:.1f} ms, "
                      f"ours {row.ours_ms[-1]:.1f} ms", flush=True)
        except Exception as exc:  # one method's failure does not hide the others' numbers
            traceback.print_exc()
            row.status = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:200]
            row.official_ms, row.ours_ms = [], []
        theirs = ours = None  # this method's models go before the next one's are built
        gc.collect()
        save(args.json, results())  # what is measured so far, should the run be stopped
    return results()


def save(path: Path | None, data: dict) -> None:
    """Write the results as JSON to ``path`` (nothing when None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def report(args, scale: Scale, n_classes: int, size: int) -> dict:
    import open_clip

    return dict(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=args.command, device=cpu_model(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        torch=torch.__version__, open_clip=open_clip.__version__,
        python=platform.python_version(), commit=git_commit(),
        model=scale.name, classes=n_classes, batch=size, image_size=scale.image_size,
        dtype="float32", rounds=args.rounds, maple_depth=scale.maple_depth,
        ivlp_depth=scale.ivlp_depth, note=FP32_NOTE)


# --------------------------------------------------------------------------- output

def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def verdict(row: dict) -> str:
    if row["status"] != "measured":
        return row["status"]
    return "met" if row["met"] else "missed"


def table(data: dict) -> list[str]:
    lines = ["| method | official (ms) | ours + ProGrad (ms) | ours / official | target "
             "| verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for row in data["rows"]:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}x"
        lines.append(f"| {row['method']} | {_ms(row['official_ms'])} | {_ms(row['ours_ms'])} | "
                     f"{ratio} | <= {row['target']:g}x | {verdict(row)} |")
    return lines


def render(data: dict) -> str:
    """BENCHMARKS.md's section: how it was measured, then one row per method."""
    load = data.get("load_average")
    load = "" if not load else f" (load average {load[0]:.1f} at the start)"
    lines = [
        "### Prompt learners: one training step, official code vs prograd_fast + ProGrad (CPU)",
        "",
        f"- date {data['date']}, {data['device']}, {data['cpu_count']} CPUs{load}, "
        f"{data['torch_threads']} torch thread(s), torch {data['torch']}, "
        f"open_clip {data['open_clip']}, python {data['python']}"
        + (f", commit {data['commit']}" if data.get("commit") else ""),
        f"- command: `{data['command']}`",
        f"- random {data['model']} in OpenAI's layout, the same weights in the official "
        f"model and in open_clip (QuickGELU); {data['classes']} classes (synthetic names of "
        f"varied token lengths), batch {data['batch']}, random "
        f"{data['image_size']}x{data['image_size']} images, {data['dtype']}; MaPLe depth "
        f"{data['maple_depth']} n_ctx 2, IVLP depth {data['ivlp_depth']} (text and vision) "
        f"n_ctx 2 + 2, CoCoOp n_ctx 4, KgCoOp W {KG_WEIGHT:g}",
        "- official: its trainer's step without ProGrad (forward, loss, backward, Dassl's SGD "
        f"step); {data['note']}",
        "- ours: `<method>+prograd` (PromptedCLIP, `train_step`, ProGradSGD with lam 1: the "
        "zero-shot teacher and the general gradient are in the step)",
        "- warm-up: a step of the official code, two of ours (prograd_fast's host helper is "
        f"built or loaded after its first step); then {data['rounds']} round(s) alternating "
        "official / ours; "
        "wall-clock medians; the ratio is the median of the per-round ratios",
        "",
        *table(data),
    ]
    return "\n".join(lines) + "\n"


def default_vendor() -> Path:
    return Path(os.environ.get("PROGRAD_FAST_VENDOR") or REPO.parent / "shared" / "vendor")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true",
                    help="2-layer model at 32x32, 6 classes: a smoke run of seconds")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (default 2)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--classes", type=int, default=None, help="override the number of classes")
    ap.add_argument("--batch", type=int, default=None, help="override the batch size")
    ap.add_argument("--json", type=Path, default=None,
                    help="where to write the results (default benchmarks/results/learners.json; "
                         "none for --tiny)")
    ap.add_argument("--write", type=Path, default=None,
                    help="markdown file whose learners section to set (e.g. BENCHMARKS.md)")
    ap.add_argument("--render", type=Path, default=None,
                    help="print (and --write) the section from this JSON, measuring nothing")
    ap.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                    help="run an official step even where it may need more memory than is "
                         "available (official CoCoOp at 100 classes, batch 4: about 19 GB)")
    ap.add_argument("--vendor", type=Path, default=None, help="the vendored sources' folder")
    ap.add_argument("--work", type=Path,
                    default=Path(tempfile.gettempdir()) / "prograd_fast_learners_bench",
                    help="where the official sources are unpacked")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    for name in ("classes", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    args.vendor = args.vendor or default_vendor()
    if args.json is None and not args.tiny:
        args.json = REPO / "benchmarks" / "results" / "learners.json"
    threads = os.environ.get("PROGRAD_BENCH_THREADS", "").strip()
    prefix = f"PROGRAD_BENCH_THREADS={threads} " if threads else ""
    args.command = prefix + "python benchmarks/learners_bench.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render is not None:
        data = json.loads(args.render.read_text())
    else:
        missing = [a for a in (MULTIMODAL, DASSL, KGCOOP) if not (args.vendor / a).is_file()]
        if missing:
            print(f"error: the official sources {', '.join(missing)} are not in {args.vendor} "
                  f"(set PROGRAD_FAST_VENDOR or --vendor)", file=sys.stderr)
            return 2
        threads = os.environ.get("PROGRAD_BENCH_THREADS", "").strip()
        if threads:
            torch.set_num_threads(int(threads))
        data = run(args)
        save(args.json, data)
    body = render(data)
    print(body)
    if args.write is not None:
        args.write.write_text(replace_section(args.write.read_text(), LABEL, body))
    return 1 if any(r["status"].startswith("error") for r in data["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
