"""The optimizer's per-tensor host reads in C (``csrc/prograd_host.cpp``), when it builds.

Every step reads, per parameter, ``.grad``, the pending general gradient, the momentum
buffer and the address, size, dtype, device and layout of all four tensors; in Python that
is about 25 passes over the tensor lists plus a Python ``Tensor.__hash__`` per state look-up
(~100 us per step for 27 tensors on a slow core).  The helper does those reads in one pass
per call.  It only reads, compares and moves references: it never decides that a step is
valid (see the C++ file), and every caller keeps its Python path, which does the same and
raises the clear errors.

When it is built: only once a fused backend (``Backend.fused``: those JIT-build or
JIT-compile anyway) has run a group -- a ``backend="torch"`` user never waits for a
compiler.  It is built just in time like the kernel extensions (one small file, cached);
:func:`module` is ``None`` -- the Python path -- when it cannot be built (no compiler,
``PROGRAD_FAST_NO_BUILD=1``) or when ``PROGRAD_FAST_NO_HOST_HELPER=1`` opts out.  Either
is logged at info level on the ``prograd_fast`` logger.
"""

from __future__ import annotations

import logging
import os

from . import _ext

__all__ = ["NO_HELPER_ENV", "StateDicts", "forget", "module"]

NO_HELPER_ENV = "PROGRAD_FAST_NO_HOST_HELPER"

_UNTRIED = object()
_module = _UNTRIED  # the compiled module, or None once a load failed (tests set None)
_log = logging.getLogger("prograd_fast")


def _load():
    global _module
    if os.environ.get(NO_HELPER_ENV, "").strip() not in ("", "0"):
        _log.info("prograd_fast host helper disabled (%s is set): using the Python host path",
                  NO_HELPER_ENV)
        _module = None
        return None
    try:
        _module = _ext.load("host")
    except _ext.ExtensionUnavailable as exc:
        _log.info("prograd_fast host helper unavailable, using the Python host path: %s", exc)
        _module = None
    return _module


def module():
    """The compiled host helper, or ``None`` (built, or found cached, on the first call)."""
    found = _module
    return _load() if found is _UNTRIED else found


def forget() -> None:
    """Decide again on the next :func:`module` call (after ``PROGRAD_FAST_NO_HOST_HELPER``
    changed, e.g. in tests); a module already loaded is found again without a build."""
    global _module
    _module = _UNTRIED


class StateDicts:
    """The parameters' state dicts (``None``: no entry), looked up once and reused while the
    optimizer's ``state`` holds exactly the same entries -- same keys, same dict objects, same
    order -- which the helper checks by identity, without hashing.  Any change to ``state``
    (an entry added, replaced or removed; ``load_state_dict``) or to the parameter list
    means a fresh look-up.  (It keeps references to the entries it last saw until then.)"""

    __slots__ = ("keys", "values", "lists")

    def __init__(self) -> None:
        self.keys: tuple | None = None
        self.values: tuple = ()
        self.lists: dict = {}  # tag -> (params as a tuple, their state dicts)

    def clear(self) -> None:
        self.keys, self.values = None, ()
        self.lists.clear()

    def get(self, host, state: dict, params: list, tag) -> list:
        """``[state.get(p) for p in params]``, from the cache when nothing changed."""
        if self.keys is not None and host.same_items(state, self.keys, self.values):
            hit = self.lists.get(tag)
            if hit is not None and host.same_objects(params, hit[0]):
                return hit[1]
        else:
            self.keys, self.values = tuple(state), tuple(state.values())
            self.lists.clear()
        sds = list(map(state.get, params))
        self.lists[tag] = (tuple(params), sds)
        return sds
