"""``--help`` that states each option's default once, and the loader's default worker count."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

__all__ = ["HelpFormatter", "available_cores", "default_workers", "plot_note", "PLOT_NEEDS",
           "PRETRAINED_HELP", "PROGRAD_GROUPS_CHOICES", "PROGRAD_GROUPS_HELP", "methods_help"]


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already says its default
    or there is none to state (a flag, or ``None``: the help says what happens instead).
    A description with line breaks is printed as written, others are wrapped."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or action.nargs == 0
                or "default" in text.lower()):
            return text
        return text + " (default: %(default)s)"

    def _expand_help(self, action):  # list defaults print as "1 2 3", not "[1, 2, 3]"
        params = dict(vars(action), prog=self._prog)
        if isinstance(params.get("default"), (list, tuple)):
            params["default"] = " ".join(map(str, params["default"]))
        for name in list(params):
            if params[name] is argparse.SUPPRESS:
                del params[name]
            elif hasattr(params[name], "__name__"):  # type=int -> "int", as argparse does
                params[name] = params[name].__name__
        if params.get("choices") is not None:
            params["choices"] = ", ".join(map(str, params["choices"]))
        return self._get_help_string(action) % params


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(wanted: int = 4) -> int:
    """Data-loader workers: ``wanted`` but never more than the available cores (more makes
    PyTorch's DataLoader warn and only adds contention)."""
    return max(0, min(wanted, available_cores()))


PRETRAINED_HELP = ("open_clip pretrained tag (e.g. openai) or a state-dict file; 'none': "
                   "random weights (only meaningful for tests)")
PLOT_NEEDS = "no plot: it needs matplotlib (pip install matplotlib)"
# --prograd-groups (prograd_fast.clip.trainer.PROGRAD_GROUPS, spelled out: --help needs no torch)
PROGRAD_GROUPS_CHOICES = ("together", "apart")
PROGRAD_GROUPS_HELP = ("a learner with prompts in both towers (MaPLe, IVLP): ProGrad projects "
                       "them as one vector (together, the paper's rule) or each tower's prompt "
                       "on its own (apart); docs/coop.md, 'Parameter groups'")


def methods_help() -> str:
    """The registered methods, for ``--help`` (the registry is torch-free)."""
    from .methods import METHODS

    return ("; ".join(f"{name}: {m.title}" for name, m in METHODS.items())
            + " (NAME+prograd: NAME with ProGrad's projection)")


def plot_note(path: str | Path) -> str:
    """``plot: PATH`` where matplotlib can draw it, else why there is no plot."""
    if importlib.util.find_spec("matplotlib") is None:
        return PLOT_NEEDS
    return f"plot: {path}"
