"""ProGrad / CoOp prompt tuning for open_clip models (CLIP causal text towers)."""

from .learner import Learner
from .load import load_open_clip
from .model import PromptedCLIP
from .prompt import CTX_INIT_MODES, PromptLearner, default_tokenizer, template_context
from .teacher import (COOP_TEMPLATES, PROGRAD_TEMPLATES, TEMPLATE_SETS, TEMPLATES, ZeroShotTeacher,
                      get_templates)
from .tower import TextTower, UnsupportedTextTowerError
from .train import (GRAD_MODES, StepOutput, build_optimizer, compute_grads, coop_lr_lambda,
                    train_step)

__all__ = [
    "COOP_TEMPLATES", "PROGRAD_TEMPLATES", "TEMPLATE_SETS", "GRAD_MODES", "PromptLearner", "PromptedCLIP", "StepOutput", "TEMPLATES", "TextTower",
    "UnsupportedTextTowerError", "ZeroShotTeacher", "build_optimizer", "compute_grads",
    "coop_lr_lambda", "default_tokenizer", "get_templates", "train_step",
    "CTX_INIT_MODES", "Learner", "load_open_clip", "template_context",
]
