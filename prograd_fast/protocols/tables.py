"""The papers' tables from a grid's results: Markdown, CSV, JSON and plots.

Cells are the mean over seeds and its (population) standard deviation, as CoOp's
``parse_test_res.py`` reports them.  Base-to-new: H is the harmonic mean of the mean base
and mean new accuracy; the Average row averages base and new over data sets and takes H
of those averages (CoCoOp's and ProGrad's tables).  Few-shot: one column per shot count
(zero-shot CLIP in column 0) and an Average row over data sets.  Cross-data-set and domain
generalisation: the source (ImageNet) and every target, and the average over targets.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..atomic import atomic_write, atomic_write_json, atomic_write_text
from ..datasets import get_spec
from ..methods import METHODS

__all__ = ["build_table", "write_outputs", "METHOD_TITLES"]

METHOD_TITLES = {name: m.title for name, m in METHODS.items()}  # the built-in methods


def _stats(values: Sequence[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / n), "n": n}


def _hm(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def _title(name: str) -> str:
    return get_spec(name).title


def per_seed_rows(protocol: str, results) -> list[dict]:
    """One row per (run, test set): the raw numbers behind the table."""
    rows = []
    for run, res in results:
        for test in run.tests:
            name, classes = test.split("/")
            rows.append({"protocol": protocol, "dataset": run.dataset, "classes": run.classes,
                         "method": run.method, "shots": run.shots, "seed": run.seed,
                         "test": name, "test_classes": classes, "acc": res["tests"][test]})
    return rows


def build_table(protocol: str, results) -> dict:
    """``{"columns": [...], "rows": [{"dataset", "method", "cells": {column: stats}}]}``."""
    acc = defaultdict(list)  # (dataset, method, shots, test) -> accuracies over seeds
    datasets, methods, shots = [], [], []
    for run, res in results:
        for test in run.tests:
            acc[(run.dataset, run.method, run.shots, test)].append(res["tests"][test])
        for seq, v in ((datasets, run.dataset), (methods, run.method), (shots, run.shots)):
            if v not in seq:
                seq.append(v)
    rows = []
    if protocol == "fewshot":
        columns = [str(k) for k in sorted(shots)]
        for d in datasets:
            for m in methods:
                cells = {str(k): _stats(acc[(d, m, k, f"{d}/all")]) for k in sorted(shots)
                         if acc.get((d, m, k, f"{d}/all"))}
                rows.append({"dataset": _title(d), "method": m, "cells": cells})
        rows += _average_rows(rows, methods, columns)
    elif protocol == "base2new":
        columns = ["base", "new", "H"]
        for d in datasets:
            for m in methods:
                k = next(s for s in sorted(shots) if acc.get((d, m, s, f"{d}/base")))
                base, new = _stats(acc[(d, m, k, f"{d}/base")]), _stats(acc[(d, m, k, f"{d}/new")])
                rows.append({"dataset": _title(d), "method": m, "cells": {
                    "base": base, "new": new, "H": {"mean": _hm(base["mean"], new["mean"]),
                                                    "std": None, "n": base["n"]}}})
        for m in methods:
            mine = [r for r in rows if r["method"] == m]
            b = sum(r["cells"]["base"]["mean"] for r in mine) / len(mine)
            n = sum(r["cells"]["new"]["mean"] for r in mine) / len(mine)
            rows.append({"dataset": "Average", "method": m, "cells": {
                "base": {"mean": b, "std": None, "n": len(mine)},
                "new": {"mean": n, "std": None, "n": len(mine)},
                "H": {"mean": _hm(b, n), "std": None, "n": len(mine)}}})
    else:  # xd / dg: one row per method, columns source + targets + average of targets
        run0 = results[0][0]
        tests = [t.split("/")[0] for t in run0.tests]
        columns = [_title(t) for t in tests] + ["Average"]
        for m in methods:
            cells = {}
            for t in tests:
                vals = [v for (d, mm, _, test), vs in acc.items() if mm == m and test == f"{t}/all"
                        for v in vs]
                cells[_title(t)] = _stats(vals)
            targets = [cells[_title(t)]["mean"] for t in tests[1:]]
            cells["Average"] = {"mean": sum(targets) / len(targets) if targets else None,
                                "std": None, "n": len(targets)}
            rows.append({"dataset": _title(tests[0]), "method": m, "cells": cells})
    return {"protocol": protocol, "columns": columns, "rows": rows}


def _average_rows(rows, methods, columns) -> list[dict]:
    out = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cells = {}
        for c in columns:
            vals = [r["cells"][c]["mean"] for r in mine if c in r["cells"]]
            if vals and len(vals) == len(mine):
                cells[c] = {"mean": sum(vals) / len(vals), "std": None, "n": len(vals)}
        out.append({"dataset": "Average", "method": m, "cells": cells})
    return out


def _fmt(cell: dict | None) -> str:
    if not cell or cell["mean"] is None:
        return ""
    if cell.get("std") is None or cell["n"] < 2:
        return f"{cell['mean']:.2f}"
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def _headers(protocol: str, columns) -> tuple[list[str], list[str]]:
    if protocol == "fewshot":
        return ["Data set", "Method"], [f"{c} shot{'s' if c != '1' else ''}" if c != "0"
                                        else "zero-shot" for c in columns]
    if protocol == "base2new":
        return ["Data set", "Method"], ["Base", "New", "H"]
    return ["Source", "Method"], [f"{c} (source)" if i == 0 else c for i, c in enumerate(columns)]


def to_markdown(table: dict, caption: str = "") -> str:
    cols = table["columns"]
    keys, heads = _headers(table["protocol"], cols)
    lines = ([caption, ""] if caption else []) + [
        "| " + " | ".join(keys + heads) + " |", "|" + "---|" * (len(keys) + len(heads))]
    for r in table["rows"]:
        vals = [_fmt(r["cells"].get(c)) for c in cols]
        lines.append("| " + " | ".join([r["dataset"], METHOD_TITLES.get(r["method"], r["method"])]
                                        + vals) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = table["columns"]
    w.writerow(["dataset", "method"] + [f"{c}{s}" for c in cols for s in ("", "_std")])
    for r in table["rows"]:
        vals = []
        for c in cols:
            cell = r["cells"].get(c) or {}
            vals += [_num(cell.get("mean")), _num(cell.get("std"))]
        w.writerow([r["dataset"], r["method"]] + vals)
    return buf.getvalue()


def _num(x) -> str:
    return "" if x is None else f"{x:.4f}"


def plot(table: dict, path: Path) -> bool:
    """Few-shot curves per data set, or grouped bars (base / new / H; source / targets), with
    the standard deviation over seeds as error bars, accuracy axes from 0 to 100 and the
    legend above the panels; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = figure(table)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return True


