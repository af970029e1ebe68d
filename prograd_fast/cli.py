"""The ``prograd-fast`` console command: demo, train, eval and protocol."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser", "CLIError"]

from .checks import (AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT, CLIError,  # noqa: E402,F401
                     range_error)
from .checks import check_device as _check_device, one_line as _one_line  # noqa: E402
from .checks import model_from_args as _load_model  # noqa: E402
from .cli_help import (PRETRAINED_HELP, PROGRAD_GROUPS_CHOICES,  # noqa: E402  (no torch: fast --help)
                       PROGRAD_GROUPS_HELP, HelpFormatter, methods_help, plot_note)


# --share-prefix: "auto" / "off" and the shared-prefix encoder's suffix layouts
# (prograd_fast.clip.shared_prefix.LAYOUTS; spelled out so that --help needs no torch import).
SHARE_PREFIX_CHOICES = ("auto", "off", "bucketed", "packed", "padded")
_SHARE_PREFIX = {"auto": True, "off": False}


DESCRIPTION = """\
ProGrad (prompt-aligned gradient) and CoOp prompt tuning for CLIP models.

commands:
  demo      base-to-new on the embedded digits: zero-shot vs CoOp vs ProGrad (table + plot)
  train     few-shot prompt tuning on one data set (zero-shot / CoOp / ProGrad)
  eval      test a saved prompt (a train run folder or its checkpoint) on a data set
  protocol  a paper's whole table (base2new, fewshot, xd, dg) over data sets, methods, seeds

'prograd-fast COMMAND --help' describes each command's options."""

