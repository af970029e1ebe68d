"""The prompt-tuning methods, listed once: the trainer, the protocol grid, the CLI and the
tables all read this registry.

Torch-free (the CLI's ``--help`` reads it).  A new method is one :func:`register_method`
call: a name, whether it trains, whether ProGrad's projection applies, and optionally the
prompt learner it trains (see :class:`prograd_fast.clip.learner.Learner`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

__all__ = ["Method", "METHODS", "register_method", "get_method", "LazyLearner",
           "default_grid_methods"]


@dataclass(frozen=True)
class Method:
    """One method.  ``trains``: False for zero-shot CLIP (the teacher's prompt, no training).
    ``prograd``: the optimiser removes the gradient's conflict with the zero-shot prediction
    (``lam`` applies, the conflict rate is logged); False is plain CoOp-style training.
    ``learner``: what :class:`~prograd_fast.clip.PromptedCLIP` builds its prompt learner
    with, ``learner(tower, classnames, tokenizer, **prompt_settings)``; None: CoOp's
    :class:`~prograd_fast.clip.PromptLearner`.  ``title``: its name in tables.
    ``in_default_grid``: run by ``prograd-fast protocol`` when ``--methods`` is not given
    (:func:`default_grid_methods`; the ProGrad paper's table: zero-shot CLIP, CoOp, ProGrad)."""

    name: str
    title: str
    trains: bool = True
    prograd: bool = False
    learner: Callable | None = None
    in_default_grid: bool = True


class LazyLearner:
    """A learner class named ``"module:Class"``, imported when first called: the registry
    stays torch-free and imports nothing of the package."""

    def __init__(self, path: str) -> None:
        self.path = path

    def resolve(self) -> type:
        """The learner class (imported now)."""
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, name: str):  # class attributes (needs_clip_model, ...) of the learner
        if name.startswith("__") or name == "path":
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        return f"LazyLearner({self.path!r})"


#: name -> :class:`Method`, in table order (iterating gives the names).
METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` (its name must be new); returns it."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def default_grid_methods() -> list[str]:
    """The methods a protocol grid runs unless told which."""
    return [name for name, m in METHODS.items() if m.in_default_grid]


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}") from None


def _with_prograd(name: str, title: str, learner: str) -> None:
    """Register the method ``name`` with its learner (``"module:Class"``) and, beside it,
    ``name+prograd``: the same learner trained with ProGrad's projection."""
    lazy = LazyLearner(learner)
    register_method(Method(name, title, learner=lazy, in_default_grid=False))
    register_method(Method(f"{name}+prograd", f"{title} + ProGrad", prograd=True, learner=lazy,
                           in_default_grid=False))


register_method(Method("zeroshot", "Zero-shot CLIP", trains=False))
register_method(Method("coop", "CoOp"))
register_method(Method("prograd", "ProGrad", prograd=True))
_with_prograd("kgcoop", "KgCoOp", "prograd_fast.clip.kgcoop:KgCoOpLearner")
_with_prograd("cocoop", "CoCoOp", "prograd_fast.clip.cocoop:CoCoOpLearner")
_with_prograd("maple", "MaPLe", "prograd_fast.clip.maple:MaPLeLearner")
_with_prograd("ivlp", "IVLP", "prograd_fast.clip.ivlp:IVLPLearner")
_with_prograd("vpt", "VPT", "prograd_fast.clip.vpt:VPTLearner")
