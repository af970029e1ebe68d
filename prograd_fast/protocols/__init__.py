"""The papers' protocols as one resumable grid: base-to-new, few-shot, cross-data-set and
domain generalisation on CoOp's data sets, with cached image features and multi-GPU
(torchrun).  ``prograd-fast protocol --help``; docs/protocols.md."""

from .config import (DEFAULT_SHOTS, METHODS, PROTOCOLS, Schedule, default_datasets, method_prompt,
                     official_schedule)
from .features import FeatureCache, items_fingerprint, model_fingerprint
from .grid import GridOptions, GridRunner, Run, plan
from .tables import build_table, write_outputs

__all__ = ["DEFAULT_SHOTS", "METHODS", "PROTOCOLS", "Schedule", "default_datasets",
           "method_prompt", "official_schedule", "FeatureCache", "items_fingerprint",
           "model_fingerprint", "GridOptions", "GridRunner", "Run", "plan", "build_table",
           "write_outputs"]
