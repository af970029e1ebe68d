"""Checks of user-given options, shared by the command line and the protocol grid.

Torch-free at import (model loading is imported when called): the CLI, ``prograd_fast.datasets.cli``,
``prograd_fast.protocols`` and ``prograd_fast.cli_eval`` all refuse bad options with these,
so none of them needs to import another's private helpers.
"""

from __future__ import annotations

__all__ = ["CLIError", "AT_LEAST_0", "AT_LEAST_1", "POSITIVE", "UNIT", "range_error",
           "one_line", "check_device", "model_from_args"]


class CLIError(Exception):
    """A bad command-line input: ``main`` reports it as one line on stderr, exit status 2."""


# Ranges of numeric options, as (holds, what it needs) for range_error.
AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
POSITIVE = (lambda v: v > 0, "> 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")


def range_error(checks) -> str | None:
    """``"FLAG must be NEED, got VALUE"`` for the first ``(flag, value, (holds, need))`` whose
    value (None: not given) fails ``holds`` (NaN fails every range); None when all hold.
    ``train`` and ``protocol`` refuse their options with it before any work."""
    for flag, value, (holds, need) in checks:
        if value is not None and not holds(value):
            return f"{flag} must be {need}, got {value}"
    return None


def one_line(exc: BaseException) -> str:
    """An exception's message on one line of at most 400 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def check_device(name: str) -> None:
    """Refuse a ``--device`` that torch cannot parse or that is not present."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r}: {one_line(exc)}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: no CUDA device is available")


def model_from_args(args, device):
    """``(clip_model, tokenizer, image_size, mean, std)`` for ``args.model`` (default: the
    embedded digits model with ``args.data == "digits"``) and ``args.pretrained``; a bad
    ``--model`` / ``--pretrained`` raises :class:`CLIError`."""
    from .clip.load import ModelLoadError, load_model

    name = args.model or ("digits" if args.data == "digits" else None)
    if name is None:
        raise CLIError("--model is required with --data other than 'digits' (e.g. ViT-B-16 "
                       "--pretrained openai)")
    try:
        return load_model(name, args.pretrained, device)
    except ModelLoadError as exc:
        raise CLIError(str(exc)) from None
