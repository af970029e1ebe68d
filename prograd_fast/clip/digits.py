"""The embedded default: a tiny CLIP pretrained by the package on scikit-learn's digits.

Needs no download: scikit-learn ships 1,797 real 8x8 handwritten digits.  Half of them
(``"pretrain"``) teach a tiny open_clip ``CLIP`` (16x16 input) to match digits with
captions ("a handwritten seven", ...); the other half is the downstream few-shot task,
under a domain shift (:func:`shift`) that leaves the zero-shot model something to learn.
The pretrained weights are cached (:func:`cache_dir`) after the first run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DIGIT_NAMES", "TINY_CLIP_CONFIG", "cache_dir", "digits_data", "shift",
           "pretrain_tiny_clip", "load_tiny_clip", "DigitsTask"]

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = ["a handwritten {}.", "a handwritten {}", "the digit {}.", "a drawing of a {}.",
            "the number {}.", "a scan of a handwritten {}."]
TINY_CLIP_CONFIG = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=16, layers=3, width=96, patch_size=4, head_width=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=96, heads=3, layers=3),
)
PRETRAIN = dict(steps=300, batch_size=128, lr=1e-3, weight_decay=0.1, seed=0)
SPLIT_SEED = 1234
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def cache_dir() -> Path:
    """``$PROGRAD_FAST_CACHE`` or ``~/.cache/prograd_fast``."""
    path = Path(os.environ.get("PROGRAD_FAST_CACHE") or Path.home() / ".cache" / "prograd_fast")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _to_images(x: Tensor) -> Tensor:
    """(N, 8, 8) in [0, 1] -> normalised (N, 3, 16, 16)."""
    x = F.interpolate(x.unsqueeze(1), size=16, mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def digits_data() -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's digits as ``{"pretrain", "downstream"}`` -> (images (N,8,8) in [0,1],
    labels): a fixed, class-stratified half/half split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the embedded digits default needs scikit-learn "
                          "(pip install 'prograd_fast[demo]')") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    pre, down = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        pre.append(idx[: len(idx) // 2])
        down.append(idx[len(idx) // 2:])
    pre, down = torch.cat(pre), torch.cat(down)
    return {"pretrain": (x[pre], y[pre]), "downstream": (x[down], y[down])}


def shift(x: Tensor, seed: int, kind: str = "occlude") -> Tensor:
    """The downstream domain shift on (N, 8, 8) digits in [0, 1], deterministic per seed.

    ``"occlude"`` blanks a random 3x3 patch per image; ``"noise"`` adds N(0, 0.35^2);
    ``"thick"`` dilates the strokes (3x3 max) ; ``"none"`` leaves the digits clean.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return x.clone()
    if kind == "noise":
        return (x + 0.35 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "thick":
        return F.max_pool2d(x.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)
    if kind == "occlude":
        out = x.clone()
        n = x.shape[0]
        r = torch.randint(1, 5, (n,), generator=g)
        c = torch.randint(1, 5, (n,), generator=g)
        rows = torch.arange(8).view(1, 8, 1)
        cols = torch.arange(8).view(1, 1, 8)
        mask = ((rows >= r.view(-1, 1, 1)) & (rows < r.view(-1, 1, 1) + 3)
                & (cols >= c.view(-1, 1, 1)) & (cols < c.view(-1, 1, 1) + 3))
        return out.masked_fill(mask, 0.0)
    raise ValueError(f"unknown shift {kind!r}")


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random +-1 pixel translations of (N, 8, 8) digits (pretraining only)."""
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (x.shape[0],), generator=g)
    dx = torch.randint(0, 3, (x.shape[0],), generator=g)
    rows = (dy.view(-1, 1) + torch.arange(8)).view(-1, 8, 1)
    cols = (dx.view(-1, 1) + torch.arange(8)).view(-1, 1, 8)
    return padded[torch.arange(x.shape[0]).view(-1, 1, 1), rows, cols]


def _cache_file() -> Path:
    key = json.dumps([TINY_CLIP_CONFIG, PRETRAIN, CAPTIONS, SPLIT_SEED], sort_keys=True)
    return cache_dir() / f"digits_tiny_clip_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"


def _new_model():
    import open_clip

    return open_clip.CLIP(**TINY_CLIP_CONFIG)


def pretrain_tiny_clip(steps: int | None = None, log=print):
    """Contrastive pretraining of the tiny CLIP on the ``pretrain`` digits with captions.

    Returns ``(model, info)``; ``info["zeroshot_acc"]`` is the accuracy of "a handwritten
    {}." on the clean downstream digits.  Soft targets treat same-class pairs as matches
    (a batch of 128 holds each caption many times).
    """
    from .prompt import default_tokenizer

    cfg = dict(PRETRAIN, steps=steps or PRETRAIN["steps"])
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    data = digits_data()
    x, y = data["pretrain"]
    tok = default_tokenizer(TINY_CLIP_CONFIG["text_cfg"]["context_length"])
    caption_tokens = torch.stack([tok([t.format(n) for n in DIGIT_NAMES]) for t in CAPTIONS])
    model = _new_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["steps"],
                                                pct_start=0.1)
    start = time.time()
    for step in range(cfg["steps"]):
        idx = torch.randint(0, len(x), (cfg["batch_size"],), generator=g)
        labels = y[idx]
        which = torch.randint(0, len(CAPTIONS), (len(idx),), generator=g)
        images = _to_images(_augment(x[idx], g))
        img = F.normalize(model.encode_image(images), dim=-1)
        # every caption once (60 of them), then gathered: half the text work of 128
        all_txt = model.encode_text(caption_tokens.flatten(0, 1))
        txt = F.normalize(all_txt[which * len(DIGIT_NAMES) + labels], dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        same = (labels.view(-1, 1) == labels.view(1, -1)).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if log and (step + 1) % 100 == 0:
            log(f"  pretraining tiny CLIP: step {step + 1}/{cfg['steps']}  loss {loss.item():.3f}"
                f"  ({time.time() - start:.0f} s)")
    model.eval()
    acc = zeroshot_accuracy(model, *data["downstream"])
    return model, {"zeroshot_acc": acc, "seconds": time.time() - start, **cfg}


@torch.no_grad()
def zeroshot_accuracy(model, x: Tensor, y: Tensor, template: str = "a handwritten {}.") -> float:
    """Zero-shot accuracy of ``model`` on (N, 8, 8) digits with one template."""
    from .prompt import default_tokenizer

    tok = default_tokenizer(TINY_CLIP_CONFIG["text_cfg"]["context_length"])
    txt = F.normalize(model.encode_text(tok([template.format(n) for n in DIGIT_NAMES])), dim=-1)
    img = F.normalize(model.encode_image(_to_images(x)), dim=-1)
    return float(((img @ txt.t()).argmax(1) == y).float().mean())


def load_tiny_clip(log=print):
    """The pretrained tiny digits CLIP: from the cache, or pretrained now and cached."""
    path = _cache_file()
    model = _new_model()
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        return model.eval(), blob["info"]
    if log:
        log(f"First run: pretraining the embedded tiny CLIP on scikit-learn digits "
            f"(cached afterwards in {path})")
    model, info = pretrain_tiny_clip(log=log)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
    tmp.replace(path)
    return model, info


class DigitsTask:
    """Downstream digits under the shift, as tensors: ``train`` (pool for few-shot
    sampling) and ``test`` halves, labels 0-9 named :data:`DIGIT_NAMES`."""

    classnames = DIGIT_NAMES
    mean, std = MEAN, STD

    def __init__(self, kind: str = "occlude") -> None:
        x, y = digits_data()["downstream"]
        x = shift(x, seed=SPLIT_SEED + 1, kind=kind)
        g = torch.Generator().manual_seed(SPLIT_SEED + 2)
        perm = torch.randperm(len(x), generator=g)
        half = len(x) // 2
        self.kind = kind
        self.train = (_to_images(x[perm[:half]]), y[perm[:half]])
        self.test = (_to_images(x[perm[half:]]), y[perm[half:]])



def digits_split(shift_kind: str = "occlude"):
    """The digits as a :class:`~prograd_fast.datasets.items.Split` of indices (train, no
    val, test), the base/new subsampler and ``make(items, train)`` -> a ``TensorDataset`` of
    the shifted images: what ``prograd-fast train`` and ``eval`` read for ``--data digits``."""
    from torch.utils.data import TensorDataset

    from ..datasets.items import Item, Split, subsample_classes

    task = DigitsTask(shift_kind)
    split = Split([Item(i, int(y)) for i, y in enumerate(task.train[1])], [],
                  [Item(i, int(y)) for i, y in enumerate(task.test[1])], list(DIGIT_NAMES))

    def to_ds(items, source):
        idx = torch.tensor([it.path for it in items], dtype=torch.long)
        return TensorDataset(source[0][idx], torch.tensor([it.label for it in items]))

    return split, subsample_classes, (lambda items, train: to_ds(items, task.train if train else task.test))