def figure(table: dict):
    """The matplotlib figure of :func:`plot`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols, protocol = table["rows"], table["columns"], table["protocol"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    if protocol == "fewshot":
        n = len(datasets)
        ncol = min(n, 4)
        nrow = math.ceil(n / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.8 * nrow), squeeze=False)
        xs = {c: i for i, c in enumerate(["0"] + [c for c in cols if c != "0"])}
        for ax, d in zip(axes.flat, datasets):
            for m in methods:
                r = next(r for r in rows if r["dataset"] == d and r["method"] == m)
                pts = [(xs[c], r["cells"][c]) for c in cols if c in r["cells"]]
                if m == "zeroshot":
                    for _, cell in pts:
                        ax.errorbar([0], [cell["mean"]], yerr=[_err(cell)], fmt="*", ms=12,
                                    capsize=2, label=METHOD_TITLES[m])
                    continue
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                            yerr=[_err(p[1]) for p in pts], marker="o", ms=3, capsize=2,
                            label=METHOD_TITLES.get(m, m))
            ax.set_xticks(list(xs.values()), list(xs))
            ax.set_title(d)
            ax.set_xlabel("shots per class")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 100)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
    else:
        panels = cols if protocol == "base2new" else ["_all"]
        width_in = max(6, 0.9 * len(datasets) * len(panels))
        fig, axes = plt.subplots(1, len(panels), figsize=(width_in, 3.4), squeeze=False)
        groups = datasets if protocol == "base2new" else cols
        width = 0.8 / len(methods)
        for ax, panel in zip(axes.flat, panels):
            for j, m in enumerate(methods):
                vals, errs = [], []
                for g in groups:
                    if protocol == "base2new":
                        r = next(r for r in rows if r["dataset"] == g and r["method"] == m)
                        cell = r["cells"][panel]
                    else:
                        r = next(r for r in rows if r["method"] == m)
                        cell = r["cells"][g]
                    vals.append(cell["mean"] or 0.0)
                    errs.append(_err(cell))
                ax.bar([i + j * width for i in range(len(groups))], vals, width,
                       yerr=errs if any(errs) else None, capsize=2,
                       label=METHOD_TITLES.get(m, m))
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, rotation=45,
                          ha="right", fontsize=7)
            ax.set_title({"base": "Base", "new": "New", "H": "H"}.get(panel, protocol))
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 100)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the legend
    return fig


def _caption(protocol: str, meta: dict) -> str:
    """``**protocol** (key value, ...; differs from the official configs: ...)``."""
    parts = [f"{k} {v}" for k, v in meta.items() if not isinstance(v, dict)]
    text = f"**{protocol}** ({', '.join(parts)}"
    for k, v in meta.items():
        if isinstance(v, dict) and v:
            text += f"; {k}: " + "; ".join(f"{name} {what}" for name, what in v.items())
    return text + ")"


def _err(cell: dict | None) -> float:
    """The error bar of a cell: its standard deviation over seeds, 0 with one seed."""
    if not cell or cell.get("std") is None or cell.get("n", 1) < 2:
        return 0.0
    return cell["std"]


def write_outputs(protocol: str, results, out_dir: str | Path, meta: dict | None = None) -> dict:
    """``<protocol>.md``, ``.csv``, ``.json`` and ``.png`` in ``out_dir`` (each written
    atomically); returns the paths."""
    out = Path(out_dir)
    table = build_table(protocol, results)
    caption = _caption(protocol, meta or {})
    paths = {"md": out / f"{protocol}.md", "csv": out / f"{protocol}.csv",
             "json": out / f"{protocol}.json", "png": out / f"{protocol}.png"}
    atomic_write_text(paths["md"], to_markdown(table, caption))
    atomic_write_text(paths["csv"], to_csv(table))
    atomic_write_json(paths["json"], {**table, "meta": meta or {},
                                      "runs": per_seed_rows(protocol, results)})
    if importlib.util.find_spec("matplotlib") is None:
        paths.pop("png")
    else:
        atomic_write(paths["png"], lambda tmp: plot(table, Path(tmp)))
    return paths
