"""prograd_fast: fast, drop-in ProGrad (prompt-aligned gradient) optimisation for prompt tuning."""

from . import functional
from .backends import BackendUnavailableError, available_backends
from .functional import ProGradStats, prograd_sgd, project
from .grads import backward
from .losses import prograd_losses
from .optim import ProGradSGD

__all__ = [
    "ProGradSGD",
    "ProGradStats",
    "BackendUnavailableError",
    "available_backends",
    "backward",
    "functional",
    "prograd_losses",
    "prograd_sgd",
    "project",
]
__version__ = "0.1.0"
