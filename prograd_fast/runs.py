"""What a ``prograd-fast train`` output folder holds, so a rerun never answers with another
run's result.

A run folder records, in ``settings.json``, every option that can change its result and the
identity of its data (each image's path under the data root, label, size and modification
time).  Used again, the folder is checked against the new command: the same settings resume
the run from its checkpoint (or reprint a finished run's result); other settings are refused
in one line naming what differs.  The default folder name
(``runs/<data>_<method>_<shots>shot_seed<seed>``) carries every option that differs from its
default (``..._seed1_lam0.5_lr0.05``), so a sweep over options gets one folder per point.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["RunFolderError", "NOT_SETTINGS", "run_settings", "default_run_name",
           "data_fingerprint", "folder_state", "check_writable", "read_result", "seal",
           "is_sealed", "clear_run"]

SETTINGS_FORMAT = 1

#: ``train`` options that do not change what a run computes (where and how fast it runs, how
#: it reports, what it evaluates before the last epoch's test).
NOT_SETTINGS = frozenset({"command", "device", "num_workers", "output_dir", "no_resume",
                          "no_progress", "backend", "grad_mode", "share_prefix", "eval_every",
                          "eval_split"})


class RunFolderError(ValueError):
    """An output folder that cannot take this run (one line: the folder and why)."""


def _plain(v) -> bool:
    """A value an option can take (not a handler an argument parser may carry)."""
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (str, int, float, bool))


def run_settings(args: Mapping, data_id: str, model_id: str | None = None) -> dict:
    """The record of a run: every option but :data:`NOT_SETTINGS`, the data's identity and the
    model's (a hash of its weights: a changed config or weights file is another run)."""
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(args.items())
               if k not in NOT_SETTINGS and _plain(v)}
    for key in ("data", "root", "image_root", "model", "pretrained"):  # a path means the same
        value = options.get(key)  # wherever it is run from
        if isinstance(value, str) and (key in ("data", "root", "image_root") and value != "digits"
                                       or os.path.isfile(os.path.expanduser(value))):
            options[key] = os.path.abspath(os.path.expanduser(value))
    return {"format": SETTINGS_FORMAT, "options": options, "data": data_id, "model": model_id}


def _value(v) -> str:
    if isinstance(v, bool):
        return ""
    text = str(v).replace(os.sep, "-").replace(" ", "-")
    return text if len(text) <= 24 else hashlib.sha256(text.encode()).hexdigest()[:8]


def default_run_name(base: str, args: Mapping, defaults: Mapping) -> str:
    """``base`` plus ``_<option><value>`` for every setting that differs from its default
    (``_lam0.5``, ``_class-specific``), in option order."""
    parts = [base]
    for key, value in args.items():
        if key in NOT_SETTINGS or key in ("data", "method", "shots", "seed", "dataset", "root",
                                          "image_root") \
                or key not in defaults or value == defaults[key] or not _plain(value):
            continue
        parts.append(key.replace("_", "-") + _value(value))
    return "_".join(parts)


def data_fingerprint(items: Iterable, root: str | None) -> str:
    """SHA-256 of the items' paths (relative to ``root``; None: absolute), labels, sizes and
    modification times; items whose path is not a file name (the embedded digits) count by
    their index and label."""
    h = hashlib.sha256()
    for it in items:
        path = it.path
        if isinstance(path, (str, os.PathLike)):
            try:
                st = os.stat(path)
                stat = f"{st.st_size}\0{st.st_mtime_ns}"
            except OSError:
                stat = "missing"
            rel = os.path.relpath(str(path), root) if root else os.path.abspath(str(path))
            h.update(f"{rel}\0{it.label}\0{stat}\n".encode())
        else:
            h.update(f"{path}\0{it.label}\n".encode())
    return h.hexdigest()[:16]


def _differences(old: Mapping, new: Mapping) -> list[str]:
    out = []
    old_opts, new_opts = old.get("options", {}), new["options"]
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            out.append(f"--{key.replace('_', '-')} {old_opts.get(key)!r} there, "
                       f"{new_opts.get(key)!r} now")
    if old.get("data") != new["data"]:
        out.append("the data (images, labels, sizes or modification times) changed")
    if old.get("model") != new.get("model"):
        out.append("the model's weights changed")
    return out


def _digest(record: Mapping) -> str:
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(record: Mapping) -> dict:
    """``record`` with a ``digest``: SHA-256 of the rest of its JSON content."""
    return {**{k: v for k, v in record.items() if k != "digest"}, "digest": _digest(record)}


def is_sealed(record) -> bool:
    """True when ``record`` is a dict whose ``digest`` matches its content (not edited since
    :func:`seal`)."""
    return isinstance(record, dict) and record.get("digest") == _digest(record)


def read_result(folder: Path) -> dict | None:
    """``result.json`` of a finished run when it is the sealed, well-formed record ``train``
    wrote, else None (missing, hand-edited or damaged)."""
    try:
        data = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if not is_sealed(data):
        return None
    acc = data.get("acc")
    if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not 0 <= acc <= 100:
        return None
    return data


def folder_state(folder: Path, settings: dict, no_resume: bool = False) -> str:
    """What to do with ``folder`` for a run of ``settings``: ``"new"`` (nothing of a run there),
    ``"start"`` (``--no-resume``: train again from scratch), ``"resume"`` (the same run, not
    finished), ``"done"`` (the same run, finished: its ``result.json`` answers).  Raises
    :class:`RunFolderError` when the folder holds another run."""
    record = folder / "settings.json"
    has_run = any((folder / f).exists() for f in ("checkpoint.pt", "result.json", "log.json"))
    if no_resume:
        return "start"
    if not record.exists():
        if has_run:
            raise RunFolderError(
                f"cannot resume from {folder}: it holds a run whose settings were not recorded "
                f"(no settings.json); --no-resume starts over, or choose another --output-dir")
        return "new"
    try:
        old = json.loads(record.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{record}: unreadable run record ({e}); --no-resume starts over, "
                             f"or choose another --output-dir") from None
    diff = _differences(old, settings)
    if diff:
        raise RunFolderError(f"{folder} holds a run with other settings ({'; '.join(diff)}); "
                             f"choose another --output-dir, or --no-resume to replace it")
    if read_result(folder) is not None:
        return "done"
    return "resume" if has_run else "new"


def clear_run(folder: Path) -> None:
    """Remove the run files of ``folder`` (``--no-resume``): a run killed before its first
    checkpoint must not leave the replaced run's checkpoint or result under new settings."""
    for name in ("result.json", "checkpoint.pt", "log.json", "log.csv", "curves.png"):
        (folder / name).unlink(missing_ok=True)


def check_writable(folder: Path, flag: str = "--output-dir") -> None:
    """Raise :class:`RunFolderError` unless ``folder`` exists as a writable folder or can be
    created (nothing is created here)."""
    folder = Path(os.path.abspath(folder))
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise RunFolderError(f"cannot write to {flag} {folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunFolderError(f"cannot write to {flag} {folder}: {probe} is not writable")
