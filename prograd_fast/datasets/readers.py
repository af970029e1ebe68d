"""Readers for the on-disk layouts of CoOp's DATASETS.md, with the official readers' semantics.

Every reader returns a :class:`prograd_fast.clip.data.Split` whose items carry the same
paths (``abspath(root)/folder/...``), labels, class names and order as the official
Dassl/CoOp dataset classes (``ProGrad.public/datasets/*.py``):

* ``split_json``: CoOp's ``split_zhou_<Name>.json`` (``{"train"|"val"|"test": [[impath,
  label, classname], ...]}``, paths relative to the image folder).  The split file is
  required: the official code would draw a new random split when it is missing, which
  would not be comparable with published numbers.
* ``fgvc``: FGVCAircraft's ``variants.txt`` (label = line number) and
  ``images_variant_{train,val,test}.txt`` (``<image id> <variant words>``).
* ``imagenet``: ``images/train/<wnid>/`` and ``images/val/<wnid>/`` (val is the test set);
  labels follow the sorted folder names, class names come from ``classnames.txt``
  (``<wnid> <class name>``).  Files are listed in ``os.listdir`` order, as Dassl does, so
  the few-shot draw depends on it (see :mod:`.fewshot`).
* ``imagenet_numbered`` (ImageNet-V2): folders ``0..N-1``, one per line of ``classnames.txt``.
* ``imagenet_folders`` (ImageNet-Sketch, -A, -R): the ``<wnid>`` folders present (200 for -A
  and -R), sorted, labelled ``0..K-1`` and named through ``classnames.txt``.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

from .items import Item, Split
from .registry import DatasetError, DatasetSpec

__all__ = ["read_dataset", "read_split_json", "read_classnames", "dataset_folder"]

IGNORED_FILES = ("README.txt",)  # ImageNet-A / -R ship one next to the class folders


def _listdir(path: str) -> list[str]:
    """Non-hidden entries of ``path`` in ``os.listdir`` order (Dassl's ``listdir_nohidden``)."""
    return [f for f in os.listdir(path) if not f.startswith(".")]


def _need_dir(path: str, spec: DatasetSpec, what: str) -> None:
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: missing {what} (expected {spec.expected()}; see "
                           f"docs/protocols.md)")


def _need_file(path: str, spec: DatasetSpec, what: str) -> None:
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: missing {what} (expected {spec.expected()}; see "
                           f"docs/protocols.md)")


def dataset_folder(spec: DatasetSpec, root: str | Path) -> str:
    """``abspath(expanduser(root))/folder`` (as the official readers build it), checked."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: data root not found (expected a folder holding "
                           f"{spec.folder}/ and the other data sets)")
    folder = os.path.join(root, spec.folder)
    _need_dir(folder, spec, f"{spec.title} data set folder")
    return folder


def read_dataset(spec: DatasetSpec, root: str | Path) -> Split:
    """The full split (all classes) of ``spec`` under the data root ``root``."""
    folder = dataset_folder(spec, root)
    split = _READERS[spec.layout](spec, folder)
    if not split.test:  # an accuracy on nothing would be a silent 0 (and no features to cache)
        raise DatasetError(f"{folder}: no test images (expected {spec.expected()})")
    return split


def _read_text(path: str, what: str) -> str:
    """The text of ``path`` (universal newlines); unreadable or not UTF-8: one line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}); expected the {what} as "
                           f"CoOp's DATASETS.md gives it") from None


