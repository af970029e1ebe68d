"""A saved prompt (a ``prograd-fast train`` run folder or its checkpoint), rebuilt on any class
names for evaluation: base, new or all classes of the trained data set, or another one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .model import PromptedCLIP

__all__ = ["SavedPrompt", "load_saved_prompt", "prompted_from_saved"]


@dataclass
class SavedPrompt:
    """The learned context (``None`` for a zero-shot run), the run's trainer config and
    the prompt settings ``train`` recorded (``config["extra"]["prompt"]``)."""

    source: Path
    config: dict
    ctx: torch.Tensor | None

    @property
    def method(self) -> str:
        return self.config.get("method", "prograd")

    @property
    def prompt(self) -> dict:
        return dict(self.config.get("extra", {}).get("prompt") or {})


def load_saved_prompt(path: str | Path) -> SavedPrompt:
    """Reads ``path``: a run folder (its ``checkpoint.pt``, or ``log.json`` for a zero-shot
    run, which saves no context) or a ``checkpoint.pt`` file.  Raises ``ValueError`` naming
    the file when it is not a saved prompt."""
    path = Path(path)
    if path.is_dir():
        ckpt, log = path / "checkpoint.pt", path / "log.json"
        if ckpt.is_file():
            path = ckpt
        elif log.is_file():
            try:
                config = json.loads(log.read_text())["config"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{log}: not a run log ({exc})") from None
            if config.get("method") != "zeroshot":
                raise ValueError(f"{path} has no checkpoint.pt (a {config.get('method')} run "
                                 f"that did not finish an epoch)")
            return SavedPrompt(log, config, None)
        else:
            raise ValueError(f"{path} holds neither checkpoint.pt nor log.json (not a run folder)")
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable file
        raise ValueError(f"{path}: not a checkpoint ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict) or "ctx" not in state or "config" not in state:
        raise ValueError(f"{path}: not a prograd-fast train checkpoint (no ctx / config)")
    return SavedPrompt(path, state["config"], state["ctx"])


def prompted_from_saved(saved: SavedPrompt, clip, classnames: Sequence[str], tokenizer=None,
                        templates=None, share_prefix=True) -> PromptedCLIP:
    """The frozen ``clip`` with the saved context on ``classnames`` (the saved teacher
    template unless ``templates``).  A class-specific context only fits its own classes."""
    p = saved.prompt
    if p.get("class_specific") and saved.ctx is not None:
        trained = p.get("classnames")
        if trained is not None and list(trained) != list(classnames):
            raise ValueError("a class-specific context (--class-specific) can only be evaluated "
                             "on the classes it was trained on")
    model = PromptedCLIP(clip, list(classnames), tokenizer=tokenizer,
                         templates=templates if templates is not None else p.get("templates"),
                         n_ctx=p.get("n_ctx") or 16, ctx_init=p.get("ctx_init"),
                         ctx_init_mode=p.get("ctx_init_mode", "coop"),
                         class_specific=bool(p.get("class_specific")),
                         class_token_position=p.get("class_token_position", "end"),
                         share_prefix=share_prefix)
    if saved.ctx is not None:
        ctx = model.prompt_learner.ctx
        if tuple(saved.ctx.shape) != tuple(ctx.shape):
            raise ValueError(f"{saved.source} holds a context of shape {tuple(saved.ctx.shape)}, "
                             f"the rebuilt prompt's is {tuple(ctx.shape)}")
        with torch.no_grad():
            ctx.copy_(saved.ctx)
    return model
