"""Turn pytest-benchmark JSON into the tables of BENCHMARKS.md and a log-log PNG plot.

Usage (from the repository root)::

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--output BENCHMARKS.md]
                                [--plot-dir benchmarks/results] [--label LABEL]

Files are grouped by label (``cpu`` / ``cuda`` from the machine info, or ``--label``); each
label owns one marked section of the output file, replaced on every run and appended when
new, so CPU and GPU results live side by side and other prose is left alone.  Optimizer-step
benchmarks (``extra_info["kind"] == "optimizer_step"``) give the scenario x implementation
tables and the plot; any other benchmark (the end-to-end suite) gets its own table, with its
speed-up over the ``paper_style`` entry of its group when there is one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Result", "load", "main", "plot", "render_section", "replace_section", "strip_data"]

PAPER, FLOOR_IMPL = "paper_style", "torch_sgd"
PLAIN = "coop_fast"  # the end-to-end suite's plain-CoOp (lam = 0) entry
PEER_ORDER = ("paper_style", "foreach", "compile", "torch_sgd")
BEGIN, END = "<!-- prograd-bench:{}:begin -->", "<!-- prograd-bench:{}:end -->"


@dataclass
class Result:
    """One benchmark from a pytest-benchmark JSON file (times in seconds)."""

    name: str
    group: str
    implementation: str
    time: float  # the chosen statistic (median by default), seconds
    iqr: float
    rounds: int
    extra: dict = field(default_factory=dict)

    @property
    def is_step(self) -> bool:
        return self.extra.get("kind") == "optimizer_step"

    @property
    def scenario(self) -> str:
        return str(self.extra.get("scenario") or self.group)


@dataclass
class Run:
    """All benchmarks of one label with the machine facts of the (first) file."""

    label: str
    machine: dict
    facts: dict
    commit: dict
    date: str
    files: list[str]
    results: list[Result]
    stat: str = "median"


def _implementation(bench: dict) -> str:
    extra = bench.get("extra_info") or {}
    if extra.get("implementation"):
        return str(extra["implementation"])
    param = bench.get("param")
    return str(param) if param else bench["name"]


STATS = ("median", "min", "mean")


def load(path: str | os.PathLike, stat: str = "median") -> tuple[dict, list[Result]]:
    """Parse one pytest-benchmark JSON file: ``(header, results)``; ``stat`` picks the time
    (``median``; ``min`` is steadier on a busy shared machine, where noise only adds)."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if "benchmarks" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
    results = []
    for bench in data["benchmarks"]:
        stats = bench.get("stats") or {}
        if stat not in stats:
            continue  # --benchmark-disable runs leave no timings
        results.append(Result(
            name=bench["name"], group=bench.get("group") or "", time=float(stats[stat]),
            implementation=_implementation(bench), iqr=float(stats.get("iqr", 0.0)),
            rounds=int(stats.get("rounds", 0)), extra=dict(bench.get("extra_info") or {})))
    header = {k: data.get(k) for k in ("machine_info", "commit_info", "datetime", "version")}
    return header, results


def _label(header: dict) -> str:
    facts = (header.get("machine_info") or {}).get("prograd_bench") or {}
    device = str(facts.get("bench_device", "cpu"))
    return "cuda" if device.startswith("cuda") else "cpu"


def gather(paths: list[str], label: str | None = None, stat: str = "median") -> list[Run]:
    """Load ``paths`` and merge them into one :class:`Run` per label."""
    runs: dict[str, Run] = {}
    for path in paths:
        header, results = load(path, stat)
        key = label or _label(header)
        machine = header.get("machine_info") or {}
        if key not in runs:
            runs[key] = Run(key, machine, machine.get("prograd_bench") or {},
                            header.get("commit_info") or {}, str(header.get("datetime") or ""),
                            [], [], stat)
        runs[key].files.append(str(path))
        runs[key].results.extend(results)
    return list(runs.values())