DEMO_DESCRIPTION = """\
The README's main job, no download needed: pretrains a tiny CLIP on scikit-learn's
handwritten digits (once, cached), shifts the downstream digits (a blanked patch by
default), tunes a prompt few-shot on five base digits with CoOp and ProGrad over shots and
seeds, tests on the base digits and on five new ones, and prints the table (mean and
half-range over seeds, harmonic mean) beside zero-shot CLIP. Writes
<output-dir>/base_to_new.json and base_to_new.png (the plot needs matplotlib)."""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="few-shot prompt tuning (zero-shot / CoOp / ProGrad)",
                       formatter_class=HelpFormatter,
                       description="Tunes a prompt few-shot on one data set, tests it after the "
                       "last epoch (or every --eval-every epochs) and writes settings.json, "
                       "log.csv, log.json, curves.png, checkpoint.pt and result.json to "
                       "--output-dir; a rerun with the same settings resumes from the checkpoint "
                       "or reprints a finished run's result, one with other settings is refused.")
    p.add_argument("--data", default="digits",
                   help="'digits' (the embedded data set), an ImageFolder root (train/<class>/..., "
                        "val/ or test/), a CoOp split_*.json or a folder holding one")
    p.add_argument("--image-root", default=None,
                   help="with --data a CoOp split JSON: the folder its image paths start from "
                        "(default: images/ beside the JSON, else the JSON's folder)")
    from .datasets.cli import add_dataset_args
    add_dataset_args(p)
    p.add_argument("--model", default=None,
                   help="open_clip model name (e.g. ViT-B-16), a JSON model config, or 'digits' "
                        "(the embedded tiny CLIP; default: digits with --data digits, else "
                        "required)")
    p.add_argument("--pretrained", default="none", help=PRETRAINED_HELP)
    from .methods import METHODS
    p.add_argument("--method", choices=list(METHODS), default="prograd", metavar="METHOD",
                   help="the method, of " + methods_help() + "; a method with an official "
                        "config gets its prompt (context length, depth) unless --n-ctx / "
                        "--ctx-init say otherwise; the schedule is this command's options")
    p.add_argument("--shots", type=int, default=16, help="training images per class (<=0: all)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the few-shot draw, the context's initialisation and the order")
    p.add_argument("--subsample", choices=["all", "base", "new"], default="all",
                   help="CoOp base-to-new protocol: train and test on these classes")
    p.add_argument("--eval-new", action="store_true",
                   help="with --subsample base: also test the learned context on the new classes")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--lr", type=float, default=0.002,
                   help="SGD learning rate after warm-up (cosine schedule)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--warmup-epochs", type=int, default=1,
                   help="epochs at the constant --warmup-lr before the cosine schedule")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate of the warm-up")
    p.add_argument("--lam", type=float, default=1.0,
                   help="ProGrad's lambda: how much of the conflicting component is removed "
                        "(0: plain CoOp)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="temperature of the KL towards the zero-shot prediction")
    p.add_argument("--granularity", choices=["global", "tensor"], default="global",
                   help="project the gradient as one vector over all prompt tensors (global, "
                        "the paper's) or per tensor")
    p.add_argument("--prograd-groups", choices=PROGRAD_GROUPS_CHOICES, default="together",
                   help=PROGRAD_GROUPS_HELP)
    p.add_argument("--backend", default="auto",
                   help="ProGradSGD kernel backend: auto, triton, cuda, cpp or torch")
    p.add_argument("--n-ctx", type=int, default=None,
                   help="context length (default: 16, or the method's official config; "
                        "CoOp, ProGrad and KgCoOp with the embedded digits model and no "
                        "--ctx-init: the demo's context, 'a handwritten', which fits its "
                        "16-token text tower)")
    p.add_argument("--ctx-init", default=None,
                   help="initial context words, e.g. 'a photo of a' (they set the context "
                        "length); default: random N(0, 0.02) context")
    p.add_argument("--prompt-depth", type=int, default=None,
                   help="maple, ivlp, vpt: the layers that get deep prompts (default: the "
                        "method's official config: 9 for MaPLe, 12 for IVLP and VPT)")
    p.add_argument("--kg-weight", type=float, default=8.0,
                   help="kgcoop: weight W of KgCoOp's knowledge-guided loss (default: the "
                        "official 8.0)")
    p.add_argument("--class-specific", "--csc", action="store_true",
                   help="one context per class (CoOp's CSC) instead of one shared context")
    p.add_argument("--class-token-position", choices=["end", "middle", "front"], default="end",
                   help="where the class name goes in the prompt")
    p.add_argument("--templates", default=None,
                   help="zero-shot teacher template: a CoOp dataset name (e.g. OxfordPets), "
                        "'openai_imagenet' (80-template ensemble) or a string with {} "
                        "(default: the data set's CoOp template, 'digits' for digits)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast dtype (fp16 adds a GradScaler)")
    p.add_argument("--grad-mode", choices=["auto", "batched", "two_pass"], default="auto",
                   help="both gradients in one batched backward, or two passes; auto: batched "
                        "where PyTorch batches it well")
    p.add_argument("--share-prefix", choices=SHARE_PREFIX_CHOICES, default="auto",
                   help="encode the prompt prefix common to all classes once (exact; docs/coop.md); "
                        "auto: the standard suffix layout, off: every prompt whole")
    p.add_argument("--shift", default="occlude", choices=["occlude", "noise", "thick", "none"],
                   help="digits only: the downstream shift (a blanked patch, pixel noise, "
                        "thicker strokes, or none)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--output-dir", default=None,
                   help="run folder (default: runs/<data>_<method>_<shots>shot_seed<seed> plus "
                        "each option not at its standard value, e.g. _lam0.5); a folder "
                        "holding a run with other settings is refused")
    p.add_argument("--no-resume", action="store_true",
                   help="train from scratch, replacing the run in --output-dir")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the one line per epoch stays)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate every N epochs (0: after the last epoch only, as CoOp)")
    p.add_argument("--eval-split", choices=["test", "val"], default="test",
                   help="the split of the --eval-every evaluations (the last epoch is always "
                        "tested on the test split; val: also validated)")


