"""Check a run's images before any work: a missing, corrupt or truncated file is one line
naming it, not a loader traceback in the middle of training (or after the first epoch).

JPEG files are decoded at reduced scale (``Image.draft``: the whole stream is read, so a
truncated file fails, at a fraction of a full decode's cost); other formats are checked by
``Image.verify`` (PNG: every chunk's CRC up to the end marker).  A file that passed is not
checked again in this process while its size and modification time stay the same.
"""

from __future__ import annotations

import os
from typing import Iterable

from .registry import DatasetError

__all__ = ["check_image", "check_images"]

_CHECKED: set[tuple[str, int, int]] = set()


def check_image(path: str) -> None:
    """Raise :class:`DatasetError` (``"<path>: <what is wrong>"``) unless ``path`` is a
    readable, complete image."""
    from PIL import Image

    try:
        st = os.stat(path)
    except OSError:
        raise DatasetError(f"{path}: image listed by the split is missing") from None
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _CHECKED:
        return
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
            else:
                im.verify()
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, ...)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DatasetError(f"{path}: not a readable image ({reason})") from None
    _CHECKED.add(key)


def check_images(items: Iterable) -> int:
    """Check every distinct image path of ``items`` (objects with a ``path``); the number
    checked.  Items whose path is not a string (tensors of the embedded digits) are skipped."""
    seen = set()
    for it in items:
        path = it.path
        if isinstance(path, (str, os.PathLike)) and str(path) not in seen:
            seen.add(str(path))
            check_image(str(path))
    return len(seen)