# ------------------------------------------------------------------ formatting
def fmt_time(seconds: float | None) -> str:
    """Three significant digits in us below 1 ms, ms below 1 s, else s."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.0f}x" if value >= 100 else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def fmt_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _impl_order(names) -> list[str]:
    names = set(names)
    ordered = [n for n in PEER_ORDER if n in names]
    return ordered + sorted(names - set(ordered))


def _scenario_order(results: list[Result]) -> list[str]:
    sizes: dict[str, int] = {}
    for r in results:
        sizes.setdefault(r.scenario, int(r.extra.get("elements", 0)))
    return sorted(sizes, key=lambda s: (sizes[s], s))


def _pivot(steps, by, impls, scen, title: str, metric) -> list[str]:
    """One compact scenario x implementation table of ``metric`` (seconds or None)."""
    lines = [f"#### Optimizer step: {title}", "",
             "| scenario | elements | tensors | 32 B/elem floor | " + " | ".join(impls)
             + " | best prograd_fast: speed-up vs paper_style"
             + " | best prograd_fast: cost vs torch_sgd |",
             "|---|---:|---:|---:|" + "---:|" * (len(impls) + 2)]
    for s in scen:
        ex = next(r for r in steps if r.scenario == s).extra
        floor = ex.get("floor_us")
        value = {i: metric(by[(s, i)]) for i in impls if (s, i) in by}
        cells = [fmt_time(value.get(i)) for i in impls]
        ours = [i for i in impls if i.startswith("prograd_fast") and value.get(i)]
        best = min(ours, key=value.__getitem__) if ours else None
        paper, sgd = value.get(PAPER), value.get(FLOOR_IMPL)
        cells.append(f"{fmt_ratio(paper / value[best])} ({best})" if best and paper else "-")
        cells.append(fmt_ratio(value[best] / sgd) if best and sgd else "-")
        lines.append(f"| {s} | {fmt_count(ex.get('elements', 0))} | {ex.get('tensors', '-')} | "
                     f"{fmt_time(floor / 1e6) if floor else '-'} | " + " | ".join(cells) + " |")
    return lines


def step_tables(results: list[Result], expected: list[str] | None = None, stat: str = "median",
                copy_gbs: float | None = None) -> str:
    """Markdown: compact scenario x implementation tables of times, then the details."""
    steps = [r for r in results if r.is_step]
    if not steps:
        return ""
    by = {(r.scenario, r.implementation): r for r in steps}
    impls = _impl_order(r.implementation for r in steps)
    scen = _scenario_order(steps)
    lines = _pivot(steps, by, impls, scen, f"{stat} wall time per step", lambda r: r.time)
    if any("device_us" in r.extra for r in steps):
        lines += [""] + _pivot(
            steps, by, impls, scen,
            "time per step in a loop without synchronisation (CUDA events)",
            lambda r: r.extra["device_us"] / 1e6 if "device_us" in r.extra else None)
    missing = sorted(set(expected or []) - set(impls))
    if missing:
        lines += ["", "Not run on this machine (skipped, `pytest -rs` says why): "
                  + ", ".join(f"`{m}`" for m in missing) + "."]
    cuda = any("device_us" in r.extra for r in steps)
    lines += ["", "#### Optimizer step: details", "",
              f"Times are the {stat} over rounds. Speed-up = paper_style time / this time; "
              "cost vs torch_sgd = this time / torch_sgd time (torch's own SGD without ProGrad, "
              "the floor a user already pays). GB/s = the fused design's bytes per step / time.",
              "",
              f"| scenario | implementation | {stat} | IQR | speed-up vs paper_style | "
              "cost vs torch_sgd | GB/s | % of copy bw |" + (" loop device time |" if cuda else "")
              + " notes |",
              "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---|"]
    for s in scen:
        paper, floor = by.get((s, PAPER)), by.get((s, FLOOR_IMPL))
        for i in impls:
            r = by.get((s, i))
            if r is None:
                continue
            ex = r.extra
            gbs = ex["bytes_per_step"] / r.time / 1e9 if ex.get("bytes_per_step") else None
            bw = copy_gbs or ex.get("copy_gbs")
            frac = gbs / bw if gbs is not None and bw else None
            notes = []
            if "compile_s" in ex:
                notes.append(f"compile {ex['compile_s']:.1f} s (apart)")
            if ex.get("sgd"):
                notes.append(f"SGD {ex['sgd']}")
            if ex.get("note"):
                notes.append(str(ex["note"]))
            speedup = paper.time / r.time if paper else None
            cost = r.time / floor.time if floor else None
            row = (f"| {s} | {i} | {fmt_time(r.time)} | {fmt_time(r.iqr)} | "
                   f"{fmt_ratio(speedup)} | {fmt_ratio(cost)} | "
                   f"{'-' if gbs is None else f'{gbs:.3g}'} | "
                   f"{'-' if frac is None else f'{100 * frac:.1f}%'} |")
            if cuda:
                dev = ex.get("device_us")
                row += f" {fmt_time(dev / 1e6) if dev is not None else '-'} |"
            lines.append(row + f" {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


_SKIP_EXTRA = {"kind", "implementation", "scenario"}


def other_table(results: list[Result], stat: str = "median") -> str:
    """Markdown for every benchmark that is not an optimizer step (e.g. end to end)."""
    others = [r for r in results if not r.is_step]
    if not others:
        return ""
    lines = ["#### Other benchmarks (end to end)", "",
             f"Speed-up = the group's paper_style time / this time; cost vs {PLAIN} = this time / "
             f"the group's {PLAIN} time (plain CoOp through the same code, when present).", "",
             f"| group | implementation | {stat} | IQR | speed-up vs paper_style | "
             f"cost vs {PLAIN} | details |",
             "|---|---|---:|---:|---:|---:|---|"]
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in others:
        groups[r.group or r.scenario].append(r)
    for g in sorted(groups):
        members = groups[g]
        paper = next((r for r in members if PAPER in r.implementation), None)
        plain = next((r for r in members if r.implementation == PLAIN), None)
        for r in sorted(members, key=lambda r: r.time, reverse=True):
            details = ", ".join(f"{k}={_short(v)}" for k, v in r.extra.items()
                                if k not in _SKIP_EXTRA)
            lines.append(f"| {g} | {r.implementation} | {fmt_time(r.time)} | "
                         f"{fmt_time(r.iqr)} | "
                         f"{fmt_ratio(paper.time / r.time if paper else None)} | "
                         f"{fmt_ratio(r.time / plain.time if plain else None)} | {details} |")
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def header_lines(run: Run, report_cmd: str) -> list[str]:
    facts, machine, commit = run.facts, run.machine, run.commit
    device = facts.get("device_name") or machine.get("cpu", {}).get("brand_raw") or "?"
    lines = [f"### {run.label}: {device}", ""]
    info = [f"date {run.date or '?'}",
            f"torch {facts.get('torch', '?')}", f"triton {facts.get('triton') or 'n/a'}",
            f"python {facts.get('python') or machine.get('python_version', '?')}"]
    if facts.get("cuda"):
        info.append(f"CUDA {facts['cuda']}")
    if facts.get("cpu_count"):
        info.append(f"{facts['cpu_count']} CPUs, {facts.get('torch_threads', '?')} torch threads")
    lines.append("- " + ", ".join(info))
    setup = [f"scale `{facts.get('scale', '?')}`", f"dtype {facts.get('dtype', '?')}",
             f"granularity `{facts.get('granularity', '?')}`"]
    if facts.get("copy_gbs"):
        setup.append(f"measured copy bandwidth {facts['copy_gbs']:.1f} GB/s (read + write)")
    lines.append("- " + ", ".join(setup))
    if commit.get("id"):
        dirty = " (dirty tree)" if commit.get("dirty") else ""
        lines.append(f"- commit {commit['id'][:12]}{dirty}")
    if facts.get("command"):
        lines.append(f"- benchmark command: `{facts['command']}`")
    lines.append(f"- report command: `{report_cmd}`")
    return lines


def render_section(run: Run, plot_rel: str | None, report_cmd: str,
                   expected: list[str] | None = None) -> str:
    """The markdown of one label's section (without the markers)."""
    parts = ["\n".join(header_lines(run, report_cmd)) + "\n"]
    for table in (step_tables(run.results, expected, run.stat, run.facts.get("copy_gbs")),
                  other_table(run.results, run.stat)):
        if table:
            parts.append(table)
    if plot_rel:
        parts.append(f"![time per step vs elements, {run.label}]({plot_rel})\n")
    return "\n".join(parts)


