"""Few-shot data for prompt tuning: ImageFolder trees, CoOp split JSON, CoOp augmentation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

# the data items and their few-shot / base-new selections live in prograd_fast.datasets.items
# (re-exported here: these names were first defined in this module)
from ..datasets.items import Item, Split, few_shot, few_shot_shortfall, subsample_classes

__all__ = ["Item", "Split", "load_image_folder", "load_coop_split", "load_dataset",
           "few_shot", "few_shot_shortfall", "subsample_classes", "ImageDataset", "coop_transforms"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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
    from ..datasets.readers import read_split_json

    split_json = Path(split_json)
    given = image_dir is not None
    if image_dir is None:
        image_dir = split_json.parent / "images"
        if not image_dir.is_dir():
            image_dir = split_json.parent
    split = read_split_json(str(split_json), str(image_dir), require_all=False)
    first = split.train[0].path
    if not Path(first).exists():  # say where the images were looked for
        rel = os.path.relpath(first, str(image_dir))
        looked = (str(image_dir) if given else
                  f"{split_json.parent / 'images'} and {split_json.parent}")
        raise FileNotFoundError(
            f"{split_json}: its first image {rel!r} is not in {looked}"
            + (" (the image root given)" if given else
               "; --image-root DIR names the folder the split's image paths start from"))
    val = split.val or split.test
    return Split(split.train, val, split.test or val, split.classnames)


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