# ---------------------------------------------------------------- split JSON
def read_split_json(path: str, image_dir: str, require_all: bool = True) -> Split:
    """CoOp's split file; rows ``[impath, label, classname]`` joined onto ``image_dir``.
    ``require_all=False`` reads a missing ``"val"`` / ``"test"`` list as empty."""
    text = _read_text(path, "split file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected "
                           f'CoOp\'s split {{"train": [[impath, label, classname], ...], '
                           f'"val": [...], "test": [...]}}') from None
    if isinstance(data, dict) and not require_all:
        data = {"val": [], "test": [], **data}
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list)
                                         for k in ("train", "val", "test")):
        raise DatasetError(f'{path}: expected a JSON object with lists "train", "val" and "test" '
                           f"of [impath, label, classname] rows")
    names: dict[int, str] = {}
    parts = {}
    for key in ("train", "val", "test"):
        items = []
        for i, row in enumerate(data[key]):
            if (not isinstance(row, list) or len(row) != 3 or not isinstance(row[0], str)
                    or not isinstance(row[2], str) or not _is_int(row[1])):
                raise DatasetError(f"{path}: {key}[{i}] is {row!r}, expected [impath, label, "
                                   f"classname] (string, integer, string)")
            impath, label, name = row[0], int(row[1]), row[2]
            if names.setdefault(label, name) != name:
                raise DatasetError(f"{path}: label {label} is both {names[label]!r} and {name!r} "
                                   f"(class names must match their labels)")
            items.append(Item(os.path.join(image_dir, impath), label))
        parts[key] = items
    if not parts["train"]:
        raise DatasetError(f"{path}: the train list is empty")
    return Split(parts["train"], parts["val"], parts["test"], _classnames(names, path))


def _is_int(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    return isinstance(x, str) and x.strip().lstrip("-").isdigit()


def _classnames(names: dict[int, str], source: str) -> list[str]:
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(max(names) + 1)) - set(names))[:5]
        raise DatasetError(f"{source}: labels must be 0..{max(names)} with a class name each; "
                           f"no item has label(s) {missing}")
    return [names[i] for i in range(len(names))]


def _read_split_layout(spec: DatasetSpec, folder: str) -> Split:
    image_dir = os.path.join(folder, spec.image_dir) if spec.image_dir else folder
    split_path = os.path.join(folder, spec.split_file)
    _need_file(split_path, spec, f"CoOp split file {spec.split_file}")
    if spec.image_dir:
        _need_dir(image_dir, spec, "image folder")
    return read_split_json(split_path, image_dir)


# ---------------------------------------------------------------- FGVCAircraft
def _read_fgvc(spec: DatasetSpec, folder: str) -> Split:
    variants = os.path.join(folder, "variants.txt")
    _need_file(variants, spec, "variants.txt (one aircraft variant per line)")
    _need_dir(os.path.join(folder, "images"), spec, "image folder")
    classnames = [line.strip() for line in _read_text(variants, "variant list").split("\n")]
    while classnames and not classnames[-1]:
        classnames.pop()
    if not classnames or any(not c for c in classnames):
        raise DatasetError(f"{variants}: expected one non-empty variant name per line")
    index = {c: i for i, c in enumerate(classnames)}
    parts = []
    for split in ("train", "val", "test"):
        path = os.path.join(folder, f"images_variant_{split}.txt")
        _need_file(path, spec, f"images_variant_{split}.txt")
        items = []
        for n, line in enumerate(_read_text(path, "image list").split("\n"), 1):
            words = line.strip().split(" ")
            if not line.strip():
                continue
            name = " ".join(words[1:])
            if len(words) < 2 or name not in index:
                raise DatasetError(f"{path}:{n}: {line.strip()!r} is not '<image id> <variant>' "
                                   f"with a variant listed in {variants}")
            items.append(Item(os.path.join(folder, "images", words[0] + ".jpg"), index[name]))
        parts.append(items)
    return Split(*parts, classnames)


# ---------------------------------------------------------------- ImageNet and its shifts
def read_classnames(path: str) -> "OrderedDict[str, str]":
    """``classnames.txt``: ``<folder> <class name words>`` per line, in file order."""
    names: OrderedDict[str, str] = OrderedDict()
    for n, line in enumerate(_read_text(path, "class name list").split("\n"), 1):
        words = line.strip().split(" ")
        if not line.strip():
            continue
        if len(words) < 2:
            raise DatasetError(f"{path}:{n}: {line.strip()!r} is not '<folder> <class name>'")
        names[words[0]] = " ".join(words[1:])
    if not names:
        raise DatasetError(f"{path}: no '<folder> <class name>' lines")
    return names


