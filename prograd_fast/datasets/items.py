"""Labelled image items, the train / val / test split of a data set, and the two selections
every protocol makes of it: the few-shot draw and CoOp's base / new classes."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Item", "Split", "few_shot", "few_shot_shortfall", "subsample_classes",
           "class_subset"]


@dataclass(frozen=True)
class Item:
    """One labelled image: a file path (or any object the dataset's loader understands)."""

    path: object
    label: int


@dataclass
class Split:
    """Train / val / test items and the class names (label ``i`` is ``classnames[i]``)."""

    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]


def few_shot(items: Sequence[Item], shots: int, seed: int) -> list[Item]:
    """``shots`` items per class drawn without replacement from ``seed``, exactly as Dassl's
    ``generate_fewshot_dataset`` draws them after ``set_random_seed(seed)``: one
    ``random.Random(seed)`` stream, classes in order of first appearance in ``items``,
    ``rng.sample(class_items, shots)`` for every class with at least ``shots`` items (the
    whole class, in order, otherwise).  ``shots <= 0`` keeps everything.  The same items in
    the same order give Dassl's selection on the same Python."""
    if shots <= 0:
        return list(items)
    by_label: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        by_label[it.label].append(it)
    rng = random.Random(seed)
    out = []
    for group in by_label.values():
        out.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return out


def few_shot_shortfall(split: Split, shots: int) -> str | None:
    """A one-line warning when some class of ``split.train`` has fewer than ``shots`` items
    (:func:`few_shot` then takes all it has, as Dassl does), else None."""
    if shots <= 0:
        return None
    counts = [0] * len(split.classnames)
    for it in split.train:
        counts[it.label] += 1
    short = [i for i, n in enumerate(counts) if n < shots]
    if not short:
        return None
    low = min(short, key=lambda i: counts[i])
    return (f"--shots {shots}: {len(short)} of {len(counts)} classes have fewer training images "
            f"(fewest: {split.classnames[low]!r} with {counts[low]}); they train on all they "
            f"have, as Dassl's few-shot sampler does")



def subsample_classes(split: Split, which: str) -> Split:
    """CoOp's base-to-new protocol: ``"base"`` is the first half of the labels (rounded
    up), ``"new"`` the rest, relabelled from 0; ``"all"`` keeps everything."""
    if which == "all":
        return split
    keep = class_subset(len(split.classnames), which)
    remap = {old: new for new, old in enumerate(keep)}

    def sub(items):
        return [Item(it.path, remap[it.label]) for it in items if it.label in remap]

    return Split(sub(split.train), sub(split.val), sub(split.test),
                 [split.classnames[i] for i in keep])


def class_subset(n_classes: int, which: str) -> list[int]:
    """The labels CoOp's base-to-new protocol keeps of ``n_classes``: ``"base"`` the first
    half (rounded up), ``"new"`` the rest, ``"all"`` every label."""
    m = math.ceil(n_classes / 2)
    if which == "all":
        return list(range(n_classes))
    if which == "base":
        return list(range(m))
    if which == "new":
        return list(range(m, n_classes))
    raise ValueError(f"subsample must be 'all', 'base' or 'new', got {which!r}")
