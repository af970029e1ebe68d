"""Few-shot prompt-tuning trainer: zero-shot / CoOp / ProGrad, logs, plot, checkpoints."""

from __future__ import annotations

import csv
import importlib.util
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..amp import ProGradGradScaler
from ..atomic import atomic_torch_save, atomic_write, atomic_write_json
from ..methods import METHODS, get_method
from . import parallel
from .model import PromptedCLIP
from .train import build_optimizer, coop_lr_lambda, train_step

__all__ = ["TrainConfig", "Trainer", "evaluate", "correct_counts", "transfer_context", "METHODS",
           "PRECISIONS", "PROGRAD_GROUPS", "epoch_line"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``together``: the learner's whole prompt is one projected vector (ProGrad's paper);
#: ``apart``: a learner with prompts in both towers projects each tower's on its own.
PROGRAD_GROUPS = ("together", "apart")


@dataclass
class TrainConfig:
    """Options of one run (CoOp's defaults for the optimiser and schedule).  ``eval_every``:
    evaluate every N epochs; 0 (the default, as CoOp) evaluates after the last epoch only."""

    method: str = "prograd"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    lam: float = 1.0
    temperature: float = 1.0
    granularity: str = "global"
    backend: str = "auto"
    precision: str = "fp32"
    grad_mode: str = "auto"
    seed: int = 1
    num_workers: int = 0
    log_every: int = 20
    eval_every: int = 0
    output_dir: str | None = None
    progress: bool = True
    drop_last: bool = False
    inputs: str = "images"
    prograd_groups: str = "together"
    plot: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.inputs not in ("images", "features"):
            raise ValueError(f"inputs must be 'images' or 'features', got {self.inputs!r}")
        if self.prograd_groups not in PROGRAD_GROUPS:
            raise ValueError(f"prograd_groups must be one of {PROGRAD_GROUPS}, got "
                             f"{self.prograd_groups!r}")


@torch.no_grad()
def evaluate(model: PromptedCLIP, loader: Sequence, device: torch.device | str = "cpu",
             zeroshot: bool = False, autocast_dtype: torch.dtype | None = None,
             inputs_are_features: bool = False) -> float:
    """Top-1 accuracy (in %) of the prompted model (or its zero-shot teacher)."""
    counts = correct_counts(model, loader, device, zeroshot, autocast_dtype, inputs_are_features)
    correct, total = counts.tolist()
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def correct_counts(model: PromptedCLIP, loader: Sequence, device: torch.device | str = "cpu",
                   zeroshot: bool = False, autocast_dtype: torch.dtype | None = None,
                   inputs_are_features: bool = False) -> torch.Tensor:
    """``[correct, total]`` on the device (no sync), for sums over processes or shards.
    ``inputs_are_features``: the loader yields normalised image features, not images
    (refused for a learner that prompts the image tower: cached features are the frozen
    tower's).  An image-conditioned learner's text features are built per batch."""
    device = torch.device(device)
    if inputs_are_features and not zeroshot and model.vision_prompted:
        raise ValueError(f"{type(model.prompt_learner).__name__} prompts the image tower: "
                         f"evaluate it on images, not on cached image features")
    counts = torch.zeros(2, dtype=torch.long, device=device)
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(device.type, enabled=False))
    per_batch = not zeroshot and model.image_conditioned
    with ctx:
        text = None if zeroshot or per_batch else model.text_features()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            if inputs_are_features:
                feats = images
            else:
                feats = model.encode_image(images) if zeroshot else model.student_image_features(images)
            if zeroshot:
                logits = model.zeroshot_logits(feats)
            else:
                logits = model.logits(feats, model.text_features(feats) if per_batch else text)
            counts[0] += (logits.argmax(-1) == labels).sum()
            counts[1] += labels.numel()
    return counts


def transfer_context(model: PromptedCLIP, classnames: Sequence[str], templates=None,
                     tokenizer=None, ctx_init: str | None = None) -> PromptedCLIP:
    """The same CLIP with the learned (generic) prompt on other class names: base-to-new,
    cross-data-set (the learner's ``moved_to``).  A ``ctx_init_mode="prograd"`` prompt keeps
    its fixed init tokens (official ProGrad builds the evaluated prompt from the target data
    set's template: pass that template's words as ``ctx_init``)."""
    other = model.prompt_learner.moved_to(model.tower, classnames, tokenizer=tokenizer,
                                          ctx_init=ctx_init)
    return PromptedCLIP(model.clip, classnames, tokenizer=tokenizer,
                        templates=templates if templates is not None else model.teacher.templates,
                        share_prefix=model.share_prefix, learner=other)


