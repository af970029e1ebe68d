"""The README's main job: base-to-new few-shot prompt tuning on the embedded digits default.

Zero-shot vs CoOp vs ProGrad: prompts are tuned with K shots per class on the base
classes (zero..four) of the shifted downstream digits and evaluated on held-out base and
new classes (five..nine, with the learned context and the new class names), over shots
and seeds.  Prints a table (mean over seeds, harmonic mean of base and new) and saves a
PNG plot and a JSON of every run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import TensorDataset

from . import digits as D
from .model import PromptedCLIP
from .trainer import TrainConfig, Trainer, evaluate, transfer_context

__all__ = ["run_base_to_new", "DEMO_DEFAULTS"]

BASE, NEW = D.DIGIT_NAMES[:5], D.DIGIT_NAMES[5:]
DEMO_DEFAULTS = dict(shots=(1, 4, 16), seeds=(1, 2, 3), epochs=100, lr=0.05, batch_size=32,
                     ctx_init="a handwritten", template="a handwritten {}.", shift="occlude")


def _subset(x, y, labels: Sequence[int]):
    keep = torch.isin(y, torch.tensor(list(labels)))
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(list(labels))] = torch.arange(len(labels))
    return x[keep], remap[y[keep]]


def _few_shot(x, y, shots: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in y.unique().tolist():
        pool = (y == c).nonzero().flatten()
        idx.append(pool[torch.randperm(len(pool), generator=g)[:shots]])
    idx = torch.cat(idx)
    return x[idx], y[idx]


def _hm(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def run_base_to_new(out_dir: str | Path = "prograd_demo", shots: Sequence[int] = (1, 4, 16),
                    seeds: Sequence[int] = (1, 2, 3), epochs: int = 100, lr: float = 0.05,
                    batch_size: int = 32, ctx_init: str = "a handwritten",
                    template: str = "a handwritten {}.", shift: str = "occlude",
                    lam: float = 1.0, log=print) -> dict:
    """Run the experiment; returns ``{"rows": [...], "table": str, "plot": path}``."""
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip, info = D.load_tiny_clip(log=log)
    log(f"tiny CLIP: zero-shot {100 * info['zeroshot_acc']:.1f}% on clean held-out digits; "
        f"downstream shift: {shift}")
    task = D.DigitsTask(shift)
    base_train = _subset(*task.train, range(5))
    base_test = TensorDataset(*_subset(*task.test, range(5)))
    new_test = TensorDataset(*_subset(*task.test, range(5, 10)))

    def loaders(ds):
        return torch.utils.data.DataLoader(ds, batch_size=256)

    kw = dict(templates=template, ctx_init=ctx_init)
    zs_model = PromptedCLIP(clip, BASE, **kw)
    zs_new = transfer_context(zs_model, NEW)
    zs = {"base": evaluate(zs_model, loaders(base_test), zeroshot=True),
          "new": evaluate(zs_new, loaders(new_test), zeroshot=True)}
    rows = [{"method": "zero-shot", "shots": 0, "seed": 0, **zs}]
    for k in shots:
        for seed in seeds:
            train = TensorDataset(*_few_shot(*base_train, k, seed))
            for method in ("coop", "prograd"):
                torch.manual_seed(seed)
                model = PromptedCLIP(clip, BASE, **kw)
                cfg = TrainConfig(method=method, epochs=epochs, batch_size=batch_size, lr=lr,
                                  lam=lam, seed=seed, progress=False, warmup_epochs=1,
                                  warmup_lr=lr / 100)
                Trainer(model, train, None, cfg).fit(resume=False)
                row = {"method": "CoOp" if method == "coop" else "ProGrad", "shots": k,
                       "seed": seed, "base": evaluate(model, loaders(base_test)),
                       "new": evaluate(transfer_context(model, NEW), loaders(new_test))}
                rows.append(row)
                log(f"  {row['method']:8s} {k} shots seed {seed}: base {row['base']:.1f}  "
                    f"new {row['new']:.1f}")
    table = _table(rows, shots)
    plot = _plot(rows, shots, out / "base_to_new.png")
    (out / "base_to_new.json").write_text(json.dumps(
        {"rows": rows, "pretrain": info, "settings": dict(shots=list(shots), seeds=list(seeds),
         epochs=epochs, lr=lr, ctx_init=ctx_init, template=template, shift=shift, lam=lam)},
        indent=1))
    log(table)
    from ..cli_help import PLOT_NEEDS

    log(f"{f'plot: {plot}' if plot else PLOT_NEEDS}   runs: {out / 'base_to_new.json'}   "
        f"({time.time() - start:.0f} s)")
    return {"rows": rows, "table": table, "plot": plot}


def _mean(rows, method, k, key):
    vals = [r[key] for r in rows if r["method"] == method and r["shots"] in (k, 0)]
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0


def _table(rows, shots) -> str:
    lines = ["", "Base-to-new on shifted digits (accuracy %, mean ± half-range over seeds; HM = harmonic mean)",
             f"{'method':10s} {'shots':>5s} {'base':>12s} {'new':>12s} {'HM':>6s}"]
    for method in ("zero-shot", "CoOp", "ProGrad"):
        for k in ([0] if method == "zero-shot" else shots):
            b, bs = _mean(rows, method, k, "base")
            n, ns = _mean(rows, method, k, "new")
            lines.append(f"{method:10s} {k:5d} {b:7.1f}±{bs:4.1f} {n:7.1f}±{ns:4.1f} {_hm(b, n):6.1f}")
    return "\n".join(lines)


def _plot(rows, shots, path: Path) -> str | None:
    """Base, new and harmonic mean over shots; error bars: the half-range over seeds (as the
    table's ±); accuracy axes from 0 to 100; the legend above the panels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = _figure(rows, shots)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def _figure(rows, shots):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9), sharey=False)
    for ax, key in zip(axes, ("base", "new", "hm")):
        for method, style in (("zero-shot", "k--"), ("CoOp", "o-"), ("ProGrad", "s-")):
            ks = list(shots)
            if key == "hm":
                ys = [_hm(_mean(rows, method, k, "base")[0], _mean(rows, method, k, "new")[0]) for k in ks]
                errs = [0.0] * len(ks)  # the H of the means has no spread over seeds
            else:
                ys, errs = zip(*[_mean(rows, method, k, key) for k in ks])
            ax.errorbar(ks, ys, yerr=errs if any(errs) else None, fmt=style, capsize=3,
                        label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(shots), [str(k) for k in shots])
        ax.set_xlabel("shots per class")
        ax.set_title({"base": "base classes", "new": "new classes", "hm": "harmonic mean"}[key])
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig
