"""Verdicts on the GPU step-time targets, and BENCHMARKS.md's GPU-check section.

    python benchmarks/device_verdicts.py RESULTS.json [--write BENCHMARKS.md]
    python benchmarks/device_verdicts.py --no-device

``RESULTS.json`` is what ``benchmarks/gpu_kernels_bench.py`` writes to ``$OUT``.  One line per
target of issue 10 (H200, fp32, wall time per step in a loop), judged on the best fused
backend (``prograd_fast-triton`` or ``prograd_fast-cuda`` with its automatic plan; forced
plans are listed but not judged)::

    VERDICT PASS coop 16x512: 14.2 us <= 20 us (prograd_fast-triton; cuda 16.0 us)

``--write`` puts the table and the verdicts between the ``gpu-check`` markers of the file
(``benchmarks.report.replace_section``: other sections stay).  ``--no-device`` prints the
lines a machine without CUDA gives (``device_check.sh`` dry run, CI).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import replace_section  # noqa: E402

LABEL = "gpu-check"
# (scenario id of gpu_kernels_bench.py, kind, limit): "us" = wall us per step, "floor" =
# wall / (32 B per element at the measured copy bandwidth).
TARGETS = (
    ("coop 16x512", "us", 20.0),
    ("maple 27 / 3.6M", "us", 50.0),
    ("classctx 8.2M", "us", 65.0),
    ("dense 64M", "floor", 1.03),
    ("dense 256M", "floor", 1.03),
)
JUDGED = ("prograd_fast-triton", "prograd_fast-cuda")


def _judged(row: dict) -> bool:
    """The fused backends as a user gets them: the cuda backend with its automatic plan."""
    impl = row.get("impl", "")
    return "wall_us" in row and any(impl == j or impl.startswith(j + " plan=") for j in JUDGED)


def _describe(limit_kind: str, limit: float) -> str:
    return f"<= {limit:g} us" if limit_kind == "us" else f"<= {limit:g}x the 32 B/elem floor"


def verdict_lines(results: list[dict]) -> list[str]:
    """One ``VERDICT`` line per target."""
    lines = []
    for scenario, kind, limit in TARGETS:
        rows = [r for r in results if r.get("scenario") == scenario and _judged(r)]
        if not rows:
            why = "; ".join(f"{r['impl']}: {r.get('skipped') or r.get('error')}" for r in results
                            if r.get("scenario") == scenario and r.get("impl", "").startswith(JUDGED)
                            and ("skipped" in r or "error" in r))
            lines.append(f"VERDICT NOT RUN {scenario} {_describe(kind, limit)}: no fused backend "
                         f"timed{': ' + why if why else ''}")
            continue

        def value(r):
            return r["wall_us"] if kind == "us" else r["wall_us"] / r["floor_us"]

        best = min(rows, key=value)
        got = value(best)
        ok = got <= limit
        shown = f"{got:.1f} us" if kind == "us" else f"{got:.3f}x ({best['wall_us']:.0f} us, " \
            f"floor {best['floor_us']:.0f} us)"
        others = ", ".join(f"{r['impl'].removeprefix('prograd_fast-')} {r['wall_us']:.1f} us"
                           for r in rows if r is not best)
        lines.append(f"VERDICT {'PASS' if ok else 'FAIL'} {scenario}: {shown} "
                     f"{_describe(kind, limit)} ({best['impl']}{'; ' + others if others else ''})")
    return lines


def no_device_lines(reason: str = "no CUDA device") -> list[str]:
    return [f"VERDICT NOT RUN {scenario} {_describe(kind, limit)}: {reason}"
            for scenario, kind, limit in TARGETS]


def render(data: dict, lines: list[str], command: str) -> str:
    """The markdown of the section: facts, verdicts, every timed implementation."""
    out = [
        "### GPU check (benchmarks/device_check.sh)", "",
        f"- device {data.get('device_name', data.get('device'))}, torch {data.get('torch')}, "
        f"triton {data.get('triton', '?')}, date {data.get('date', '?')}",
        f"- measured copy bandwidth {data.get('bandwidth_Bps', 0) / 1e9:.0f} GB/s (read + write); "
        f"floor = 32 B per element at that rate; granularity `{data.get('granularity')}`, fp32",
        f"- command: `{command}`", "",
    ]
    out += [f"- {line}" for line in lines]
    out += ["", "| scenario | implementation | wall us/step | device us/step | floor us | "
            "wall/floor |", "|---|---|---:|---:|---:|---:|"]
    for r in data.get("results", []):
        if "wall_us" in r:
            dev = f"{r['device_us']:.1f}" if r.get("device_us") is not None else "-"
            out.append(f"| {r['scenario']} | {r['impl']} | {r['wall_us']:.1f} | {dev} | "
                       f"{r['floor_us']:.1f} | {r['wall_us'] / r['floor_us']:.2f} |")
        elif "scenario" in r and "impl" in r:
            why = str(r.get("skipped") or r.get("error") or "")[:90].replace("|", "/")
            out.append(f"| {r['scenario']} | {r['impl']} | n/a: {why} | | | |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="?", help="gpu_kernels_bench.py JSON")
    ap.add_argument("--write", default=None, help="markdown file whose gpu-check section to set")
    ap.add_argument("--no-device", action="store_true", help="print the no-CUDA verdicts")
    ap.add_argument("--command", default="bash benchmarks/device_check.sh")
    args = ap.parse_args(argv)
    if args.no_device or not args.json:
        print("\n".join(no_device_lines()))
        return 0
    data = json.loads(Path(args.json).read_text())
    lines = verdict_lines(data.get("results", []))
    print("\n".join(lines))
    if args.write:
        path = Path(args.write)
        path.write_text(replace_section(path.read_text(), LABEL, render(data, lines, args.command)))
        print(f"wrote the {LABEL} section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