def replace_section(text: str, label: str, body: str) -> str:
    """Put ``body`` between ``label``'s markers in ``text`` (appended when absent)."""
    begin, end = BEGIN.format(label), END.format(label)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    return text.rstrip("\n") + "\n\n" + block + "\n"


def plot(run: Run, path: Path) -> bool:
    """Log-log time per step vs elements, one line per implementation, the byte floor drawn.
    Returns False (and writes nothing) when there is nothing to plot."""
    steps = [r for r in run.results if r.is_step and r.extra.get("elements")]
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for impl in _impl_order(r.implementation for r in steps):
        pts = sorted((r.extra["elements"], r.time * 1e6) for r in steps if r.implementation == impl)
        style = "--" if impl in PEER_ORDER else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=impl)
    copy_gbs = run.facts.get("copy_gbs") or steps[0].extra.get("copy_gbs")
    if copy_gbs:
        xs = sorted({r.extra["elements"] for r in steps})
        per_elem = {r.extra["elements"]: r.extra.get("bytes_per_step", 32 * r.extra["elements"])
                    / r.extra["elements"] for r in steps}
        ax.plot(xs, [x * per_elem[x] / (copy_gbs * 1e9) * 1e6 for x in xs], "k:", linewidth=2,
                label=f"byte floor ({per_elem[xs[0]]:.0f} B/elem at {copy_gbs:.0f} GB/s)")
    ax.set_xscale("log")
    names = _scenario_order(steps)
    top = ax.secondary_xaxis("top")
    top.set_xticks([next(r.extra["elements"] for r in steps if r.scenario == n) for n in names],
                   names, fontsize=7, rotation=30)
    top.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("elements in the parameter group")
    ax.set_ylabel(f"{run.stat} wall time per optimizer step (us)")
    ax.set_title(f"ProGrad-SGD step, {run.label}: {run.facts.get('device_name', '')}"[:90],
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def strip_data(path: str | os.PathLike) -> None:
    """Drop the raw per-round timings (``stats.data``) from a pytest-benchmark JSON file."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    for bench in data.get("benchmarks", []):
        (bench.get("stats") or {}).pop("data", None)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")


def _expected_impls() -> list[str] | None:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import peers  # noqa: PLC0415 - optional: lists the implementations that were skipped

        return peers.implementation_names()
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--output", default="BENCHMARKS.md", help="markdown file to update")
    parser.add_argument("--plot-dir", default="benchmarks/results", help="where PNGs go")
    parser.add_argument("--label", default=None, help="section label (default: cpu or cuda)")
    parser.add_argument("--no-plot", action="store_true", help="tables only")
    parser.add_argument("--strip-data", action="store_true",
                        help="rewrite the JSON files without the raw per-round timings "
                             "(stats kept): small enough to commit")
    parser.add_argument("--stat", default="median", choices=STATS,
                        help="which pytest-benchmark statistic the tables use (default median)")
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    report_cmd = "python -m benchmarks.report " + " ".join(given)
    output = Path(args.output)
    text = output.read_text(encoding="utf-8") if output.exists() else "# Benchmarks\n"
    expected = _expected_impls()
    if args.strip_data:
        for path in args.json:
            strip_data(path)
    for run in gather(args.json, args.label, args.stat):
        plot_rel = None
        if not args.no_plot:
            png = Path(args.plot_dir) / f"optimizer_step_{run.label}.png"
            if plot(run, png):
                plot_rel = Path(os.path.relpath(png.resolve(), output.resolve().parent)).as_posix()
                print(f"wrote {png}")
        text = replace_section(text, run.label, render_section(run, plot_rel, report_cmd, expected))
        print(f"updated section '{run.label}' of {output} ({len(run.results)} benchmarks)")
    output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
