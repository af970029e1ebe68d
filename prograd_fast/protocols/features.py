"""An on-disk cache of image features, keyed by content.

A test set's image features depend only on the frozen image tower, the images and the
preprocessing, so they are computed once and reused by every method, seed, shot count and
epoch of a grid (and by later grids).  The key is a SHA-256 over:

* the model: every parameter and buffer of the CLIP model (names, dtypes, shapes, bytes);
* the images: each file's path, size and modification time (``os.stat``), with its label;
  content changed in place without a new size or mtime is not detected;
* the preprocessing: ``repr`` of the transform (sizes, interpolation, mean and std);
* the autocast dtype the features are computed in, and a format version.

Any change gives a new key, so a stale entry is never read; entries are written
atomically.  Under torchrun each process computes a share and the features are gathered.
Training features are cached only on request (``--cache-train-features``): they are
computed once with the *test* transform, so training then sees no random augmentation
(different from CoOp's training, which augments every epoch).
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..atomic import atomic_torch_save
from ..clip import parallel
from ..clip.data import ImageDataset, Item
from ..datasets.registry import DatasetError

__all__ = ["FeatureCache", "model_fingerprint", "items_fingerprint", "FORMAT"]

FORMAT = "prograd_fast-image-features-v1"
_MODEL_FP: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def model_fingerprint(model: nn.Module, refresh: bool = False) -> str:
    """SHA-256 of every parameter and buffer of ``model`` (memoised per model object: the
    CLIP is frozen; ``refresh=True`` after changing its weights in place)."""
    if not refresh and model in _MODEL_FP:
        return _MODEL_FP[model]
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    _MODEL_FP[model] = h.hexdigest()
    return _MODEL_FP[model]


def items_fingerprint(items: Sequence[Item]) -> str:
    """SHA-256 of the items' paths, labels, sizes and modification times; a missing file
    raises one line naming it."""
    h = hashlib.sha256()
    for it in items:
        try:
            st = os.stat(it.path)
        except OSError:
            raise DatasetError(f"{it.path}: image listed by the split is missing") from None
        h.update(f"{it.path}\0{it.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class FeatureCache:
    """``get(model, items, transform)`` -> ``(features, labels)`` on the CPU (float32,
    L2-normalised rows, in the order of ``items``), computed on a miss and stored as
    ``<root>/<key>.pt``.  ``hits`` / ``misses`` count lookups in this process."""

    def __init__(self, root: str | Path | None, device: torch.device | str = "cpu",
                 batch_size: int = 100, num_workers: int = 0,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.device = torch.device(device)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.autocast_dtype = autocast_dtype
        self.hits = self.misses = 0

    def key(self, model: nn.Module, items: Sequence[Item], transform: Callable) -> tuple[str, dict]:
        meta = {"format": FORMAT, "model": model_fingerprint(model),
                "images": items_fingerprint(items), "n": len(items),
                "transform": repr(transform), "autocast": str(self.autocast_dtype)}
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest(), meta

    def get(self, model: nn.Module, items: Sequence[Item], transform: Callable,
            encode: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``model`` is the CLIP model (its weights key the entry); ``encode`` maps a batch of
        images to normalised features (default: ``normalize(model.encode_image(x))``)."""
        key, meta = self.key(model, items, transform) if parallel.is_main() else (None, None)
        key, meta = parallel.broadcast_object((key, meta))
        path = self.root / f"{key}.pt" if self.root is not None else None
        hit = parallel.broadcast_object(path is not None and path.is_file())
        if hit:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("key") == key and entry["features"].shape[0] == len(items):
                self.hits += 1
                return entry["features"], entry["labels"]
        self.misses += 1
        feats = self._compute(model, items, transform, encode)
        labels = torch.tensor([it.label for it in items], dtype=torch.long)
        if path is not None and parallel.is_main():
            atomic_torch_save({"key": key, "meta": meta, "features": feats, "labels": labels}, path)
        return feats, labels

    @torch.no_grad()
    def _compute(self, model, items, transform, encode) -> Tensor:
        if encode is None:
            def encode(x):
                dtype = next(model.visual.parameters()).dtype
                return nn.functional.normalize(model.encode_image(x.to(dtype)), dim=-1)
        world, rank = parallel.world_size(), parallel.rank()
        share = list(range(rank, len(items), world))
        loader = DataLoader(ImageDataset([items[i] for i in share], transform),
                            batch_size=self.batch_size, num_workers=self.num_workers)
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else torch.autocast(self.device.type, enabled=False))
        parts = []
        with ctx:
            for images, _ in loader:
                parts.append(encode(images.to(self.device)).float())
        local = torch.cat(parts) if parts else None
        if world == 1:
            return local.cpu()
        return _gather_strided(local, len(items), world).cpu()


def _gather_strided(local: Tensor | None, n: int, world: int) -> Tensor:
    """Rows ``rank::world`` from every process -> all ``n`` rows in order (pads to equal size)."""
    per = (n + world - 1) // world
    dim = parallel.broadcast_object(local.shape[1] if local is not None else None)
    device = local.device if local is not None else torch.device("cpu")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    buf = torch.zeros(per, dim, device=device)
    if local is not None:
        buf[:local.shape[0]] = local.to(device)
    out = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(out, buf)
    full = torch.empty(n, dim, device=device)
    for r in range(world):
        rows = list(range(r, n, world))
        full[rows] = out[r][:len(rows)]
    return full