class Trainer:
    """Trains ``model``'s prompt on ``train_set`` and evaluates it on ``eval_set`` after the
    last epoch (and every ``eval_every`` epochs).  With a ``val_set`` the periodic
    evaluations use it (``val_acc``) and ``eval_set`` is tested after the last epoch only.
    ``log`` (e.g. ``print``) gets one line per epoch (:func:`epoch_line`).

    Writes to ``config.output_dir``: ``log.json`` and ``log.csv`` (one row per epoch:
    lr, cross-entropy, KL, conflict rate, accuracy), ``curves.png``, and
    ``checkpoint.pt`` (context, optimiser, scheduler, scaler, history) which
    :meth:`fit` resumes from; every file is written atomically.  Device statistics (losses,
    ``optimizer.stats()``) are accumulated on the device and read once per epoch and every
    ``log_every`` steps.

    Each epoch is one seeded permutation cut into global batches of ``batch_size``
    (``drop_last`` drops a short last one, as Dassl does when the set holds at least one
    batch).  Under torchrun every process takes its share of each global batch and the
    gradients are averaged (:mod:`prograd_fast.clip.parallel`): the result equals one
    process on the same global batches; only rank 0 writes files.
    """

    def __init__(self, model: PromptedCLIP, train_set: Dataset, eval_set: Dataset | None,
                 config: TrainConfig, device: torch.device | str = "cpu", *,
                 val_set: Dataset | None = None, log: Callable[[str], None] | None = None) -> None:
        self.model, self.config = model, config
        self.log = log
        self.device = torch.device(device)
        self.model.to(self.device)
        self._shuffle = torch.Generator().manual_seed(config.seed)
        self.train_set = train_set
        self.world, self.rank = parallel.world_size(), parallel.rank()
        if eval_set is not None and self.world > 1:  # each process tests its shard
            eval_set = Subset(eval_set, range(self.rank, len(eval_set), self.world))
        self.eval_loader = (DataLoader(eval_set, batch_size=max(config.batch_size, 100),
                                       num_workers=config.num_workers) if eval_set is not None else None)
        if val_set is not None and self.world > 1:
            val_set = Subset(val_set, range(self.rank, len(val_set), self.world))
        self.val_loader = (DataLoader(val_set, batch_size=max(config.batch_size, 100),
                                      num_workers=config.num_workers) if val_set is not None else None)
        if config.inputs == "features" and model.vision_prompted:
            raise ValueError(f"{type(model.prompt_learner).__name__} prompts the image tower: "
                             f"train it on images (inputs='images'), not on cached image "
                             f"features")
        self.method = get_method(config.method)
        lam = config.lam if self.method.prograd else 0.0
        self.optimizer = build_optimizer(model, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay, lam=lam,
                                         granularity=config.granularity, backend=config.backend,
                                         split_groups=config.prograd_groups == "apart")
        self._lr_factor = coop_lr_lambda(max(config.epochs, 1), config.warmup_epochs,
                                         config.lr, config.warmup_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.autocast = PRECISIONS[config.precision]
        # ProGrad's scaler: a step skipped for a general-gradient overflow lowers the scale too
        self.scaler = ProGradGradScaler(self.device.type) if config.precision == "fp16" else None
        self.history: list[dict] = []
        self.epoch = 0
        self.out = Path(config.output_dir) if config.output_dir else None
        if self.out and self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        learner = self.model.prompt_learner
        ctx = getattr(learner, "ctx", None)  # CoOp's context, as checkpoints first held it
        return {**({"ctx": ctx.detach().cpu()} if isinstance(ctx, torch.Tensor) else {}),
                "learner": {k: v.detach().cpu() for k, v in learner.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "epoch": self.epoch, "history": self.history,
                "rng": torch.get_rng_state(), "shuffle_rng": self._shuffle.get_state(),
                "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        learner = self.model.prompt_learner
        ctx = getattr(learner, "ctx", None)
        if "ctx" in state and isinstance(ctx, torch.Tensor) \
                and tuple(state["ctx"].shape) != tuple(ctx.shape):  # copy_ would broadcast
            raise ValueError(f"the checkpoint holds a context of shape {tuple(state['ctx'].shape)}, "
                             f"this model's is {tuple(ctx.shape)} (n_ctx, class-specific context "
                             f"and classes must match the run that saved it)")
        if "learner" in state:
            learner.load_state_dict(state["learner"])
        else:  # a checkpoint of an earlier version: the context only
            with torch.no_grad():
                ctx.copy_(state["ctx"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        # the schedule follows this run's config (e.g. more epochs than the checkpoint's run)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self._lr_factor(self.epoch)
        torch.set_rng_state(state["rng"])
        self._shuffle.set_state(state["shuffle_rng"])

    def _checkpoint_path(self) -> Path | None:
        return self.out / "checkpoint.pt" if self.out else None

    def save(self) -> None:
        path = self._checkpoint_path()
        if path and self.rank == 0:
            atomic_torch_save(self.state_dict(), path)

    def maybe_resume(self) -> bool:
        """Load ``output_dir/checkpoint.pt`` when present; True if resumed."""
        path = self._checkpoint_path()
        if not path or not path.exists():
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        return True

    # ---------------------------------------------------------------- loop
    def evaluate(self, zeroshot: bool = False, val: bool = False) -> float | None:
        """Accuracy (%) on the test set, or on the validation set with ``val=True``."""
        loader = self.val_loader if val else self.eval_loader
        if loader is None:
            return None
        counts = correct_counts(self.model, loader, self.device, zeroshot, self.autocast)
        correct, total = parallel.all_reduce_sum(counts).tolist()
        return 100.0 * correct / max(total, 1)

    def _loader(self) -> tuple[DataLoader, list[float]]:
        """This epoch's loader over this process's shares of the global batches, and the
        loss weight of each share."""
        cfg = self.config
        drop_last = cfg.drop_last and len(self.train_set) >= cfg.batch_size
        shares = [parallel.local_share(b, self.rank, self.world) for b in parallel.global_batches(
            len(self.train_set), cfg.batch_size, drop_last, self._shuffle)]
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(self.epoch)
        loader = DataLoader(self.train_set, batch_sampler=[s[0] for s in shares],
                            num_workers=cfg.num_workers, generator=self._shuffle)
        return loader, [s[1] for s in shares]

    def _epoch(self) -> dict:
        from tqdm.auto import tqdm

        cfg, dev = self.config, self.device
        self.model.train()
        groups = self.optimizer.param_groups
        projected = [i for i, g in enumerate(groups) if g["lam"] > 0]
        sums = torch.zeros(3 + len(projected), device=dev)  # ce, kl, conflict, per group
        n = 0
        loader, weights = self._loader()
        params = [p for g in groups for p in g["params"] if p.requires_grad]
        bar = tqdm(loader, desc=f"{cfg.method} epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress or self.rank != 0, leave=False)
        for i, (images, labels) in enumerate(bar):
            out = train_step(self.model, self.optimizer, images.to(dev, non_blocking=True),
                             labels.to(dev, non_blocking=True), temperature=cfg.temperature,
                             scaler=self.scaler, autocast_dtype=self.autocast,
                             grad_mode=cfg.grad_mode, step=self.world == 1,
                             loss_weight=weights[i], inputs_are_features=cfg.inputs == "features")
            if self.world > 1:  # general grads were averaged in train_step; now the domain's
                parallel.all_reduce_grads(params)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
            w = weights[i]  # this process's share of the global batch's mean loss
            sums += torch.stack([out.ce * w, out.kl * w, *self._conflicts(projected)])
            n += 1
            if cfg.progress and (i + 1) % cfg.log_every == 0:  # the only in-epoch sync
                ce, kl, cf = (sums[:3] / n).tolist()
                bar.set_postfix(ce=f"{ce:.3f}", kl=f"{kl:.3f}", conflict=f"{cf:.2f}")
        parallel.all_reduce_sum(sums)  # the global batches' mean losses, as one process logs them
        ce, kl, cf, *per_group = (sums / (max(n, 1) * self.world)).tolist()
        row = {"ce": ce, "kl": kl, "conflict_rate": cf if self.method.prograd else None,
               "images": sum(len(b) for b, w in zip(loader.batch_sampler, weights) if w > 0),
               "processes": self.world}  # images: this process's share of the epoch
        if self.method.prograd and len(projected) > 1:  # each projected group's own rate
            row["conflict_rate_by_group"] = {
                str(groups[g].get("name", g)): rate for g, rate in zip(projected, per_group)}
        return row

    def _conflicts(self, projected: list[int]) -> list[torch.Tensor]:
        """This step's conflict rate over the projected groups (the mean of theirs), then
        each one's (the share of its tensors in conflict; 0 for a group that did not step)."""
        stats = self.optimizer.stats()
        zero = torch.zeros((), device=self.device)
        rates = [stats[g]["conflict"].float().mean().to(self.device) if stats[g] is not None
                 else zero for g in projected]
        return [torch.stack(rates).mean() if rates else zero, *rates]

    def fit(self, resume: bool = True, stop_after: int | None = None) -> list[dict]:
        """Train for ``config.epochs`` (resuming from a checkpoint); returns the history.
        ``stop_after``: return after that many epochs in this call (time-sliced jobs)."""
        cfg = self.config
        done = 0
        if resume:
            self.maybe_resume()
        if not self.method.trains or cfg.epochs == 0:
            if not self.history:
                self.history.append({"epoch": 0, "lr": 0.0, "ce": None, "kl": None,
                                     "conflict_rate": None,
                                     "acc": self.evaluate(zeroshot=not self.method.trains)})
                self._write()
            return self.history
        while self.epoch < cfg.epochs and (stop_after is None or done < stop_after):
            done += 1
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            row = {"epoch": self.epoch + 1, "lr": lr, **self._epoch()}
            self.scheduler.step()
            self.epoch += 1
            last = self.epoch == cfg.epochs
            due = cfg.eval_every > 0 and self.epoch % cfg.eval_every == 0
            if self.val_loader is not None:
                row["val_acc"] = self.evaluate(val=True) if (last or due) else None
                row["acc"] = self.evaluate() if last else None
            else:
                row["acc"] = self.evaluate() if (last or due) else None
            # the time is printed, not logged: a resumed run's log equals an uninterrupted one's
            if self.log is not None and self.rank == 0:
                self.log(epoch_line(row, cfg.epochs, time.perf_counter() - start))
            self.history.append(row)
            self.save()
            self._write()
        return self.history

    def _write(self) -> None:
        if not self.out or self.rank != 0:
            return
        atomic_write_json(self.out / "log.json", {"config": asdict(self.config),
                                                   "history": self.history})
        keys = ["epoch", "lr", "ce", "kl", "conflict_rate", "acc", "val_acc"]

        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                for row in self.history:
                    w.writerow({k: row.get(k) for k in keys})

        atomic_write(self.out / "log.csv", write_csv)
        if self.config.plot and importlib.util.find_spec("matplotlib") is not None:
            atomic_write(self.out / "curves.png",
                         lambda tmp: plot_history(self.history, Path(tmp), title=self.config.method))


def epoch_line(row: dict, epochs: int, seconds: float | None = None) -> str:
    """The terminal's one line for an epoch: losses, conflict rate, lr, time, accuracy."""
    parts = [f"epoch {row['epoch']}/{epochs}: CE loss {row['ce']:.4f}", f"KL {row['kl']:.4f}"]
    if row.get("conflict_rate") is not None:
        parts.append(f"conflicts {100 * row['conflict_rate']:.1f}%")
    parts.append(f"lr {row['lr']:.3g}")
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    if row.get("val_acc") is not None:
        parts.append(f"val acc {row['val_acc']:.2f}%")
    if row.get("acc") is not None:
        parts.append(f"test acc {row['acc']:.2f}%")
    return ", ".join(parts)


def plot_history(history: list[dict], path: Path, title: str = "") -> bool:
    """Accuracy, losses and conflict rate per epoch as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ep = [r["epoch"] for r in history]

    def series(key):
        pts = [(e, r[key]) for e, r in zip(ep, history) if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, keys, name in ((axes[0], ["acc", "val_acc"], "accuracy (%)"), (axes[1], ["ce", "kl"], "loss"),
                           (axes[2], ["conflict_rate"], "conflict rate")):
        for k in keys:
            x, y = series(k)
            ax.plot(x, y, marker="o", ms=3, label=k)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        if name == "accuracy (%)":
            ax.set_ylim(0, 100)  # the whole scale: a zoomed axis makes small gaps look large
        if len(keys) > 1:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return True
