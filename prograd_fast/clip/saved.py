"""A saved prompt (a ``prograd-fast train`` run folder or its checkpoint), rebuilt on any class
names for evaluation: base, new or all classes of the trained data set, or another one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..methods import METHODS
from .model import PromptedCLIP

__all__ = ["SavedPrompt", "load_saved_prompt", "prompted_from_saved"]


@dataclass
class SavedPrompt:
    """The learned context (``None`` for a zero-shot run or a learner without one), the
    learner's whole state (``None`` in checkpoints older than learners), the run's trainer
    config and the prompt settings ``train`` recorded (``config["extra"]["prompt"]``; a
    method with a learner of its own also records its constructor settings there as
    ``learner_settings``)."""

    source: Path
    config: dict
    ctx: torch.Tensor | None
    learner_state: dict | None = None

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
    if not isinstance(state, dict) or "config" not in state or not (
            "ctx" in state or isinstance(state.get("learner"), dict)):
        raise ValueError(f"{path}: not a prograd-fast train checkpoint (no learned prompt / "
                         f"config)")
    return SavedPrompt(path, state["config"], state.get("ctx"), state.get("learner"))


def prompted_from_saved(saved: SavedPrompt, clip, classnames: Sequence[str], tokenizer=None,
                        templates=None, share_prefix=True) -> PromptedCLIP:
    """The frozen ``clip`` with the saved prompt on ``classnames`` (the saved teacher
    template unless ``templates``).  A class-specific context only fits its own classes.
    A method with a learner of its own (CoCoOp, MaPLe, ...) is rebuilt with that learner
    and its recorded settings, then given the saved learner state."""
    p = saved.prompt
    method = METHODS.get(saved.method)
    if method is not None and method.learner is not None and "learner_settings" in p:
        return _with_learner(saved, method, clip, classnames, tokenizer, templates,
                             share_prefix)
    if saved.ctx is None and saved.method != "zeroshot":
        raise ValueError(f"{saved.source}: a {saved.method} prompt saved without its learner "
                         f"settings (an older version) cannot be rebuilt; retrain it")
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


def _with_learner(saved: SavedPrompt, method, clip, classnames, tokenizer, templates,
                  share_prefix) -> PromptedCLIP:
    """The method's own learner on ``classnames`` with the saved state (its class-free
    learned tensors; buffers built from class names are rebuilt here)."""
    p = saved.prompt
    model = PromptedCLIP(clip, list(classnames), tokenizer=tokenizer,
                         templates=templates if templates is not None else p.get("templates"),
                         template_set=p.get("template_set", "coop"), share_prefix=share_prefix,
                         learner=method.learner, **dict(p["learner_settings"]))
    state = saved.learner_state
    if state is None:
        raise ValueError(f"{saved.source} holds no learner state for its {saved.method} prompt")
    own = model.prompt_learner.state_dict()
    wrong = [k for k in state if k not in own or tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong or set(own) - set(state):
        k = (wrong or sorted(set(own) - set(state)))[0]
        raise ValueError(f"{saved.source}: the saved {saved.method} state does not fit the "
                         f"rebuilt learner ({k}: saved "
                         f"{tuple(state[k].shape) if k in state else 'missing'}, rebuilt "
                         f"{tuple(own[k].shape) if k in own else 'missing'})")
    model.prompt_learner.load_state_dict(state)
    return model
