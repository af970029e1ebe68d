"""Few-shot sampling, ImageFolder / CoOp split JSON loading, base-to-new subsampling."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from prograd_fast.clip.data import (ImageDataset, Item, coop_transforms, few_shot, load_coop_split,
                                    load_dataset, load_image_folder, subsample_classes)


def make_tree(root, classes=("cat", "dog", "sea_lion"), per_class=(5, 3, 4), splits=("train", "test"),
              size=20):
    rng = np.random.default_rng(0)
    for split in splits:
        for c, n in zip(classes, per_class):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_image_folder_layout(tmp_path):
    split = load_image_folder(make_tree(tmp_path))
    assert split.classnames == ["cat", "dog", "sea_lion"]
    assert Counter(it.label for it in split.train) == {0: 5, 1: 3, 2: 4}
    assert split.val == split.test and len(split.test) == 12
    assert load_dataset(tmp_path).classnames == split.classnames


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        load_image_folder(tmp_path)
    make_tree(tmp_path, splits=("train",))
    with pytest.raises(FileNotFoundError, match="val/ or test/"):
        load_image_folder(tmp_path)
    (tmp_path / "test" / "zebra").mkdir(parents=True)
    with pytest.raises(ValueError, match="zebra"):
        load_image_folder(tmp_path)


def test_coop_split_json(tmp_path):
    make_tree(tmp_path / "images", splits=("train",))
    rows = [[f"train/{c}/{i}.png", y, c] for y, (c, n) in enumerate(zip(["cat", "dog", "sea_lion"], (5, 3, 4)))
            for i in range(n)]
    (tmp_path / "split_zhou_Toy.json").write_text(json.dumps({"train": rows[:10], "val": rows[10:], "test": rows}))
    split = load_dataset(tmp_path)
    assert split.classnames == ["cat", "dog", "sea_lion"]
    assert len(split.train) == 10 and len(split.val) == 2 and len(split.test) == 12
    assert all(str(tmp_path / "images") in it.path for it in split.train)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [["a.png", 0, "cat"], ["b.png", 0, "dog"]]}))
    with pytest.raises(ValueError, match="both"):
        load_coop_split(bad)


@pytest.mark.parametrize("shots", [1, 2, 4, 7])
def test_few_shot_is_seeded_and_per_class(shots):
    items = [Item(f"{y}_{i}", y) for y in range(5) for i in range(3 + y)]
    a = few_shot(items, shots, seed=3)
    assert a == few_shot(items, shots, seed=3)
    counts = Counter(it.label for it in a)
    assert counts == {y: min(shots, 3 + y) for y in range(5)}
    assert len(set(it.path for it in a)) == len(a)
    if shots < 3:
        assert a != few_shot(items, shots, seed=4) or few_shot(items, shots, seed=5) != a
    assert few_shot(items, 0, seed=1) == items


def test_subsample_base_new():
    items = [Item(str(y), y) for y in range(5)]
    from prograd_fast.clip.data import Split
    split = Split(items, items, items, list("abcde"))
    base, new = subsample_classes(split, "base"), subsample_classes(split, "new")
    assert base.classnames == ["a", "b", "c"] and new.classnames == ["d", "e"]
    assert [it.label for it in new.test] == [0, 1] and [it.path for it in new.test] == ["3", "4"]
    assert subsample_classes(split, "all") is split
    with pytest.raises(ValueError):
        subsample_classes(split, "half")


def test_dataset_and_transforms(tmp_path):
    split = load_image_folder(make_tree(tmp_path))
    torch.manual_seed(0)
    ds = ImageDataset(split.train, coop_transforms(16, augment=True))
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y.item() == split.train[0].label
    x2, _ = ImageDataset(split.train, coop_transforms(16, augment=False))[0]
    assert x2.shape == (3, 16, 16) and torch.isfinite(x2).all()


def test_a_split_file_is_read_by_the_one_coop_split_reader(tmp_path):
    """``--data split.json`` and ``--dataset NAME`` read CoOp's split file with the same reader:
    a malformed row is named the same way (not a bare int() error)."""
    bad = tmp_path / "split_zhou_Toy.json"
    bad.write_text(json.dumps({"train": [["a.png", "zero", "cat"]], "val": [], "test": []}))
    with pytest.raises(ValueError, match=r"train\[0\] is \['a.png', 'zero', 'cat'\], expected "
                                          r"\[impath, label, classname\]"):
        load_coop_split(bad)
