"""Verdicts on the GPU step-time targets, and BENCHMARKS.md's GPU-check section.

    python benchmarks/device_verdicts.py RESULTS.jsonl [--write BENCHMARKS.md]
    python benchmarks/device_verdicts.py --no-device

``RESULTS.jsonl`` is what ``benchmarks/gpu_kernels_bench.py`` writes to ``$OUT`` row by row
(a run killed mid-way still gives verdicts on what it measured; the final ``.json`` works
too).  Every target is a ratio to something measured in the same run on the same card, so it
holds on any GPU; judged on the best fused backend (``prograd_fast-triton``, or
``prograd_fast-cuda`` with its automatic plan; forced plans are listed but not judged):

- CoOp (one 16x512 fp32 tensor): <= 0.6x torch's own fused SGD step (``torch_sgd``:
  ``torch.optim.SGD(fused=True)`` on the same gradients, no ProGrad);
- the 27-tensor / 3.6M group: <= 1.0x torch's fused SGD step;
- one group of 8M elements or more: <= 1.03x the floor, the bytes the plan must move at the
  copy bandwidth measured in the same run (32 B per element for two passes, 24 B for the
  single-pass plans: the CUDA backend's ``small`` and ``coop``).

Each line names the card and the measured bandwidth and gives the absolute times::

    VERDICT PASS coop 16x512: 0.52x torch fused SGD <= 0.6x (prograd_fast-cuda plan=small
    12.0 us, torch_sgd 23.0 us; triton 14.0 us) [NVIDIA H100 80GB HBM3, copy 3000 GB/s]

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
SGD = "torch_sgd"
# (scenario id of gpu_kernels_bench.py, kind, limit): "sgd" = wall time / torch_sgd's wall
# time in the same scenario; "floor" = wall time / the copy-bandwidth floor of the plan.
TARGETS = (
    ("coop 16x512", "sgd", 0.6),
    ("maple 27 / 3.6M", "sgd", 1.0),
    ("classctx 8.2M", "floor", 1.03),
    ("dense 64M", "floor", 1.03),
    ("dense 256M", "floor", 1.03),
)
JUDGED = ("prograd_fast-triton", "prograd_fast-cuda")
SINGLE_PASS_PLANS = ("small", "coop")  # read d and g once: 24 B/element (p, m, d, g; p, m out)


def _judged(row: dict) -> bool:
    """The fused backends as a user gets them: the cuda backend with its automatic plan."""
    impl = row.get("impl", "")
    return "wall_us" in row and any(impl == j or impl.startswith(j + " plan=") for j in JUDGED)


def bytes_per_element(impl: str) -> int:
    """Bytes an fp32 step must move per element: 24 single-pass, 32 with a reduce pass."""
    plan = impl.split("plan=", 1)[1] if "plan=" in impl else impl.partition("[")[2].rstrip("]")
    return 24 if plan in SINGLE_PASS_PLANS else 32


def floor_us(row: dict, bandwidth_Bps: float) -> float:
    """The time the row's plan needs just to move its bytes at the measured bandwidth."""
    return bytes_per_element(row["impl"]) * row["elements"] / bandwidth_Bps * 1e6


def _describe(kind: str, limit: float) -> str:
    return f"<= {limit:g}x torch fused SGD" if kind == "sgd" else f"<= {limit:g}x the copy floor"


def _card(device_name: str | None, bandwidth_Bps: float | None) -> str:
    bw = f"copy {bandwidth_Bps / 1e9:.0f} GB/s" if bandwidth_Bps else "copy bandwidth not measured"
    return f"[{device_name or 'unknown card'}, {bw}]"


