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
    from PIL import Image

    base = root / "oxford_pets"
    (base / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        colour = [(60 * label + 40) % 256, (90 * label + 120) % 256, (150 - 30 * label) % 256]
        for part, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            for i in range(n):
                file = f"{name.title()}_{part}{i}.jpg"
                pixels = bytes(max(0, min(255, c + rng.randint(-40, 40)))
                               for _ in range(40 * 40) for c in colour)
                Image.frombytes("RGB", (40, 40), pixels).save(base / "images" / file, quality=90)
                split[part].append([file, label, name])
    (base / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


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
