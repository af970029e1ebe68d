"""Few-shot training sets: CoOp's cached ``split_fewshot/shot_K-seed_S.pkl`` when present,
else Dassl's draw.

**The draw.** :func:`prograd_fast.clip.data.few_shot` reproduces Dassl's
``generate_fewshot_dataset`` after ``set_random_seed(seed)`` (``random.sample`` per class
from one ``random.Random(seed)`` stream, classes in order of first appearance): on the same
split and the same Python it selects the same images in the same order (tested against the
official readers).  The official readers draw on all classes and only then keep the base
or new half; so do we.  ImageNet's item order is ``os.listdir`` order (as in Dassl), which
depends on the file system: use the cached pickle to pin a selection.

**The cached pickle.** Dassl saves every draw as ``<data set>/split_fewshot/
shot_<K>-seed_<S>.pkl`` (``{"train": [Datum, ...], "val": [...]}``).  Reading it reuses a
published or earlier run's exact images.  It is read with a restricted unpickler: the only
object it may build is a stand-in for ``dassl.data.datasets.base_dataset.Datum`` holding
strings and integers (anything else in the file is refused, nothing in it is executed).
Only *which images* were drawn is taken from it: each image is looked up in this split's
train list by its path under the data set folder (the pickle holds the drawing machine's
absolute paths) and its label and class name must agree with the split file; otherwise
the file is refused with the reason.  prograd_fast never writes these files.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from .items import Item, Split, few_shot
from .registry import DatasetError, DatasetSpec

__all__ = ["fewshot_pickle_path", "read_fewshot_pickle", "few_shot_train"]

_DATUM = ("dassl.data.datasets.base_dataset", "Datum")
_FIELDS = {"_impath": str, "_label": int, "_domain": int, "_classname": str}


class _Datum:
    """Stand-in for Dassl's Datum: four plain fields, type-checked when unpickled."""

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict) or not set(state) <= set(_FIELDS) or "_impath" not in state:
            raise pickle.UnpicklingError(f"unexpected Datum fields {state!r}")
        for key, value in state.items():
            if not isinstance(value, _FIELDS[key]) or isinstance(value, bool):
                raise pickle.UnpicklingError(f"Datum.{key} is {type(value).__name__}")
        self.__dict__.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == _DATUM:
            return _Datum
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def fewshot_pickle_path(folder: str | Path, shots: int, seed: int) -> Path:
    return Path(folder) / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"


def _load(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f).load()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the few-shot split ({e.strerror})") from None
    except Exception as e:  # nothing in the file runs: any failure is a malformed file (a
        # corrupt one can announce absurd sizes: MemoryError, OverflowError)
        raise DatasetError(f"{path}: not a Dassl few-shot split ({e}); expected "
                           f'{{"train": [Datum, ...], "val": [...]}} as Dassl writes it') from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), list) or not all(
            isinstance(d, _Datum) for d in data["train"]):
        raise DatasetError(f'{path}: expected a dict with a "train" list of Dassl Datum records')
    return data


def read_fewshot_pickle(path: str | Path, train: list[Item], classnames: list[str],
                        folder: str | Path) -> list[Item]:
    """The items of ``train`` that a Dassl ``split_fewshot`` pickle selected, in its order.

    ``folder`` is the data set folder; pickled paths are matched by their trailing
    components relative to it.  Labels and class names must agree with the split."""
    path = Path(path)
    data = _load(path)
    folder = os.path.abspath(str(folder))
    by_rel: dict[tuple[str, ...], Item] = {}
    for it in train:
        by_rel[tuple(Path(os.path.relpath(str(it.path), folder)).parts)] = it
    depths = sorted({len(k) for k in by_rel}, reverse=True)
    out = []
    for i, d in enumerate(data["train"]):
        parts = Path(d._impath.replace("\\", "/")).parts
        match = next((by_rel[parts[-n:]] for n in depths if parts[-n:] in by_rel), None)
        if match is None:
            raise DatasetError(f"{path}: train[{i}] {d._impath!r} is not an image of this train "
                               f"split under {folder} (the pickle belongs to another split)")
        label, name = d.__dict__.get("_label"), d.__dict__.get("_classname")
        if label != match.label or (name is not None and name != classnames[match.label]):
            raise DatasetError(f"{path}: train[{i}] {d._impath!r} has label {label} ({name!r}); "
                               f"the split says {match.label} ({classnames[match.label]!r})")
        out.append(match)
    if not out:
        raise DatasetError(f"{path}: the train list is empty")
    return out


def few_shot_train(spec: DatasetSpec, folder: str | Path, split: Split, shots: int,
                   seed: int) -> tuple[list[Item], str]:
    """``shots`` training items per class of the full ``split`` and where they came from
    (the cached pickle's path, or ``"draw"``).  ``shots <= 0``: all training items.  The
    few-shot items must exist."""
    if spec.test_only:
        raise DatasetError(f"{spec.name} is a test-only data set: it has no training split")
    if shots <= 0:
        return list(split.train), "all"
    pkl = fewshot_pickle_path(folder, shots, seed)
    if pkl.is_file():
        items, source = read_fewshot_pickle(pkl, split.train, split.classnames, folder), str(pkl)
    else:
        items, source = few_shot(split.train, shots, seed), "draw"
    for it in items:  # a few stats: one line now, not a loader traceback in the middle of training
        if not os.path.isfile(it.path):
            raise DatasetError(f"{it.path}: image listed by the split is missing")
    return items, source
