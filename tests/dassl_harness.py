"""Real Dassl runs of ``examples/dassl_coop_prograd.py``: workspace, data, tiny models, launch.

A workspace is what a user's machine has after following the README: the official ProGrad
code (``ProGrad.public``: ``train.py``, stock CoOp and ProGrad configs, data set readers)
with the example copied, unmodified, into ``trainers/`` and imported by ``train.py``, next
to a Dassl tree (upstream Dassl.pytorch or the ProGrad fork) carrying the documented
edits for current torch (:data:`DASSL_EDITS`).  Runs happen in a
subprocess (Dassl keeps global registries and state) on a tiny OxfordPets-layout data set
of generated JPEGs and tiny randomly initialised open_clip models.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from vendor_sources import REPO

EXAMPLE = REPO / "examples" / "dassl_coop_prograd.py"
LAUNCHER = Path(__file__).with_name("dassl_launch.py")

#: Pet breeds (OxfordPets' own class names), a few images each.
CLASSES = ["abyssinian", "american_bulldog", "basset_hound", "beagle"]
IMAGE_SIZE = 32

#: Tiny open_clip configs registered in the subprocess: a ResNet tower (the stock ProGrad
#: configs use RN50) and a ViT tower (CoOp's ViT-B/16 configs; "/" maps to "-").
TINY_MODELS = {
    "tiny-RN": dict(embed_dim=32, vision_cfg=dict(image_size=IMAGE_SIZE, layers=[1, 1, 1, 1],
                                                  width=8, head_width=16),
                    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)),
    "tiny-ViT-8": dict(embed_dim=32, vision_cfg=dict(image_size=IMAGE_SIZE, layers=1, width=32,
                                                     patch_size=8, head_width=16),
                       text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2,
                                     layers=2)),
}

#: The edits a user makes to Dassl's ``dassl/optim/lr_scheduler.py`` (upstream and the
#: ProGrad fork alike), word for word as docs/coop.md gives them: (file, old text, new text).
#: 1. torch 2.6 removed LRScheduler's ``verbose`` argument: every run fails without this.
#: 2. The warm-up scheduler's state dict holds its successor (the cosine scheduler) as an
#:    object, and through it the optimizer: a resumed run then steps the learning rate of an
#:    unpickled copy while the real optimizer keeps its lr (with torch.optim.SGD as well), and
#:    torch >= 2.6 refuses such checkpoints under its ``weights_only=True`` default.  Saving
#:    the successor's own state dict instead fixes both.
WARMUP_STATE = '''        raise NotImplementedError

    def state_dict(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "successor")}
        state["successor"] = self.successor.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        successor = state.pop("successor")
        self.__dict__.update(state)
        if not isinstance(successor, dict):  # a checkpoint saved before this edit
            successor = successor.state_dict()
        self.successor.load_state_dict(successor)
'''
DASSL_EDITS = [
    ("dassl/optim/lr_scheduler.py", "super().__init__(optimizer, last_epoch, verbose)",
     "super().__init__(optimizer, last_epoch)"),
    ("dassl/optim/lr_scheduler.py", "        raise NotImplementedError\n", WARMUP_STATE),
]

#: Loading checkpoints saved by an unedited Dassl (official releases included): they pickle
#: the scheduler, so torch must be allowed to unpickle (trusted files only).
OLD_CHECKPOINTS_ENV = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}

def load_example():
    """``examples/dassl_coop_prograd.py`` as a module (without Dassl: its stand-in base)."""
    spec = importlib.util.spec_from_file_location("dassl_coop_prograd", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_dassl_edits(dassl_root: Path) -> None:
    """Apply :data:`DASSL_EDITS` (to freshly unpacked sources); fail loudly if Dassl's code is
    not what the documented edits expect."""
    for rel, old, new in DASSL_EDITS:
        path = dassl_root / rel
        text = path.read_text()
        assert text.count(old) == 1, f"{path}: expected {old!r} once (Dassl changed?)"
        path.write_text(text.replace(old, new))


def make_oxford_pets(root: Path, n_train: int = 4, n_val: int = 2, n_test: int = 3,
                     seed: int = 0) -> Path:
    """``root/oxford_pets/{images/*.jpg, split_zhou_OxfordPets.json}`` as CoOp's reader wants."""
    _make_images(root / "oxford_pets", CLASSES, "split_zhou_OxfordPets.json", n_train, n_val,
                 n_test, seed)
    return root


def _make_images(base: Path, classes: list[str], split_file: str, n_train: int, n_val: int,
                 n_test: int, seed: int) -> None:
    """``base/images/*.jpg`` (one colour per class, noise per pixel) and ``base/split_file``
    listing ``[file, label, class name]`` per split, in the layout of CoOp's split files."""
    from PIL import Image

    (base / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        colour = [(60 * label + 40) % 256, (90 * label + 120) % 256, (150 - 30 * label) % 256]
        for part, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            for i in range(n):
                file = f"{name.title()}_{part}{i}.jpg"
                pixels = bytes(max(0, min(255, c + rng.randint(-40, 40)))
                               for _ in range(40 * 40) for c in colour)
                Image.frombytes("RGB", (40, 40), pixels).save(base / "images" / file, quality=90)
                split[part].append([file, label, name])
    (base / split_file).write_text(json.dumps(split))


#: A data set of the user's own (a name none of CoOp's 15), added as one adds a data set to
#: CoOp / ProGrad: a Dassl reader registered in ``datasets/``, its config file, an import in
#: ``train.py``; ``extend_cfg`` also defines ``TRAINER.PROGRAD.TEMPLATE`` (docs/coop.md).
OWN_DATASET = "MyShapes"
OWN_CLASSES = ["red_square", "green_disc", "blue_stripes"]
OWN_READER = '''import os

from dassl.data.datasets import DATASET_REGISTRY, Datum, DatasetBase
from dassl.utils import read_json


@DATASET_REGISTRY.register()
class MyShapes(DatasetBase):
    dataset_dir = "my_shapes"

    def __init__(self, cfg):
        root = os.path.join(os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT)), self.dataset_dir)
        split = read_json(os.path.join(root, "split.json"))
        train, val, test = ([Datum(impath=os.path.join(root, "images", f), label=y, classname=c)
                             for f, y, c in split[part]] for part in ("train", "val", "test"))
        if cfg.DATASET.NUM_SHOTS >= 1:
            train = self.generate_fewshot_dataset(train, num_shots=cfg.DATASET.NUM_SHOTS)
        super().__init__(train_x=train, val=val, test=test)
'''
OWN_TEMPLATE_KEY = ('''    cfg.DATASET.SUBSAMPLE_CLASSES = "all"  # all, base or new
''', '''    cfg.TRAINER.PROGRAD = CN()
    cfg.TRAINER.PROGRAD.TEMPLATE = ""  # the teacher's template ("" : the data set's own)
''')


class Workspace:
    """The unpacked sources (``vendor``: :func:`vendor_sources.vendor_tree`) made ready as a
    user would, plus a data set and tiny model configs under ``root``."""

    def __init__(self, vendor: Path, root: Path) -> None:
        self.root = root
        self.dassl = {"upstream": vendor / "dassl",
                      "prograd_fork": vendor / "prompt_align" / "Dassl.ProGrad.pytorch"}
        if not (vendor / ".dassl_edited").exists():
            for tree in self.dassl.values():
                apply_dassl_edits(tree)
            (vendor / ".dassl_edited").touch()
        self.code = vendor / "prompt_align" / "ProGrad.public"
        self.install_example()
        self.data = make_oxford_pets(root / "data")
        self.models = root / "models"
        self.models.mkdir(exist_ok=True)
        for name, cfg in TINY_MODELS.items():
            (self.models / f"{name}.json").write_text(json.dumps(cfg))

    def install_example(self) -> None:
        """The README's two steps: copy the example into trainers/, import it in train.py."""
        shutil.copyfile(EXAMPLE, self.code / "trainers" / EXAMPLE.name)
        train_py = self.code / "train.py"
        text = train_py.read_text()
        line = "import trainers.dassl_coop_prograd\n"
        if line not in text:
            anchor = "import trainers.prograd\n"
            assert anchor in text
            train_py.write_text(text.replace(anchor, anchor + line))

    def with_own_dataset(self, dest: Path) -> "Workspace":
        """A copy of this workspace whose code (copied to ``dest``) has :data:`OWN_DATASET`
        added as a user adds a data set, and its data under this workspace's data root."""
        own = copy.copy(self)
        own.code = dest / self.code.name
        shutil.copytree(self.code, own.code)
        (own.code / "datasets" / "my_shapes.py").write_text(OWN_READER)
        (own.code / "configs" / "datasets" / "my_shapes.yaml").write_text(
            f'DATASET:\n  NAME: "{OWN_DATASET}"\n')
        train_py = own.code / "train.py"
        text = train_py.read_text()
        anchor, key = OWN_TEMPLATE_KEY
        assert text.count(anchor) == 1 and "import datasets.oxford_pets\n" in text
        text = text.replace(anchor, anchor + key)
        text = text.replace("import datasets.oxford_pets\n",
                            "import datasets.oxford_pets\nimport datasets.my_shapes\n")
        train_py.write_text(text)
        _make_images(self.data / "my_shapes", OWN_CLASSES, "split.json", 4, 2, 3, seed=1)
        return own

    def config(self, rel: str) -> str:
        return str(self.code / "configs" / rel)

    def run(self, dassl: str, args: list[str], out: Path, env: dict | None = None,
            timeout: float = 300) -> str:
        """``python train.py ARGS`` inside Dassl tree ``dassl``; returns its output, raising
        with the output's tail when it fails."""
        env = dict(os.environ, **(env or {}), PROGRAD_FAST_TEST_MODELS=str(self.models),
                   PYTHONPATH=os.pathsep.join([str(self.dassl[dassl]),
                                               os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        argv = [sys.executable, str(LAUNCHER), str(self.code / "train.py"),
                "--root", str(self.data), "--output-dir", str(out), *args]
        proc = subprocess.run(argv, cwd=self.code, env=env, capture_output=True, text=True,
                              timeout=timeout)
        text = proc.stdout + proc.stderr
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / f"{out.name}.log").write_text(text)  # kept for a failing test's reader
        if proc.returncode != 0:
            raise AssertionError(f"train.py failed (exit {proc.returncode}) in {dassl} Dassl:\n"
                                 + text[-6000:])
        return text
