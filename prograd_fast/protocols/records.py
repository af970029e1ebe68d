"""The grid's run records: a ``result.json`` is trusted only when it is the one the grid wrote
for this very run, and a rerun says why a run is trained or tested again.

``result.json`` carries a SHA-256 ``digest`` of the rest of its content.  A file that is not
valid JSON, lacks the digest, fails it (a hand edit), was made for other settings, or holds
an accuracy that is not a number in [0, 100] is not used: the run's prompt is tested again
(it is trained again only when its checkpoint is missing too).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..runs import is_sealed, seal

__all__ = ["seal", "check_result", "why_redone", "move_aside"]


def _is_accuracy(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and 0.0 <= v <= 100.0


def check_result(data, settings: dict) -> str | None:
    """Why ``data`` (a parsed ``result.json``) cannot stand for the run of ``settings``; None
    when it can."""
    if not isinstance(data, dict):
        return "is not a JSON object"
    if not is_sealed(data):
        return "was changed after the grid wrote it (its digest does not match)" \
            if "digest" in data else "has no digest (written by hand or an older version)"
    if data.get("settings") != json.loads(json.dumps(settings)):  # as JSON stores it
        return "was made for other settings"
    tests, made_on = data.get("tests"), data.get("test_sets")
    if not isinstance(tests, dict) or not isinstance(made_on, dict):
        return 'lacks its "tests" or "test_sets"'
    bad = [t for t, v in tests.items() if not _is_accuracy(v)]
    if bad:
        return f"holds {tests[bad[0]]!r} for {bad[0]} (an accuracy is a number in [0, 100])"
    return None


_NAMES = {"train_items": "training images", "model_sha256": "model weights",
          "format": "record format (an earlier version's run)"}


def why_redone(run_dir: Path, settings: dict) -> str | None:
    """What differs from the most recent earlier run of the same data set, classes, method,
    shots and seed (a sibling folder of ``run_dir``), in words; None when there is none."""
    stem = run_dir.name.split("-ep")[0] if "-ep" in run_dir.name else "zeroshot"
    siblings = [d for d in run_dir.parent.glob(f"{stem}-*") if d != run_dir and d.is_dir()]
    best, best_time = None, -1.0
    for d in siblings:
        for name in ("result.json", "settings.json"):
            try:
                data = json.loads((d / name).read_text())
            except (OSError, ValueError):
                continue
            old = data.get("settings", data) if name == "result.json" else data
            if isinstance(old, dict) and (d / name).stat().st_mtime > best_time:
                best, best_time = (d, old), (d / name).stat().st_mtime
            break
    if best is None:
        return None
    d, old = best
    keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if not keys:
        return None
    what = ", ".join(_NAMES.get(k, k) for k in keys)
    return f"{what} changed since {d.name}"


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.bad-<time>`` beside it (kept for a look, never read again)."""
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    path.rename(aside)
    return aside
