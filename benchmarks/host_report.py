"""BENCHMARKS.md's host-path section from ``benchmarks/test_bench_host.py``'s JSON.

    python benchmarks/host_report.py benchmarks/results/host.json [--write BENCHMARKS.md]
                                     [--strip-data]

One row per benchmark (median, IQR, the target where there is one); the host-path rows with
the C helper also give the paired ratio of the Python fallback to them, and the cpp
whole-step row the paired ratio against torch's fused SGD, each measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import replace_section, strip_data  # noqa: E402

LABEL = "host-path"


def render(data: dict, command: str) -> str:
    info = data.get("machine_info", {})
    facts = info.get("prograd_bench", {})
    when = data.get("datetime", "?")
    rows = ["### Host path per step (CPU)", "",
            f"- date {when}, {facts.get('device_name', '?')}, {facts.get('cpu_count', '?')} CPUs, "
            f"{facts.get('torch_threads', '?')} torch thread(s), torch {facts.get('torch', '?')}, "
            f"triton {facts.get('triton', '?')}, python {facts.get('python', '?')}; timer "
            f"`{data['benchmarks'][0]['options'].get('timer', '?') if data['benchmarks'] else '?'}`",
            f"- command: `{command}`", "",
            "| benchmark | median | IQR | target | verdict | notes |",
            "|---|---:|---:|---:|---|---|"]
    by_name = {}
    for b in data["benchmarks"]:
        stats, extra = b["stats"], b.get("extra_info", {})
        median, iqr = stats["median"] * 1e6, stats["iqr"] * 1e6
        by_name[b["name"]] = median
        target = extra.get("target_us")
        verdict = "" if target is None else ("PASS" if median <= target else "FAIL")
        notes = []
        if "paired_python_over_c" in extra:
            notes.append(f"paired Python path / C helper = {extra['paired_python_over_c']:.1f}x")
        if extra.get("host") == "python":
            notes.append("Python path (no helper: no compiler or opted out): no target")
        if "paired_over_torch_fused" in extra:
            ratio = extra["paired_over_torch_fused"]
            notes.append(f"paired cpp / torch fused SGD = {ratio:.2f}x")
            verdict = "PASS" if ratio <= 1.0 else "FAIL"
        if "paired_alternating_over_stable" in extra:
            ratio, limit = extra["paired_alternating_over_stable"], extra.get("target_ratio")
            notes.append(f"paired alternating / stable addresses = {ratio:.2f}x"
                         + ("" if limit is None else f" (target <= {limit:g}x)"))
            if limit is not None:
                verdict = "PASS" if ratio <= limit else "FAIL"
        if extra.get("tensors"):
            notes.append(f"{extra['tensors']} tensor(s), {extra.get('device', 'cpu')}")
        rows.append(f"| {b['name']} | {median:.1f} us | {iqr:.1f} us | "
                    f"{'' if target is None else f'{target:g} us'} | {verdict} | "
                    f"{'; '.join(notes)} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--write", default=None, help="markdown file whose host-path section to set")
    ap.add_argument("--strip-data", action="store_true",
                    help="drop the raw per-round timings from the JSON (to commit it)")
    ap.add_argument("--command", default="PROGRAD_BENCH_THREADS=1 pytest benchmarks/test_bench_host.py "
                    "--benchmark-only --benchmark-timer time.process_time "
                    "--benchmark-json=benchmarks/results/host.json")
    args = ap.parse_args(argv)
    body = render(json.loads(Path(args.json).read_text()), args.command)
    print(body)
    if args.write:
        path = Path(args.write)
        path.write_text(replace_section(path.read_text(), LABEL, body))
    if args.strip_data:
        strip_data(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