def _folder_items(split_dir: str, folders: list[str], classnames, names_file: str) -> list[Item]:
    items = []
    for label, folder in enumerate(folders):
        if folder not in classnames:
            raise DatasetError(f"{names_file}: no class name for folder {folder!r} found in "
                               f"{split_dir} (class names must match the folders)")
        d = os.path.join(split_dir, folder)
        items.extend(Item(os.path.join(d, f), label) for f in _listdir(d))
    return items


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _names_file(spec: DatasetSpec, folder: str):
    path = os.path.join(folder, "classnames.txt")
    _need_file(path, spec, "classnames.txt ('<wnid> <class name>' per line, copied from imagenet/)")
    return path, read_classnames(path)


def _read_imagenet(spec: DatasetSpec, folder: str) -> Split:
    names_file, classnames = _names_file(spec, folder)
    dirs = {split: os.path.join(folder, "images", split) for split in ("train", "val")}
    folders = {}
    for split, d in dirs.items():
        _need_dir(d, spec, f"ImageNet {split} folder")
        folders[split] = _subdirs(d)
        if not folders[split]:
            raise DatasetError(f"{d}: no class folders (expected <wnid>/ folders)")
    if folders["train"] != folders["val"]:
        odd = sorted(set(folders["train"]) ^ set(folders["val"]))[:5]
        raise DatasetError(f"{os.path.join(folder, 'images')}: train/ and val/ must hold the same "
                           f"class folders (labels follow their sorted names); they differ in {odd}")
    parts = {split: _folder_items(d, folders[split], classnames, names_file)
             for split, d in dirs.items()}
    have = {it.label for it in parts["train"]}
    empty = [f for label, f in enumerate(folders["train"]) if label not in have]
    if empty:  # a class no image teaches
        raise DatasetError(f"{os.path.join(dirs['train'], empty[0])}: empty class folder"
                           + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                           + ": no images; add images or remove it from train/ and val/")
    names = [classnames[f] for f in folders["train"]]
    return Split(parts["train"], parts["val"], parts["val"], names)


def _read_numbered(spec: DatasetSpec, folder: str) -> Split:
    names_file, classnames = _names_file(spec, folder)
    image_dir = os.path.join(folder, spec.image_dir)
    _need_dir(image_dir, spec, "image folder")
    wnids = list(classnames)
    items = []
    for label in range(len(wnids)):
        d = os.path.join(image_dir, str(label))
        if not os.path.isdir(d):
            raise DatasetError(f"{d}: missing class folder (expected folders 0..{len(wnids) - 1}, "
                               f"one per line of {names_file})")
        items.extend(Item(os.path.join(d, f), label) for f in _listdir(d))
    names = [classnames[w] for w in wnids]
    return Split(items, items, items, names)


def _read_folders(spec: DatasetSpec, folder: str) -> Split:
    names_file, classnames = _names_file(spec, folder)
    image_dir = os.path.join(folder, spec.image_dir)
    _need_dir(image_dir, spec, "image folder")
    folders = sorted(f for f in _listdir(image_dir) if f not in IGNORED_FILES)
    if not folders:
        raise DatasetError(f"{image_dir}: no class folders (expected <wnid>/ folders)")
    for f in folders:
        if not os.path.isdir(os.path.join(image_dir, f)):
            raise DatasetError(f"{os.path.join(image_dir, f)}: expected only <wnid>/ class "
                               f"folders in {image_dir}")
    items = _folder_items(image_dir, folders, classnames, names_file)
    names = [classnames[f] for f in folders]
    return Split(items, items, items, names)


_READERS = {"split_json": _read_split_layout, "fgvc": _read_fgvc, "imagenet": _read_imagenet,
            "imagenet_numbered": _read_numbered, "imagenet_folders": _read_folders}
