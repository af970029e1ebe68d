"""CoOp's data sets by name, read from the layouts of CoOp's DATASETS.md.

``load_split("oxford_pets", root)`` gives the full :class:`~prograd_fast.datasets.items.Split`;
``few_shot_train(spec, folder, split, shots, seed)`` the few-shot training items (CoOp's
cached pickle, else Dassl's draw).  See docs/protocols.md.
"""

from __future__ import annotations

from pathlib import Path

from .items import Split
from .fewshot import few_shot_train, fewshot_pickle_path, read_fewshot_pickle
from .readers import dataset_folder, read_dataset
from .registry import (DATASETS, FEWSHOT_DATASETS, IMAGENET_SHIFTS, DatasetError, DatasetSpec,
                       get_spec)

__all__ = ["DATASETS", "FEWSHOT_DATASETS", "IMAGENET_SHIFTS", "DatasetError", "DatasetSpec",
           "get_spec", "load_split", "dataset_folder", "few_shot_train", "fewshot_pickle_path",
           "read_fewshot_pickle", "read_dataset"]


def load_split(name: str, root: str | Path) -> tuple[DatasetSpec, Split]:
    """The spec and full split (every class) of the data set ``name`` under ``root``."""
    spec = get_spec(name)
    return spec, read_dataset(spec, root)
