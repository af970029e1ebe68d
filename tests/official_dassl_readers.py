"""Run the official CoOp/ProGrad dataset readers (ProGrad.public/datasets, Dassl fork) on a
data root and print what they produce, as JSON.  Run in a subprocess by the tests:

    python official_dassl_readers.py PROMPT_ALIGN_DIR REQUESTS_JSON OUT_JSON

REQUESTS_JSON: [{"dataset": "OxfordPets", "root": ..., "shots": K, "seed": S,
"subsample": "all"|"base"|"new"}, ...].  Each request seeds ``random`` as Dassl's
``set_random_seed`` does, builds the dataset class like ``train.py`` does and records
train_x / val / test as [impath, label, classname] and the class names.  Only ``gdown``
(a download helper never called here) is stubbed.
"""

import importlib
import json
import random
import sys
import types
from pathlib import Path

MODULES = {"ImageNet": "imagenet", "Caltech101": "caltech101", "OxfordPets": "oxford_pets",
           "StanfordCars": "stanford_cars", "OxfordFlowers": "oxford_flowers", "Food101": "food101",
           "FGVCAircraft": "fgvc_aircraft", "SUN397": "sun397", "DescribableTextures": "dtd",
           "EuroSAT": "eurosat", "UCF101": "ucf101", "ImageNetV2": "imagenetv2",
           "ImageNetSketch": "imagenet_sketch", "ImageNetA": "imagenet_a", "ImageNetR": "imagenet_r"}


def main(prompt_align: str, requests: str, out: str) -> None:
    base = Path(prompt_align)
    sys.path[:0] = [str(base / "ProGrad.public"), str(base / "Dassl.ProGrad.pytorch")]
    sys.modules["gdown"] = types.ModuleType("gdown")
    results = []
    for req in json.loads(Path(requests).read_text()):
        module = importlib.import_module("datasets." + MODULES[req["dataset"]])
        cls = getattr(module, req["dataset"])
        cfg = types.SimpleNamespace(SEED=req["seed"], DATASET=types.SimpleNamespace(
            ROOT=req["root"], NUM_SHOTS=req["shots"], SUBSAMPLE_CLASSES=req["subsample"]))
        random.seed(req["seed"])  # dassl.utils.set_random_seed
        ds = cls(cfg)

        def rows(items):
            return [[d.impath, int(d.label), d.classname] for d in (items or [])]

        results.append({"train": rows(ds.train_x), "val": rows(ds.val), "test": rows(ds.test),
                        "classnames": list(ds.classnames)})
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4])
