"""Tiny synthetic data sets in the on-disk layouts of CoOp's DATASETS.md (real folder, file
and split names and formats; a few generated images per class)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

# (folder-or-file stem, class name as the split file / classnames.txt says it)
_CLASSES = {
    "caltech101": [("accordion", "accordion"), ("Faces", "face"), ("Leopards", "leopard"),
                   ("anchor", "anchor"), ("airplanes", "airplane")],
    "oxford_pets": [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"),
                    ("Bengal", "bengal"), ("great_pyrenees", "great_pyrenees"), ("Sphynx", "sphynx")],
    "stanford_cars": [("c", "2012 Tesla Model S"), ("c", "2007 BMW X5 SUV"), ("c", "1993 Geo Metro Convertible"),
                      ("c", "2012 Honda Odyssey Minivan")],
    "oxford_flowers": [("f", "pink primrose"), ("f", "hard-leaved pocket orchid"), ("f", "canterbury bells"),
                       ("f", "sweet pea")],
    "food101": [("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("baklava", "baklava"),
                ("beef_carpaccio", "beef_carpaccio")],
    "sun397": [("a/abbey", "abbey"), ("b/bakery/shop", "shop bakery"), ("a/airport_terminal", "airport_terminal"),
               ("c/canyon", "canyon"), ("o/office", "office")],
    "dtd": [("banded", "banded"), ("blotchy", "blotchy"), ("braided", "braided"), ("bubbly", "bubbly")],
    "eurosat": [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"), ("Highway", "Highway or Road"),
                ("SeaLake", "Sea or Lake")],
    "ucf101": [("Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Archery", "Archery"),
               ("Baby_Crawling", "Baby_Crawling"), ("Band_Marching", "Band_Marching")],
}
_FOLDERS = {"caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
            "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
            "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
            "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
            "food101": ("food-101", "images", "split_zhou_Food101.json"),
            "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
            "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
            "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
            "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json")}
VARIANTS = ["707-320", "727-200", "A300B4", "Cessna 172", "DC-3"]
WNIDS = [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
         ("n01491361", "tiger shark"), ("n01494475", "hammerhead shark"), ("n01496331", "electric ray")]
SPLIT_SETS = tuple(_FOLDERS)
ALL = SPLIT_SETS + ("fgvc_aircraft", "imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a",
                    "imagenet_r")

_RNG = np.random.default_rng(0)


def _image(path: Path, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_RNG.integers(0, 255, (size, size + 2, 3), dtype=np.uint8)).save(path)


def _relpath(name: str, stem: str, label: int, i: int, split: str) -> str:
    k = label * 100 + i
    return {"caltech101": f"{stem}/image_{k:04d}.jpg",
            "oxford_pets": f"{stem}_{k}.jpg",
            "stanford_cars": f"cars_{'test' if split == 'test' else 'train'}/{k:05d}.jpg",
            "oxford_flowers": f"image_{k:05d}.jpg",
            "food101": f"{stem}/{1000000 + k}.jpg",
            "sun397": f"{stem}/sun_{k:06d}.jpg",
            "dtd": f"{stem}/{stem}_{k:04d}.jpg",
            "eurosat": f"{stem}/{stem}_{k}.jpg",
            "ucf101": f"{stem}/v_{stem.replace('_', '')}_g{k:02d}_c01.jpg"}[name]


def make_split_dataset(root: Path, name: str, n_classes: int = 4, counts=(4, 2, 2)) -> Path:
    """CoOp's layout: image folder + split_zhou_<Name>.json with shuffled rows."""
    folder_name, image_dir, split_file = _FOLDERS[name]
    folder = root / folder_name
    images = folder / image_dir if image_dir else folder
    split = {}
    offset = 0
    for split_name, n in zip(("train", "val", "test"), counts):
        rows = []
        for label, (stem, cname) in enumerate(_CLASSES[name][:n_classes]):
            for i in range(n):
                rel = _relpath(name, stem, label, offset + i, split_name)
                _image(images / rel)
                rows.append([rel, label, cname])
        random.Random(len(rows)).shuffle(rows)  # real split files are not sorted by label
        split[split_name] = rows
        offset += n
    (folder / split_file).write_text(json.dumps(split))
    return folder


def make_fgvc(root: Path, n_classes: int = 4, counts=(4, 2, 2)) -> Path:
    folder = root / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "variants.txt").write_text("\n".join(VARIANTS[:n_classes]) + "\n")
    k = 1000000
    for split, n in zip(("train", "val", "test"), counts):
        lines = []
        for v in VARIANTS[:n_classes]:
            for _ in range(n):
                k += 7
                _image(folder / "images" / f"{k:07d}.jpg")
                lines.append(f"{k:07d} {v}")
        random.Random(k).shuffle(lines)
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def _classnames_file(folder: Path, wnids) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids))


def make_imagenet(root: Path, n_classes: int = 4, counts=(4, 2)) -> Path:
    folder = root / "imagenet"
    wnids = WNIDS[:n_classes]
    _classnames_file(folder, wnids)
    for split, n in zip(("train", "val"), counts):
        for c, (w, _) in enumerate(wnids):
            for i in range(n):
                stem = f"{w}_{i}" if split == "train" else f"ILSVRC2012_val_{c * 100 + i:08d}"
                _image(folder / "images" / split / w / f"{stem}.JPEG")
    return folder


def make_imagenet_shift(root: Path, name: str, n_classes: int = 4, per_class: int = 2,
                        total_classes: int | None = None) -> Path:
    """ImageNet-V2 (numbered folders, one per classnames.txt line; ``total_classes`` lines,
    the official reader needs 1000), -Sketch (all classes) or -A / -R (a subset + README)."""
    wnids = WNIDS[:n_classes]
    if name == "imagenetv2":
        folder = root / "imagenetv2"
        extra = [(f"n9{i:07d}", f"filler class {i}") for i in range((total_classes or n_classes) - n_classes)]
        _classnames_file(folder, wnids + extra)
        base = folder / "imagenetv2-matched-frequency-format-val"
        for label in range(len(wnids) + len(extra)):
            (base / str(label)).mkdir(parents=True, exist_ok=True)
            if label < n_classes:
                for i in range(per_class):
                    _image(base / str(label) / f"{label:04d}{i}abc.jpeg")
        return folder
    folder_name, image_dir, keep = {"imagenet_sketch": ("imagenet-sketch", "images", wnids),
                                     "imagenet_a": ("imagenet-adversarial", "imagenet-a", wnids[1::2]),
                                     "imagenet_r": ("imagenet-rendition", "imagenet-r", wnids[::2])}[name]
    folder = root / folder_name
    _classnames_file(folder, wnids)
    for w, _ in keep:
        for i in range(per_class):
            _image(folder / image_dir / w / f"{name}_{w}_{i}.{'JPEG' if name == 'imagenet_sketch' else 'jpg'}")
    if name != "imagenet_sketch":
        (folder / image_dir / "README.txt").write_text("readme\n")
    return folder


def make(root: Path, name: str, n_classes: int = 4, **kw) -> Path:
    """One data set ``name`` (CoOp config name) under ``root``."""
    root = Path(root)
    if name in SPLIT_SETS:
        return make_split_dataset(root, name, n_classes, **kw)
    if name == "fgvc_aircraft":
        return make_fgvc(root, n_classes, **kw)
    if name == "imagenet":
        return make_imagenet(root, n_classes, **kw)
    return make_imagenet_shift(root, name, n_classes, **kw)
