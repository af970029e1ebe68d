"""Few-shot data for prompt tuning: ImageFolder trees, CoOp split JSON, CoOp augmentation."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["Item", "Split", "load_image_folder", "load_coop_split", "load_dataset",
           "few_shot", "few_shot_shortfall", "subsample_classes", "ImageDataset", "coop_transforms"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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


def _folder_items(root: Path, classnames: list[str]) -> list[Item]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    index = {c: i for i, c in enumerate(classnames)}
    present = sorted(d.name for d in root.iterdir() if d.is_dir())
    unknown = set(present) - set(index)
    if unknown:
        raise ValueError(f"{root} has classes not in {root.parent}/train: {sorted(unknown)}")
    samples = make_dataset(str(root), {c: index[c] for c in present}, extensions=IMG_EXTENSIONS,
                           allow_empty=True)
    return [Item(p, y) for p, y in samples]


def load_image_folder(root: str | Path) -> Split:
    """``root/train/<class>/*.jpg`` plus ``root/val`` and/or ``root/test`` (either stands in
    for the other when missing).  Classes are the sorted folder names of ``train``."""
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{root} has no train/ folder (expected root/train/<class>/...)")
    classnames = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classnames:
        raise ValueError(f"{train_dir} has no class folders")
    train = _folder_items(train_dir, classnames)
    have = {it.label for it in train}
    empty = [c for i, c in enumerate(classnames) if i not in have]
    if empty:  # it would be a class no image teaches and no test can hit
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise ValueError(f"{train_dir / empty[0]}: empty class folder{more}: no image files; "
                         f"add images or remove the folder")
    val = _folder_items(root / "val", classnames) if (root / "val").is_dir() else []
    test = _folder_items(root / "test", classnames) if (root / "test").is_dir() else []
    if not val and not test:
        raise FileNotFoundError(f"{root} needs a val/ or test/ folder for evaluation")
    return Split(train, val or test, test or val, classnames)


def load_coop_split(split_json: str | Path, image_dir: str | Path | None = None) -> Split:
    """CoOp's split file (``{"train"|"val"|"test": [[impath, label, classname], ...]}``, paths
    relative to ``image_dir``, by default the JSON's folder or its ``images/`` sibling)."""
    split_json = Path(split_json)
    data = json.loads(split_json.read_text())
    given = image_dir is not None
    if image_dir is None:
        image_dir = split_json.parent / "images"
        if not image_dir.is_dir():
            image_dir = split_json.parent
    image_dir = Path(image_dir)
    names: dict[int, str] = {}
    parts = {}
    for key in ("train", "val", "test"):
        rows = data.get(key, [])
        items = []
        for row in rows:
            if len(row) != 3:
                raise ValueError(f"{split_json}: {key} rows must be [impath, label, classname]")
            path, label, name = row
            label = int(label)
            if names.setdefault(label, name) != name:
                raise ValueError(f"{split_json}: label {label} is both {names[label]!r} and {name!r}")
            items.append(Item(str(image_dir / path), label))
        parts[key] = items
    if not parts["train"]:
        raise ValueError(f"{split_json} has no train items")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{split_json}: labels must be 0..{len(names) - 1}")
    first = parts["train"][0].path
    if not Path(first).exists():  # say where the images were looked for
        rel = data["train"][0][0]
        looked = (str(image_dir) if given else
                  f"{split_json.parent / 'images'} and {split_json.parent}")
        raise FileNotFoundError(
            f"{split_json}: its first image {rel!r} is not in {looked}"
            + (" (the image root given)" if given else
               "; --image-root DIR names the folder the split's image paths start from"))
    val = parts["val"] or parts["test"]
    return Split(parts["train"], val, parts["test"] or val, [names[i] for i in range(len(names))])


def load_dataset(root: str | Path, image_dir: str | Path | None = None) -> Split:
    """An ImageFolder root (has ``train/``), a CoOp split JSON file, or a folder holding one
    (``split_*.json``); ``image_dir``: a split's image folder (see :func:`load_coop_split`)."""
    root = Path(root)
    if root.is_file() and root.suffix == ".json":
        return load_coop_split(root, image_dir)
    if (root / "train").is_dir():
        if image_dir is not None:
            raise ValueError(f"{root} is an ImageFolder root: an image folder is only for a "
                             f"CoOp split JSON")
        return load_image_folder(root)
    splits = sorted(root.glob("split_*.json")) if root.is_dir() else []
    if len(splits) == 1:
        return load_coop_split(splits[0], image_dir)
    raise FileNotFoundError(f"{root}: not an ImageFolder root (train/<class>/...) nor a CoOp "
                            f"split JSON (found {len(splits)} split_*.json)")


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
    n = len(split.classnames)
    m = math.ceil(n / 2)
    if which == "base":
        keep = list(range(m))
    elif which == "new":
        keep = list(range(m, n))
    else:
        raise ValueError(f"subsample must be 'all', 'base' or 'new', got {which!r}")
    remap = {old: new for new, old in enumerate(keep)}

    def sub(items):
        return [Item(it.path, remap[it.label]) for it in items if it.label in remap]

    return Split(sub(split.train), sub(split.val), sub(split.test),
                 [split.classnames[i] for i in keep])


class ImageDataset(Dataset):
    """Items -> ``(transform(image), label)``; images opened as RGB with PIL.

    ``seed`` (optional) makes random augmentation a function of ``(seed, epoch, index)``:
    each item's transform runs under its own seeded RNG, so the images a run sees do not
    depend on the number of processes or loader workers (multi-process training equals a
    single process) and the global RNG is left untouched.  The trainer calls
    :meth:`set_epoch` every epoch.
    """

    def __init__(self, items: Sequence[Item], transform: Callable | None = None,
                 loader: Callable | None = None, seed: int | None = None) -> None:
        self.items = list(items)
        self.transform = transform
        self.loader = loader or _pil_rgb
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        it = self.items[index]
        image = self.loader(it.path)
        if self.transform is not None:
            if self.seed is None:
                image = self.transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
                    image = self.transform(image)
        return image, torch.tensor(it.label)


def _pil_rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def coop_transforms(image_size: int, mean: Sequence[float] = OPENAI_MEAN,
                    std: Sequence[float] = OPENAI_STD, augment: bool = True):
    """CoOp's train pipeline (random resized crop, horizontal flip, normalise) or its test
    pipeline (resize, centre crop, normalise); bicubic resizing as in CLIP."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if augment:
        return T.Compose([T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic),
                          T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size), *norm])
