"""The image-feature cache: a hit only when model weights, image files, labels, transform and
autocast dtype are all unchanged; each change is a miss; a hit equals encoding again."""

import os

import torch

import coop_layouts as L
from clip_helpers import tiny_clip
from prograd_fast.clip.data import Item, coop_transforms
from prograd_fast.datasets import load_split
from prograd_fast.protocols.features import FeatureCache, model_fingerprint


class Counting:
    def __init__(self, model):
        self.model, self.images = model, 0

    def __call__(self, x):
        self.images += x.shape[0]
        return torch.nn.functional.normalize(self.model.encode_image(x), dim=-1)


def test_cache_key_covers_model_files_labels_transform_and_precision(tmp_path):
    L.make(tmp_path / "data", "dtd")
    _, split = load_split("dtd", tmp_path / "data")
    items = split.test
    model = tiny_clip()
    tf = coop_transforms(16, augment=False)
    cache_dir = tmp_path / "cache"

    def get(m=model, its=items, t=tf, autocast=None):
        enc = Counting(m)
        cache = FeatureCache(cache_dir, autocast_dtype=autocast, batch_size=3)
        feats, labels = cache.get(m, its, t, encode=enc)
        return feats, labels, enc.images, cache

    feats, labels, encoded, cache = get()
    assert encoded == len(items) and cache.misses == 1 and feats.shape == (len(items), 24)
    assert labels.tolist() == [it.label for it in items]
    again, _, encoded, cache = get()
    assert encoded == 0 and cache.hits == 1 and torch.equal(again, feats)
    assert len(list(cache_dir.iterdir())) == 1

    # each part of the key: a miss, and a new entry
    assert get(m=tiny_clip(seed=1))[2] == len(items)                     # other weights
    assert get(t=coop_transforms(16, mean=(0.5,) * 3, augment=False))[2] == len(items)  # preprocessing
    assert get(t=coop_transforms(20, augment=False))[2] == len(items)    # image size
    assert get(autocast=torch.bfloat16)[2] == len(items)                 # precision
    relabelled = [Item(it.path, (it.label + 1) % 4) for it in items]
    assert get(its=relabelled)[2] == len(items)                          # labels
    st = os.stat(items[0].path)
    os.utime(items[0].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert get()[2] == len(items)                                        # a touched image
    with open(items[1].path, "ab") as f:                                 # a rewritten image
        f.write(b"\0")
    assert get()[2] == len(items)
    assert get()[2] == 0                                                 # and stable again
    assert len(list(cache_dir.iterdir())) == 8


def test_model_fingerprint_sees_in_place_changes_on_refresh():
    model = tiny_clip()
    fp = model_fingerprint(model)
    assert model_fingerprint(tiny_clip()) == fp  # same weights, other object
    with torch.no_grad():
        model.visual.conv1.weight[0, 0, 0, 0] += 1e-6
    assert model_fingerprint(model) == fp  # memoised: the grid's CLIP is frozen
    assert model_fingerprint(model, refresh=True) != fp


def test_a_hit_equals_encoding_the_images(tmp_path):
    L.make(tmp_path / "data", "eurosat")
    _, split = load_split("eurosat", tmp_path / "data")
    model = tiny_clip()
    tf = coop_transforms(16, augment=False)
    FeatureCache(tmp_path / "c").get(model, split.test, tf)
    cached, _ = FeatureCache(tmp_path / "c").get(model, split.test, tf, encode=lambda x: 1 / 0)
    from prograd_fast.clip.data import ImageDataset
    images = torch.stack([ImageDataset(split.test, tf)[i][0] for i in range(len(split.test))])
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    torch.testing.assert_close(cached, want, rtol=1e-5, atol=1e-6)
