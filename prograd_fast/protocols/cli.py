"""``prograd-fast protocol base2new|fewshot|xd|dg``: the command-line hook of the grid runner."""

from __future__ import annotations

import argparse

from .config import METHODS, PROTOCOLS

__all__ = ["add_protocol_parser", "cmd_protocol"]


def add_protocol_parser(sub) -> None:
    """Add the ``protocol`` sub-command to ``prograd-fast``'s sub-parsers."""
    p = sub.add_parser(
        "protocol", help="reproduce a paper table: base2new | fewshot | xd | dg over data sets, "
        "methods, shots and seeds (resumable; Markdown/CSV/JSON/PNG)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Runs the whole grid of a CoOp/ProGrad protocol on the data sets of CoOp's "
        "DATASETS.md under --root, skipping finished runs and resuming killed ones, and writes "
        "<output-dir>/<protocol>.{md,csv,json,png}. Settings follow the official configs "
        "(docs/protocols.md). Multi-GPU: torchrun --nproc_per_node N -m prograd_fast.cli protocol ...")
    p.add_argument("protocol", choices=PROTOCOLS)
    p.add_argument("--root", required=True, help="data root holding CoOp's data set folders")
    p.add_argument("--datasets", nargs="+", default=None,
                   help="data sets by CoOp config name (default: the paper's: the 11 for "
                        "fewshot/base2new, the targets for xd/dg)")
    p.add_argument("--source", default="imagenet", help="xd / dg: the training data set")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--shots", type=int, nargs="+", default=None,
                   help="default: 1 2 4 8 16 for fewshot, 4 for base2new / xd / dg (official scripts)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name or a JSON model config")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag or a state-dict file; 'none' for random weights")
    p.add_argument("--output-dir", default="protocol_runs")
    p.add_argument("--cache-dir", default=None,
                   help="image feature cache (default: <output-dir>/features); keyed by content")
    p.add_argument("--cache-train-features", action="store_true",
                   help="also train on cached features (test transform, NO augmentation: "
                        "changes CoOp's training semantics; much faster)")
    p.add_argument("--epochs", type=int, default=None, help="override the official epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override 32")
    p.add_argument("--lr", type=float, default=None, help="override 0.002")
    p.add_argument("--lam", type=float, default=None, help="override ProGrad's lambda")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default=None, help="default: cuda if available (cuda:LOCAL_RANK "
                   "under torchrun) else cpu")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--no-progress", action="store_true")


def cmd_protocol(args) -> int:
    from ..cli import CLIError
    from ..datasets import DatasetError
    from .config import ProtocolError
    from .grid import GridOptions, GridRunner
    from .tables import write_outputs

    pretrained = None if (args.pretrained or "").lower() in ("", "none") else args.pretrained
    opts = GridOptions(protocol=args.protocol, root=args.root, datasets=args.datasets,
                       seeds=args.seeds, methods=args.methods, shots=args.shots,
                       source=args.source, model=args.model, pretrained=pretrained,
                       output_dir=args.output_dir, cache_dir=args.cache_dir, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, lam=args.lam,
                       precision=args.precision, device=args.device, num_workers=args.num_workers,
                       cache_train_features=args.cache_train_features,
                       progress=not args.no_progress)
    try:
        runner = GridRunner(opts)
        results = runner.run()
    except (DatasetError, ProtocolError) as e:
        raise CLIError(str(e)) from None
    from ..clip import parallel

    if parallel.is_main():
        meta = {"model": args.model + (f"/{pretrained}" if pretrained else ""),
                "seeds": " ".join(map(str, args.seeds)), "processes": parallel.world_size()}
        paths = write_outputs(args.protocol, results, args.output_dir, meta)
        print((paths["md"]).read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
