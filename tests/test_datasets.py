"""CoOp's data sets by name: every on-disk layout of DATASETS.md, the official readers'
output on the same files (run in a subprocess), Dassl's few-shot draw, CoOp's cached
few-shot pickles (read safely), and one clear error line for each bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import coop_layouts as L
from prograd_fast.clip.data import Split, few_shot, subsample_classes
from prograd_fast.datasets import (DATASETS, DatasetError, dataset_folder, few_shot_train,
                                   fewshot_pickle_path, get_spec, load_split, read_fewshot_pickle)
from vendor_sources import PROMPT_ALIGN, unpack

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coop_data")
    for name in L.ALL:
        L.make(root, name)
    return root


@pytest.mark.parametrize("name", L.ALL)
def test_every_layout_reads_with_class_names(root, name):
    spec, split = load_split(name, root)
    assert spec.name == name
    if name in ("imagenet_a", "imagenet_r"):  # 200-class subsets named through classnames.txt
        assert split.classnames == ([n for _, n in L.WNIDS[:4]][1::2] if name == "imagenet_a"
                                    else [n for _, n in L.WNIDS[:4]][::2])
    else:
        assert len(split.classnames) == 4
    assert Counter(it.label for it in split.test) == {y: len(split.test) // len(split.classnames)
                                                     for y in range(len(split.classnames))}
    assert all(os.path.isfile(it.path) for it in split.train + split.val + split.test)
    if not spec.test_only:
        assert {it.label for it in split.train} == set(range(4))


def test_names_and_dassl_names():
    assert get_spec("OxfordPets") is DATASETS["oxford_pets"] is get_spec("oxford_pets")
    assert get_spec("dtd").dassl == "DescribableTextures" and get_spec("ImageNet-A").name == "imagenet_a"
    with pytest.raises(DatasetError, match="unknown data set 'pets'"):
        get_spec("pets")


# ---------------------------------------------------------------- Dassl's draw and pickles
def test_draw_is_dasslss_sampling():
    """random.Random(seed).sample per class, classes in first-appearance order, a class with
    exactly K items is still sampled (a permutation), fewer: kept whole in order."""
    import random
    from prograd_fast.clip.data import Item
    items = [Item(f"{y}_{i}", y) for i in range(4) for y in (2, 0, 1)] + [Item("3_0", 3)]
    rng = random.Random(5)
    want = []
    for y in (2, 0, 1):
        want += rng.sample([it for it in items if it.label == y], 4)
    want += [items[-1]]
    assert few_shot(items, 4, 5) == want
    assert few_shot(items, 0, 5) == items


def _official(prompt_align, requests, tmp_path):
    req = tmp_path / "requests.json"
    out = tmp_path / "official.json"
    req.write_text(json.dumps(requests))
    proc = subprocess.run([sys.executable, str(HERE / "official_dassl_readers.py"), str(prompt_align),
                           str(req), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _rows(items, classnames):
    return [[it.path, it.label, classnames[it.label]] for it in items]


def test_agrees_with_the_official_readers(tmp_path_factory, tmp_path):
    """Same files -> the official Dassl readers and ours give the same train (few-shot draw,
    then base/new), val and test items, labels and class names; the pickles they write are
    read back to the same selection."""
    pytest.importorskip("scipy")  # imported by the official StanfordCars / Flowers readers
    prompt_align = unpack(PROMPT_ALIGN, tmp_path_factory.mktemp("prompt_align"))
    root = tmp_path / "data"
    for name in L.ALL:
        L.make(root, name, **({"total_classes": 1000} if name == "imagenetv2" else {}))
    cases = []
    for name in L.ALL:
        spec = get_spec(name)
        if spec.test_only:
            cases.append((name, 0, 1, "all"))
        else:
            cases += [(name, 2, 1, "base"), (name, 3, 2, "new"), (name, 0, 1, "all")]
    official = _official(prompt_align, [{"dataset": get_spec(n).dassl, "root": str(root), "shots": k,
                                         "seed": s, "subsample": sub} for n, k, s, sub in cases], tmp_path)
    for (name, shots, seed, sub), off in zip(cases, official):
        spec, full = load_split(name, root)
        folder = dataset_folder(spec, root)
        drawn = few_shot(full.train, shots, seed) if not spec.test_only else full.train
        for train in (drawn, few_shot_train(spec, folder, full, shots, seed)[0] if not spec.test_only else drawn):
            ours = subsample_classes(Split(train, full.val, full.test, full.classnames), sub)
            assert _rows(ours.train, ours.classnames) == off["train"], (name, shots, seed, sub)
            assert _rows(ours.test, ours.classnames) == off["test"], name
            if name == "imagenetv2":  # Dassl names only labels with images: 4 of the 1000 here
                assert ours.classnames[:4] == off["classnames"] and len(ours.classnames) == 1000
            else:
                assert ours.classnames == off["classnames"], name
        if shots == 0 and not spec.test_only and name != "imagenet":
            assert _rows(full.val, full.classnames) == off["val"], name
        if shots:
            assert fewshot_pickle_path(folder, shots, seed).is_file()  # written by Dassl
            assert few_shot_train(spec, folder, full, shots, seed)[1].endswith(".pkl")
    # a pickle is preferred to the draw: seed 9 reuses seed 1's cached selection
    spec, full = load_split("oxford_pets", root)
    folder = dataset_folder(spec, root)
    pkl = fewshot_pickle_path(folder, 2, 1)
    pkl.with_name("shot_2-seed_9.pkl").write_bytes(pkl.read_bytes())
    assert few_shot_train(spec, folder, full, 2, 9)[0] == few_shot(full.train, 2, 1) != few_shot(full.train, 2, 9)


class _Datum:  # what Dassl pickles, under its real module path
    def __init__(self, impath, label, classname):
        self._impath, self._label, self._domain, self._classname = impath, label, 0, classname


_Datum.__module__, _Datum.__qualname__ = "dassl.data.datasets.base_dataset", "Datum"


def _write_pickle(path, data):
    import types
    mod = types.ModuleType("dassl.data.datasets.base_dataset")
    mod.Datum = _Datum
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update({n: types.ModuleType(n) for n in names[:-1]})
    sys.modules[names[-1]] = mod
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def test_pickle_from_another_machine_is_matched_by_path(tmp_path):
    L.make(tmp_path, "eurosat")
    spec, full = load_split("eurosat", tmp_path)
    folder = dataset_folder(spec, tmp_path)
    chosen = [full.train[5], full.train[0]]
    other = [_Datum("/data1/CoOpData/eurosat/" + os.path.relpath(it.path, folder), it.label,
                    full.classnames[it.label]) for it in chosen]
    pkl = fewshot_pickle_path(folder, 1, 3)
    _write_pickle(pkl, {"train": other, "val": []})
    assert few_shot_train(spec, folder, full, 1, 3) == (chosen, str(pkl))
    # wrong label for the image -> refused, naming the file
    _write_pickle(pkl, {"train": [_Datum(other[0]._impath, (chosen[0].label + 1) % 4, "Forest")]})
    with pytest.raises(DatasetError, match=r"shot_1-seed_3\.pkl: train\[0\] .* has label"):
        few_shot_train(spec, folder, full, 1, 3)
    _write_pickle(pkl, {"train": [_Datum("/x/eurosat/2750/Forest/not_there.jpg", 1, "Forest")]})
    with pytest.raises(DatasetError, match="not an image of this train split"):
        few_shot_train(spec, folder, full, 1, 3)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def test_pickle_with_other_objects_is_refused_unrun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    L.make(tmp_path, "dtd")
    spec, full = load_split("dtd", tmp_path)
    folder = dataset_folder(spec, tmp_path)
    pkl = fewshot_pickle_path(folder, 1, 1)
    pkl.parent.mkdir()
    pkl.write_bytes(pickle.dumps({"train": [_Evil()]}))
    with pytest.raises(DatasetError, match=r"shot_1-seed_1\.pkl: not a Dassl few-shot split \(refused to load posix.system"):
        few_shot_train(spec, folder, full, 1, 1)
    assert not (tmp_path / "EVIL_RAN").exists()
    pkl.write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a Dassl few-shot split"):
        read_fewshot_pickle(pkl, full.train, full.classnames, folder)
    # corrupt files whose opcodes announce absurd sizes (MemoryError, OverflowError): one line too
    for junk in (b"\x96\xf0!+\x14!sB\x14\x99", b"\x95tH\x93a5\xde\xeb\xa9\xc4V"):
        pkl.write_bytes(junk)
        with pytest.raises(DatasetError, match="not a Dassl few-shot split"):
            read_fewshot_pickle(pkl, full.train, full.classnames, folder)


# ---------------------------------------------------------------- bad inputs: one clear line
def _error(fn) -> str:
    with pytest.raises(DatasetError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_name_the_file_and_what_was_expected(tmp_path):
    assert "data root not found" in _error(lambda: load_split("dtd", tmp_path / "nowhere"))
    msg = _error(lambda: load_split("oxford_pets", tmp_path))
    assert f"{tmp_path}/oxford_pets: missing OxfordPets data set folder" in msg
    assert "split_zhou_OxfordPets.json" in msg
    folder = L.make(tmp_path, "oxford_pets")
    split_file = folder / "split_zhou_OxfordPets.json"
    good = split_file.read_text()
    split_file.unlink()
    assert f"{split_file}: missing CoOp split file" in _error(lambda: load_split("oxford_pets", tmp_path))
    split_file.write_text(good[:-5])
    assert f"{split_file}: not valid JSON" in _error(lambda: load_split("oxford_pets", tmp_path))
    data = json.loads(good)
    data["test"][0] = ["x.jpg", "cat"]
    split_file.write_text(json.dumps(data))
    assert f"{split_file}: test[0] is ['x.jpg', 'cat'], expected [impath, label, classname]" in _error(
        lambda: load_split("oxford_pets", tmp_path))
    data = json.loads(good)
    data["val"][0][2] = "wrong_name"
    split_file.write_text(json.dumps(data))
    assert "class names must match their labels" in _error(lambda: load_split("oxford_pets", tmp_path))
    split_file.write_text(good)
    # an ImageFolder tree where CoOp's layout is expected: the image folder is missing
    (folder / "images").rename(folder / "train")
    assert f"{folder}/images: missing image folder" in _error(lambda: load_split("oxford_pets", tmp_path))


def test_bad_imagenet_layouts(tmp_path):
    folder = L.make(tmp_path, "imagenet")
    (folder / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    msg = _error(lambda: load_split("imagenet", tmp_path))
    assert f"{folder}/classnames.txt: no class name for folder 'n01484850'" in msg
    L.make(tmp_path, "imagenet")
    os.rename(folder / "images" / "val" / "n01440764", folder / "images" / "val" / "n01440765")
    assert "train/ and val/ must hold the same class folders" in _error(lambda: load_split("imagenet", tmp_path))
    v2 = L.make(tmp_path, "imagenetv2")
    shutil.rmtree(v2 / "imagenetv2-matched-frequency-format-val" / "3")
    assert "/3: missing class folder (expected folders 0..3" in _error(lambda: load_split("imagenetv2", tmp_path))
    a = L.make(tmp_path, "imagenet_a")
    (a / "classnames.txt").unlink()
    assert f"{a}/classnames.txt: missing classnames.txt" in _error(lambda: load_split("imagenet_a", tmp_path))


def test_bad_fgvc(tmp_path):
    folder = L.make(tmp_path, "fgvc_aircraft")
    path = folder / "images_variant_val.txt"
    path.write_text(path.read_text() + "1234567 Boeing 999\n")
    msg = _error(lambda: load_split("fgvc_aircraft", tmp_path))
    assert f"{path}:9: '1234567 Boeing 999' is not '<image id> <variant>'" in msg


@pytest.mark.parametrize("name,file", [("dtd", "split_zhou_DescribableTextures.json"),
                                       ("fgvc_aircraft", "variants.txt"),
                                       ("fgvc_aircraft", "images_variant_test.txt"),
                                       ("imagenet_a", "classnames.txt")])
def test_a_text_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, name, file):
    path = L.make(tmp_path, name) / file
    path.write_bytes(path.read_bytes() + "caf\u00e9\n".encode("latin-1"))
    assert f"{path}: not UTF-8 text" in _error(lambda: load_split(name, tmp_path))


def test_a_missing_training_image_is_one_line_before_training(tmp_path):
    L.make(tmp_path, "dtd")
    spec, full = load_split("dtd", tmp_path)
    os.unlink(full.train[2].path)  # 4 images per class: a 4-shot draw takes every one
    msg = _error(lambda: few_shot_train(spec, dataset_folder(spec, tmp_path), full, 4, 1))
    assert msg.startswith(f"{full.train[2].path}: image listed by the split is missing")


def test_a_data_set_without_test_images_is_one_line(tmp_path):
    folder = L.make(tmp_path, "dtd")
    split = folder / "split_zhou_DescribableTextures.json"
    split.write_text(json.dumps({**json.loads(split.read_text()), "test": []}))
    assert f"{folder}: no test images" in _error(lambda: load_split("dtd", tmp_path))
    a = L.make(tmp_path, "imagenet_a")  # its class folders, all empty
    for image in (a / "imagenet-a").glob("*/*"):
        image.unlink()
    assert f"{a}: no test images" in _error(lambda: load_split("imagenet_a", tmp_path))