def _add_demo(sub) -> None:
    from .clip.demo import DEMO_DEFAULTS as D

    p = sub.add_parser("demo", help="base-to-new on the embedded digits: zero-shot vs CoOp vs "
                       "ProGrad (table + PNG)", formatter_class=HelpFormatter,
                       description=DEMO_DESCRIPTION)
    p.add_argument("--output-dir", default="prograd_demo", help="where the JSON and plot go")
    p.add_argument("--shots", type=int, nargs="+", default=list(D["shots"]),
                   help="training images per base digit")
    p.add_argument("--seeds", type=int, nargs="+", default=list(D["seeds"]),
                   help="seeds of the few-shot draws and context initialisations")
    p.add_argument("--epochs", type=int, default=D["epochs"], help="training epochs per run")
    p.add_argument("--lr", type=float, default=D["lr"], help="SGD learning rate after warm-up")
    p.add_argument("--lam", type=float, default=1.0, help="ProGrad's lambda")
    p.add_argument("--shift", default=D["shift"], choices=["occlude", "noise", "thick", "none"],
                   help="the downstream shift of the digits: a blanked patch, pixel noise, "
                        "thicker strokes, or none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prograd-fast", description=DESCRIPTION,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_demo(sub)
    from .cli_eval import add_eval_parser
    add_eval_parser(sub)
    from .protocols.cli import add_protocol_parser
    add_protocol_parser(sub)
    return parser


def _digits_split(args):
    from .clip.digits import digits_split

    return digits_split(args.shift)


def _prefix_note(model) -> str:
    """How the prompts are encoded, for the start-up line."""
    shared = model.shared_prefix
    if shared is None:
        return f"shared prefix off: {model.shared_prefix_off}"
    return (f"first {model.prompt_learner.shared_prefix_length} shared by all classes, encoded once, "
            f"{shared.layout} suffixes")


def _check_train_args(args) -> None:
    """Inputs that can be refused before any work."""
    from . import available_backends

    if (args.pretrained or "").lower() == "none":  # the same spelling as protocol's
        args.pretrained = None
    if args.eval_new and args.subsample != "base":
        raise CLIError("--eval-new needs --subsample base")
    if args.image_root is not None and (args.data == "digits" or args.dataset is not None):
        raise CLIError("--image-root needs --data a CoOp split JSON (or a folder holding one)")
    if args.data != "digits" and not Path(args.data).exists():
        raise CLIError(f"--data {args.data!r} does not exist (an ImageFolder root, a CoOp "
                       f"split_*.json or a folder holding one, or 'digits')")
    bad = range_error((("--n-ctx", args.n_ctx, AT_LEAST_1),
                       ("--prompt-depth", args.prompt_depth, AT_LEAST_1),
                       ("--epochs", args.epochs, AT_LEAST_0),
                       ("--eval-every", args.eval_every, AT_LEAST_0),
                       ("--num-workers", args.num_workers, AT_LEAST_0),
                       ("--batch-size", args.batch_size, AT_LEAST_1), ("--lam", args.lam, UNIT),
                       ("--temperature", args.temperature, POSITIVE), ("--lr", args.lr, POSITIVE),
                       ("--momentum", args.momentum, AT_LEAST_0),
                       ("--weight-decay", args.weight_decay, AT_LEAST_0),
                       ("--warmup-lr", args.warmup_lr, AT_LEAST_0),
                       ("--warmup-epochs", args.warmup_epochs, AT_LEAST_0),
                       ("--kg-weight", args.kg_weight, AT_LEAST_0)))
    if bad:
        raise CLIError(bad)
    if args.eval_split == "val" and args.data == "digits" and args.dataset is None:
        raise CLIError("--eval-split val: the digits data set has no validation split")
    if args.eval_new and args.class_specific:
        raise CLIError("--eval-new cannot transfer a class-specific context (--class-specific) "
                       "to the new classes")
    if args.device is not None:
        _check_device(args.device)
    if args.backend != "auto":
        reason = available_backends().get(args.backend, "unknown backend")
        if reason is not None:
            raise CLIError(f"--backend {args.backend!r} cannot run here: {reason}")


def cmd_train(args) -> int:
    import torch

    from .clip import PromptedCLIP
    from .clip.data import (ImageDataset, coop_transforms, few_shot, few_shot_shortfall,
                            load_dataset, subsample_classes)
    from .datasets import DatasetError
    from .datasets.images import check_images
    from .clip.trainer import TrainConfig, Trainer, evaluate, transfer_context
    from .atomic import atomic_write_json
    from .clip import parallel
    from .datasets.cli import load_named
    from .methods import get_method
    from . import runs

    typed = dict(vars(args))  # the options as typed: the default folder name
    _check_train_args(args)
    given = dict(vars(args))  # the options as given (--pretrained none read): the run's settings
    device = parallel.init_from_env(args.device)  # torchrun: one process per GPU, data-parallel
    torch.manual_seed(args.seed)
    named = load_named(args)  # --dataset NAME --root DATA: (data set, full split, drawn items)
    if named is not None:
        args.data = named[0].name
    out = _output_dir(args, typed)
    try:
        runs.check_writable(out)
    except runs.RunFolderError as exc:
        raise CLIError(str(exc)) from None
    clip, tokenizer, size, mean, std = _load_model(args, device)
    if args.data == "digits":
        full, _, make = _digits_split(args)
    else:
        try:
            full = named[1] if named else load_dataset(args.data, image_dir=args.image_root)
        except (OSError, ValueError, KeyError) as exc:
            raise CLIError(f"cannot read --data {args.data!r}: {_one_line(exc)}") from exc
        train_tf = coop_transforms(size, mean, std, augment=True)
        test_tf = coop_transforms(size, mean, std, augment=False)

        def make(items, train):  # seeded augmentation: the same images for any process count
            return ImageDataset(items, train_tf if train else test_tf, seed=args.seed if train else None)
    # as the official readers: draw the shots on all classes, then keep base / new
    drawn = named[2] if named else few_shot(full.train, args.shots, args.seed)
    split = subsample_classes(replace(full, train=drawn), args.subsample)
    train_items = split.train
    templates = args.templates or ("digits" if args.data == "digits" else
                                   named[0].dassl if named else None)
    n_ctx, ctx_init = args.n_ctx, args.ctx_init
    from .protocols.config import method_config

    if args.data == "digits" and (args.model or "digits") == "digits" and n_ctx is None \
            and ctx_init is None and method_config(args.method) is None:
        from .clip.demo import DEMO_DEFAULTS

        ctx_init = DEMO_DEFAULTS["ctx_init"]  # 16 learned tokens do not fit a 16-token tower
    method = get_method(args.method)
    try:
        prompt = _train_prompt(args, n_ctx, ctx_init, templates)
    except ValueError as exc:  # an option the method's learner does not take
        raise CLIError(str(exc)) from None
    if method.learner is not None:
        prompt["learner"] = method.learner
    try:
        model = PromptedCLIP(clip, split.classnames, tokenizer=tokenizer, templates=templates,
                             **prompt,
                             share_prefix=_SHARE_PREFIX.get(args.share_prefix, args.share_prefix))
    except (ValueError, TypeError) as exc:  # prompts too long, unknown template, refused tower
        hint = " (--prompt-depth N)" if "use a depth" in str(exc) else ""
        raise CLIError(_one_line(exc) + hint) from exc
    from .protocols.features import model_fingerprint

    data_id = runs.data_fingerprint(full.train + full.val + full.test, None)
    settings = runs.run_settings(given, data_id, model_fingerprint(clip))
    out, state = _claim_folder(out, args, settings)
    say = print if parallel.is_main() else (lambda *a, **k: None)
    if state == "done":
        say(f"{out} holds this run, finished, with the same settings: reprinting its result "
            f"(--no-resume trains it again)")
        say(_result_line(runs.read_result(out), out))
        return 0
    if args.eval_split == "val" and not split.val:
        raise CLIError(f"--eval-split val: --data {args.data!r} has no validation images")
    new_test = subsample_classes(full, "new").test if args.eval_new else []
    try:  # every image of the run, before anything is written
        check_images(train_items + split.val + split.test + new_test)
    except DatasetError as exc:
        raise CLIError(str(exc)) from None
    short = few_shot_shortfall(subsample_classes(full, args.subsample), args.shots)
    if short and parallel.is_main():
        print(f"prograd-fast: warning: {short}", file=sys.stderr)
    if parallel.is_main():
        if state == "start":  # --no-resume: nothing of the replaced run may answer later
            runs.clear_run(out)
        atomic_write_json(out / "settings.json", settings)
    cfg = TrainConfig(method=args.method, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                      warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, lam=args.lam,
                      temperature=args.temperature, granularity=args.granularity,
                      prograd_groups=args.prograd_groups,
                      backend=args.backend, precision=args.precision, grad_mode=args.grad_mode,
                      seed=args.seed, num_workers=args.num_workers, output_dir=str(out),
                      progress=not args.no_progress, eval_every=args.eval_every,
                      extra={"prompt": saved_prompt_settings(args, model, split, templates,
                                                             prompt)})
    say(f"{args.method}: {len(split.classnames)} classes, {len(train_items)} training images "
        f"({args.shots} shots, seed {args.seed}), {len(split.test)} test images, "
        f"prompt length {getattr(model.prompt_learner, 'length', '?')} tokens "
        f"({_prefix_note(model)}), device {device}, "
        f"{parallel.world_size()} process(es)")
    val_set = None
    if args.eval_split == "val":
        val_set = make(split.val, False)
    trainer = Trainer(model, make(train_items, True), make(split.test, False), cfg, device,
                      val_set=val_set, log=say)
    if not args.no_resume:
        try:
            if trainer.maybe_resume() and trainer.epoch < args.epochs:
                say(f"resuming the run in {out} (same settings) from the checkpoint of epoch "
                    f"{trainer.epoch} of {args.epochs}")
            elif trainer.epoch:
                say(f"{out} holds this run, finished, with the same settings, but no intact "
                    f"result.json: reporting from its checkpoint")
        except Exception as exc:  # any unreadable or mismatched checkpoint file
            raise CLIError(f"cannot resume from {out / 'checkpoint.pt'}: {_one_line(exc)} "
                           f"(--no-resume starts over)") from exc
    history = trainer.fit(resume=False)
    result = {"method": args.method, "acc": history[-1]["acc"], "output_dir": str(out)}
    if args.eval_new:
        new = subsample_classes(full, "new")
        other = transfer_context(model, new.classnames, tokenizer=tokenizer)
        loader = torch.utils.data.DataLoader(make(new.test, False), batch_size=100)
        result["new_acc"] = evaluate(other, loader, device, zeroshot=args.method == "zeroshot")
    if parallel.is_main():
        atomic_write_json(out / "result.json", runs.seal(result))
    say(_result_line(result, out))
    return 0


def _train_prompt(args, n_ctx: int | None, ctx_init: str | None, templates) -> dict:
    """The learner's settings: a method with an official config (MaPLe, CoCoOp, ...) gets
    its config's prompt with the options given on top (refused where its learner has no
    such setting); KgCoOp its own; the others CoOp's."""
    from .protocols.config import KGCOOP_METHODS, PromptOverrides, config_overrides, method_config

    own = method_config(args.method)
    if own is not None:
        given = PromptOverrides(n_ctx, ctx_init, args.class_specific, args.class_token_position,
                                depth=args.prompt_depth)
        return config_overrides(args.method, dict(own.prompt), given)
    if args.prompt_depth is not None:
        raise ValueError(f"--prompt-depth: {args.method} has no deep prompts (maple, ivlp and "
                         f"vpt have)")
    prompt = {"n_ctx": 16 if n_ctx is None else n_ctx, "ctx_init": ctx_init,
              "class_specific": args.class_specific,
              "class_token_position": args.class_token_position}
    if args.method in KGCOOP_METHODS:  # KgCoOp's own prompt ("a photo of a") unless given
        if n_ctx is None and ctx_init is None:
            del prompt["n_ctx"], prompt["ctx_init"]
        prompt.update(kg_weight=args.kg_weight, kg_templates=templates, template_set="kgcoop")
    return prompt


def _result_line(result: dict, out: Path) -> str:
    return (f"test accuracy {result['acc']:.2f}%"
            + (f", new classes {result['new_acc']:.2f}%" if "new_acc" in result else "")
            + f"  (log: {out}/log.csv, {plot_note(out / 'curves.png')})")


def _output_dir(args, given: dict) -> Path:
    """``--output-dir``, else ``runs/<data>_<method>_<shots>shot_seed<seed>`` plus every option
    that differs from its default."""
    from .runs import default_run_name

    if args.output_dir:
        return Path(args.output_dir)
    data_name = "digits" if args.data == "digits" else Path(args.data).stem
    defaults = vars(build_parser().parse_args(["train"]))
    return Path("runs") / default_run_name(
        f"{data_name}_{args.method}_{args.shots}shot_seed{args.seed}", given, defaults)


def _claim_folder(out: Path, args, settings: dict) -> tuple[Path, str]:
    """The run folder and what to do there (:func:`prograd_fast.runs.folder_state`).  Where
    the default name holds a run of other data, the name gets the settings' hash."""
    import hashlib

    from .runs import RunFolderError, folder_state

    try:
        return out, folder_state(out, settings, args.no_resume)
    except RunFolderError as exc:
        if args.output_dir:
            raise CLIError(str(exc)) from None
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        other = out.with_name(f"{out.name}_{digest}")
        try:
            return other, folder_state(other, settings, args.no_resume)
        except RunFolderError as exc2:
            raise CLIError(str(exc2)) from None


def saved_prompt_settings(args, model, split, templates, prompt: dict | None = None) -> dict:
    """What ``prograd-fast eval`` needs to rebuild this run's prompt (kept in the checkpoint's
    and log.json's config).  ``prompt``: the settings the model was built with; a method
    with a learner of its own (KgCoOp, CoCoOp, MaPLe, ...) records them as
    ``learner_settings`` (its constructor's keywords) and the teacher's ``template_set``."""
    from .methods import get_method

    pl = model.prompt_learner
    own = {}
    if prompt is not None and get_method(args.method).learner is not None:
        own = {"template_set": prompt.get("template_set", "coop"),
               "learner_settings": {k: v for k, v in prompt.items()
                                    if k not in ("learner", "template_set")}}
    return {**own, "model": args.model or ("digits" if args.data == "digits" else None),
            "pretrained": args.pretrained, "data": args.data, "shift": args.shift,
            "dataset": args.dataset, "root": args.root,
            "subsample": args.subsample, "classnames": list(split.classnames),
            "templates": templates, "n_ctx": getattr(pl, "n_ctx", None),
            "ctx_init": getattr(pl, "ctx_init", None),
            "ctx_init_mode": getattr(pl, "ctx_init_mode", None),
            "class_specific": pl.class_specific, "class_token_position": pl.class_token_position,
            "share_prefix": args.share_prefix}


def cmd_demo(args) -> int:
    from .clip.demo import run_base_to_new

    run_base_to_new(args.output_dir, shots=args.shots, seeds=args.seeds, epochs=args.epochs,
                    lr=args.lr, lam=args.lam, shift=args.shift)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "protocol":
            from .protocols.cli import cmd_protocol

            return cmd_protocol(args)
        if args.command == "eval":
            from .cli_eval import cmd_eval

            return cmd_eval(args)
        return cmd_demo(args)
    except CLIError as exc:  # a bad input: one line, no traceback
        print(f"prograd-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every file is written atomically, the run resumes
        print("prograd-fast: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # python -m prograd_fast.cli: run the imported module's main, so that the CLIError the
    # sub-commands import (prograd_fast.cli.CLIError) is the one it catches
    from prograd_fast.cli import main as _main

    sys.exit(_main())
