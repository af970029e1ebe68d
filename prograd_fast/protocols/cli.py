"""``prograd-fast protocol base2new|fewshot|xd|dg``: the command-line hook of the grid runner."""

from __future__ import annotations

from ..methods import default_grid_methods
from ..cli_help import (PLOT_NEEDS, PRETRAINED_HELP, PROGRAD_GROUPS_CHOICES, PROGRAD_GROUPS_HELP,
                        HelpFormatter, default_workers, methods_help)
from .config import DEFAULT_SETTING, METHODS, PROTOCOLS, SETTING_MODELS, SETTINGS

__all__ = ["add_protocol_parser", "cmd_protocol"]


def add_protocol_parser(sub) -> None:
    """Add the ``protocol`` sub-command to ``prograd-fast``'s sub-parsers."""
    p = sub.add_parser(
        "protocol", help="reproduce a paper table: base2new | fewshot | xd | dg over data sets, "
        "methods, shots and seeds (resumable; Markdown/CSV/JSON/PNG)",
        formatter_class=HelpFormatter,
        description="Runs the whole grid of a CoOp/ProGrad protocol on the data sets of CoOp's "
        "DATASETS.md under --root, skipping finished runs and resuming killed ones, and writes "
        "<output-dir>/<protocol>.{md,csv,json,png}. Settings follow the official configs "
        "of --setting (docs/protocols.md); the table's caption lists every setting that differs "
        "from them. Multi-GPU: torchrun --nproc_per_node N -m prograd_fast.cli protocol ...")
    p.add_argument("protocol", choices=PROTOCOLS,
                   help="base2new (train on base classes, test base and new), fewshot (1-16 "
                        "shots on all classes), xd (ImageNet to 10 data sets), dg (ImageNet to "
                        "its 4 shifted variants)")
    p.add_argument("--setting", choices=SETTINGS, default=DEFAULT_SETTING,
                   help="official configs to follow: prograd (ProGrad's code: RN50, 4 shots for "
                        "base2new/xd/dg, its zero-shot templates) or cocoop (the base-to-new "
                        "tables of CoCoOp, KgCoOp, MaPLe: ViT-B/16, 16 shots, their schedules)")
    p.add_argument("--root", required=True, help="data root holding CoOp's data set folders")
    p.add_argument("--datasets", nargs="+", default=None,
                   help="data sets by CoOp config name (default: the paper's: the 11 for "
                        "fewshot/base2new, the targets for xd/dg)")
    p.add_argument("--source", default="imagenet", help="xd / dg: the training data set")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="seeds of the few-shot draws and context initialisations")
    p.add_argument("--methods", nargs="+", default=default_grid_methods(), metavar="METHOD",
                   help="the methods to run, of " + methods_help() + "; each runs with its "
                        "own official prompt and schedule, docs/protocols.md (default: "
                        + " ".join(default_grid_methods()) + ", the ProGrad paper's table)")
    p.add_argument("--shots", type=int, nargs="+", default=None,
                   help="training images per class (default: the setting's: 1 2 4 8 16 for "
                        "fewshot; 4 (prograd) or 16 (cocoop) for base2new / xd / dg)")
    p.add_argument("--model", default=None,
                   help="open_clip model name or a JSON model config (default: the setting's: "
                        + ", ".join(f"{m} for {s}" for s, m in SETTING_MODELS.items()) + ")")
    p.add_argument("--pretrained", default="openai", help=PRETRAINED_HELP)
    p.add_argument("--output-dir", default="protocol_runs",
                   help="where runs, features and tables go")
    p.add_argument("--cache-dir", default=None,
                   help="image feature cache (default: <output-dir>/features); keyed by content")
    p.add_argument("--cache-train-features", action="store_true",
                   help="also train on cached features (test transform, NO augmentation: "
                        "changes CoOp's training semantics; much faster)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: the official ones per method, data set and "
                        "shots)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size (default: the method's: 32 for CoOp and ProGrad, KgCoOp's "
                        "128, CoCoOp's 1, MaPLe's, IVLP's and VPT's 4)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the method's: 0.002; MaPLe's and IVLP's "
                        "0.0035, VPT's 0.0025)")
    p.add_argument("--lam", type=float, default=None,
                   help="ProGrad's lambda (default: the official one, 1.0 or 0.8)")
    p.add_argument("--prograd-groups", choices=PROGRAD_GROUPS_CHOICES, default="together",
                   help=PROGRAD_GROUPS_HELP)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype (the official code runs CLIP in fp16)")
    p.add_argument("--n-ctx", type=int, default=None,
                   help="ablation: context length of the trained methods, IVLP's text context "
                        "(default: the method's: 16; 4 for CoOp in the cocoop setting, KgCoOp "
                        "and CoCoOp; 2 for MaPLe and IVLP)")
    p.add_argument("--ctx-init", default=None,
                   help="ablation: initial context words, or 'none' for a random context "
                        "(default: the method's: random for CoOp, the data set's template for "
                        "ProGrad, 'a photo of a' for CoOp in the cocoop setting and for KgCoOp, "
                        "CoCoOp, MaPLe, IVLP)")
    p.add_argument("--prompt-depth", type=int, default=None,
                   help="ablation: the layers that get deep prompts, MaPLe's, IVLP's (both "
                        "towers) and VPT's (default: the method's: 9 for MaPLe, 3 in its "
                        "cross-data-set config, 12 for IVLP and VPT)")
    p.add_argument("--csc", action="store_true",
                   help="ablation: one context per class (fewshot only: it cannot be tested on "
                        "other classes)")
    p.add_argument("--class-token-position", choices=["end", "middle", "front"], default=None,
                   help="ablation: where the class name goes (default: end)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if "
                   "available, cuda:LOCAL_RANK under torchrun, else cpu)")
    p.add_argument("--num-workers", type=int, default=default_workers(4),
                   help="data-loader worker processes (at most the available cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_protocol(args) -> int:
    from ..checks import CLIError
    from ..clip.load import ModelLoadError
    from ..datasets import DatasetError
    from .config import PromptOverrides, ProtocolError, deep_prompt_keys, method_config
    from .grid import GridOptions, GridRunner
    from .meta import grid_meta
    from .tables import write_outputs

    if args.prompt_depth is not None and args.prompt_depth < 1:
        raise CLIError(f"--prompt-depth must be >= 1, got {args.prompt_depth}")
    unknown = [m for m in dict.fromkeys(args.methods) if m not in METHODS]
    if unknown:
        raise CLIError(f"--methods: unknown method(s) {' '.join(unknown)}: use any of "
                       f"{' '.join(METHODS)}")
    if args.prompt_depth is not None and not any(
            deep_prompt_keys(method_config(m).prompt) for m in args.methods if method_config(m)):
        raise CLIError("--prompt-depth applies to methods with deep prompts (maple, ivlp, vpt); "
                       "none is in --methods")
    pretrained = None if (args.pretrained or "").lower() in ("", "none") else args.pretrained
    opts = GridOptions(protocol=args.protocol, root=args.root, datasets=args.datasets,
                       seeds=args.seeds, methods=args.methods, shots=args.shots,
                       source=args.source, model=args.model, pretrained=pretrained,
                       output_dir=args.output_dir, cache_dir=args.cache_dir, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, lam=args.lam,
                       precision=args.precision, device=args.device, num_workers=args.num_workers,
                       cache_train_features=args.cache_train_features,
                       progress=not args.no_progress, setting=args.setting,
                       prograd_groups=args.prograd_groups,
                       prompt=PromptOverrides(args.n_ctx, args.ctx_init, args.csc,
                                              args.class_token_position,
                                              depth=args.prompt_depth))
    try:
        runner = GridRunner(opts)
        results = runner.run()
    except (DatasetError, ProtocolError, ModelLoadError) as e:
        raise CLIError(str(e)) from None
    from ..clip import parallel

    if parallel.is_main():
        meta = grid_meta(opts, parallel.world_size())
        paths = write_outputs(args.protocol, results, args.output_dir, meta)
        print((paths["md"]).read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values())
              + ("" if "png" in paths else f" ({PLOT_NEEDS})"))
    return 0
