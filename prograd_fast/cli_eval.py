"""``prograd-fast eval``: test a saved prompt on a data set's base, new or all classes.

The command only parses and loads; the prompt is rebuilt by
:func:`prograd_fast.clip.saved.prompted_from_saved`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from .cli_help import PRETRAINED_HELP, HelpFormatter

__all__ = ["add_eval_parser", "cmd_eval"]


def add_eval_parser(sub) -> None:
    from .datasets.cli import add_dataset_args

    p = sub.add_parser("eval", help="test a saved prompt (a train run folder or checkpoint) on a "
                       "data set's base, new or all classes", formatter_class=HelpFormatter,
                       description="Rebuilds the prompt a 'prograd-fast train' run saved (its "
                       "learned context, prompt settings and zero-shot teacher) on the class "
                       "names of a data set and reports its test accuracy as train does.")
    p.add_argument("run", help="a train run folder (holding checkpoint.pt, or log.json for a "
                   "zero-shot run) or a checkpoint.pt file")
    p.add_argument("--data", default=None,
                   help="'digits', an ImageFolder root, a CoOp split_*.json or a folder holding "
                        "one (default: the run's data)")
    add_dataset_args(p)
    p.add_argument("--classes", choices=["all", "base", "new"], default=None,
                   help="CoOp's base-to-new halves of the classes (default: the classes the run "
                        "trained on)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="the split to test on")
    p.add_argument("--model", default=None, help="open_clip model name, a JSON model config or "
                   "'digits' (default: the run's)")
    p.add_argument("--pretrained", default=None, help=PRETRAINED_HELP + " (default: the run's)")
    p.add_argument("--templates", default=None, help="zero-shot teacher template (default: the "
                   "run's on its own data, else the data set's CoOp template)")
    p.add_argument("--shift", default=None, choices=["occlude", "noise", "thick", "none"],
                   help="digits only: the downstream shift (default: the run's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype of the evaluation")
    p.add_argument("--batch-size", type=int, default=100, help="test batch size")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, "
                   "else cpu)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")


def cmd_eval(args) -> int:
    import torch

    from .checks import (AT_LEAST_0, AT_LEAST_1, CLIError, check_device, model_from_args,
                         one_line, range_error)
    from .clip import parallel
    from .clip.digits import digits_split
    from .clip.data import ImageDataset, coop_transforms, load_dataset, subsample_classes
    from .clip.saved import load_saved_prompt, prompted_from_saved
    from .clip.trainer import PRECISIONS, evaluate

    bad = range_error((("--batch-size", args.batch_size, AT_LEAST_1),
                       ("--num-workers", args.num_workers, AT_LEAST_0)))
    if bad:
        raise CLIError(bad)
    try:
        saved = load_saved_prompt(args.run)
    except ValueError as exc:
        raise CLIError(one_line(exc)) from None
    p = saved.prompt
    if not p and saved.method != "zeroshot":
        raise CLIError(f"{saved.source} records no prompt settings (saved by an older "
                           f"version); retrain it to evaluate it")
    if args.device is not None:
        check_device(args.device)
    device = parallel.init_from_env(args.device)
    if args.dataset is not None or (args.data is None and p.get("dataset")):
        dataset = args.dataset or p["dataset"]  # a data set by name (given, or the run's)
        root = args.root or (p.get("root") if dataset == p.get("dataset") else None)
        data, same_data = None, dataset == p.get("dataset")
    else:
        dataset = root = None
        data = args.data or p.get("data", "digits")
        same_data = not p.get("dataset") and data == p.get("data")
    named = dataset is not None
    if args.root and not named:
        raise CLIError("--root needs --dataset NAME (--data reads one folder or split file)")
    classes = args.classes or (p.get("subsample", "all") if same_data else "all")
    pretrained = args.pretrained if args.pretrained is not None else p.get("pretrained")
    if (pretrained or "").lower() == "none":
        pretrained = None
    margs = SimpleNamespace(model=args.model or p.get("model"), pretrained=pretrained,
                            data=data or "named", shift=args.shift or p.get("shift") or "occlude")
    torch.manual_seed(saved.config.get("seed", 1))  # random weights (--pretrained none) as train drew them
    clip_model, tokenizer, size, mean, std = model_from_args(margs, device)
    if named:
        from .datasets import DatasetError, load_split

        if not root:
            raise CLIError("--dataset needs --root (the data root)")
        try:
            spec, full = load_split(dataset, root)
        except DatasetError as exc:
            raise CLIError(str(exc)) from None
        label, default_templates = spec.name, spec.dassl
    elif data == "digits":
        full, _, make_digits = digits_split(margs.shift)
        label, default_templates = "digits", "digits"
    else:
        if not Path(data).exists():
            raise CLIError(f"--data {data!r} does not exist")
        try:
            full = load_dataset(data)
        except (OSError, ValueError, KeyError) as exc:
            raise CLIError(f"cannot read --data {data!r}: {one_line(exc)}") from exc
        label, default_templates = Path(data).stem, None
    split = subsample_classes(full, classes)
    items = split.test if args.split == "test" else split.val
    if not items:
        raise CLIError(f"{label} has no {args.split} images for the {classes} classes")
    templates = args.templates or (p.get("templates") if same_data else default_templates)
    try:
        model = prompted_from_saved(saved, clip_model, split.classnames, tokenizer=tokenizer,
                                    templates=templates)
    except (ValueError, TypeError) as exc:
        raise CLIError(one_line(exc)) from None
    if data == "digits" and not named:
        dataset = make_digits(items, False)
    else:
        dataset = ImageDataset(items, coop_transforms(size, mean, std, augment=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                         num_workers=args.num_workers)
    acc = evaluate(model.to(device), loader, device, zeroshot=saved.method == "zeroshot",
                   autocast_dtype=PRECISIONS[args.precision])
    print(f"{saved.method} prompt from {saved.source} on {label} ({classes} classes, "
          f"{len(split.classnames)} classes, {len(items)} {args.split} images)")
    print(f"{args.split} accuracy {acc:.2f}%")
    return 0
