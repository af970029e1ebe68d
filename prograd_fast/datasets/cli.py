"""``prograd-fast train --dataset NAME --root DATA``: a CoOp data set by name."""

from __future__ import annotations

__all__ = ["add_dataset_args", "load_named"]


def add_dataset_args(p) -> None:
    from .registry import DATASETS

    p.add_argument("--dataset", default=None, choices=list(DATASETS), metavar="NAME",
                   help="a data set of CoOp's DATASETS.md by name (replaces --data): "
                        + ", ".join(DATASETS))
    p.add_argument("--root", default=None, help="with --dataset: the data root holding its folder")


def load_named(args):
    """``(spec, full split, few-shot training items)`` for ``--dataset``, else ``None``.  The
    items are CoOp's cached ``split_fewshot`` pickle when present, else Dassl's draw; a bad
    data set raises :class:`prograd_fast.checks.CLIError` (one line naming the file)."""
    from ..checks import CLIError

    if getattr(args, "dataset", None) is None:
        if getattr(args, "root", None):
            raise CLIError("--root needs --dataset NAME (--data reads one folder or split file)")
        return None
    from . import DatasetError, dataset_folder, few_shot_train, load_split

    if not args.root:
        raise CLIError("--dataset needs --root (the data root)")
    if args.data != "digits":
        raise CLIError("--dataset and --data both given: --dataset NAME --root DATA replaces --data")
    try:
        spec, full = load_split(args.dataset, args.root)
        items, _ = few_shot_train(spec, dataset_folder(spec, args.root), full, args.shots, args.seed)
    except DatasetError as e:
        raise CLIError(str(e)) from None
    return spec, full, items