def verdict_line(scenario: str, kind: str, limit: float, results: list[dict],
                 bandwidth_Bps: float | None, device_name: str | None) -> str:
    """The ``VERDICT`` line of one target from the rows measured so far."""
    card = _card(device_name, bandwidth_Bps)
    target = _describe(kind, limit)
    rows = [r for r in results if r.get("scenario") == scenario and _judged(r)]
    if not rows:
        why = "; ".join(f"{r['impl']}: {r.get('skipped') or r.get('error')}" for r in results
                        if r.get("scenario") == scenario and r.get("impl", "").startswith(JUDGED)
                        and ("skipped" in r or "error" in r))
        return (f"VERDICT NOT RUN {scenario} {target}: no fused backend timed"
                f"{': ' + why if why else ''} {card}")
    if kind == "sgd":
        sgd = next((r for r in results if r.get("scenario") == scenario
                    and r.get("impl") == SGD and "wall_us" in r), None)
        if sgd is None:
            return f"VERDICT NOT RUN {scenario} {target}: torch's fused SGD was not timed {card}"

        def ratio(r):
            return r["wall_us"] / sgd["wall_us"]

        best = min(rows, key=ratio)
        detail = f"{best['impl']} {best['wall_us']:.1f} us, {SGD} {sgd['wall_us']:.1f} us"
        unit = "x torch fused SGD"
    else:
        if not bandwidth_Bps:
            return f"VERDICT NOT RUN {scenario} {target}: no copy bandwidth measured {card}"

        def ratio(r):
            return r["wall_us"] / floor_us(r, bandwidth_Bps)

        best = min(rows, key=ratio)
        detail = (f"{best['impl']} {best['wall_us']:.0f} us, floor "
                  f"{floor_us(best, bandwidth_Bps):.0f} us = {bytes_per_element(best['impl'])}"
                  f" B/elem x {best['elements'] / 1e6:.1f}M")
        unit = "x the copy floor"
    others = ", ".join(f"{r['impl'].removeprefix('prograd_fast-')} {r['wall_us']:.1f} us"
                       for r in rows if r is not best)
    got = ratio(best)
    verdict = "PASS" if got <= limit else "FAIL"
    return (f"VERDICT {verdict} {scenario}: {got:.3f}{unit} <= {limit:g}x ({detail}"
            f"{'; ' + others if others else ''}) {card}")


def verdict_lines(results: list[dict], bandwidth_Bps: float | None = None,
                  device_name: str | None = None) -> list[str]:
    """One ``VERDICT`` line per target."""
    return [verdict_line(scenario, kind, limit, results, bandwidth_Bps, device_name)
            for scenario, kind, limit in TARGETS]


def no_device_lines(reason: str = "no CUDA device") -> list[str]:
    return [f"VERDICT NOT RUN {scenario} {_describe(kind, limit)}: {reason}"
            for scenario, kind, limit in TARGETS]


def load(path: str | Path) -> dict:
    """The bench's results: its final ``.json``, or its ``.jsonl`` written row by row (a
    ``{"meta": ...}`` line first; a last line cut short by a kill is ignored)."""
    text = Path(path).read_text()
    if not str(path).endswith(".jsonl"):
        return json.loads(text)
    data: dict = {"results": []}
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # the row being written when the step was killed
        if "meta" in item:
            data.update(item["meta"])
        else:
            data["results"].append(item)
    return data


def render(data: dict, lines: list[str], command: str) -> str:
    """The markdown of the section: facts, verdicts, every timed implementation."""
    bw = data.get("bandwidth_Bps") or 0.0
    out = [
        "### GPU check (benchmarks/device_check.sh)", "",
        f"- device {data.get('device_name', data.get('device'))}, torch {data.get('torch')}, "
        f"triton {data.get('triton', '?')}, date {data.get('date', '?')}",
        f"- measured copy bandwidth {bw / 1e9:.0f} GB/s (read + write); floor = 32 B per "
        f"element (24 B for a single-pass plan) at that rate; granularity "
        f"`{data.get('granularity')}`, fp32",
        f"- command: `{command}`", "",
    ]
    out += [f"- {line}" for line in lines]
    out += ["", "| scenario | implementation | wall us/step | device us/step | floor us | "
            "wall/floor |", "|---|---|---:|---:|---:|---:|"]
    for r in data.get("results", []):
        if "wall_us" in r:
            dev = f"{r['device_us']:.1f}" if r.get("device_us") is not None else "-"
            floor = floor_us(r, bw) if bw and "elements" in r else r.get("floor_us")
            cells = f"{floor:.1f} | {r['wall_us'] / floor:.2f}" if floor else "- | -"
            out.append(f"| {r['scenario']} | {r['impl']} | {r['wall_us']:.1f} | {dev} | {cells} |")
        elif "scenario" in r and "impl" in r:
            why = str(r.get("skipped") or r.get("error") or "")[:90].replace("|", "/")
            out.append(f"| {r['scenario']} | {r['impl']} | n/a: {why} | | | |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="?", help="gpu_kernels_bench.py results (.jsonl or .json)")
    ap.add_argument("--write", default=None, help="markdown file whose gpu-check section to set")
    ap.add_argument("--no-device", action="store_true", help="print the no-CUDA verdicts")
    ap.add_argument("--command", default="bash benchmarks/device_check.sh")
    args = ap.parse_args(argv)
    if args.no_device or not args.json:
        print("\n".join(no_device_lines()))
        return 0
    data = load(args.json)
    lines = verdict_lines(data.get("results", []), data.get("bandwidth_Bps"),
                          data.get("device_name"))
    print("\n".join(lines), flush=True)
    if args.write:
        path = Path(args.write)
        path.write_text(replace_section(path.read_text(), LABEL, render(data, lines, args.command)))
        print(f"wrote the {LABEL} section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
