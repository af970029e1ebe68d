"""Run a protocol's whole grid: data sets x methods x shots x seeds, resumable.

A *run* is one prompt: trained (CoOp / ProGrad) on a data set's few-shot split, or the
zero-shot prompt.  It lives in ``<output>/runs/<data set>/<classes>/<method>/
shots<K>-seed<S>-ep<E>-<hash>/`` (the hash covers every setting that changes the result:
model weights, schedule, prompt, precision, inputs, the few-shot images: paths, labels,
sizes and modification times), holding the trainer's ``checkpoint.pt`` and logs and
``result.json`` (accuracy per test set and the test set it was made on, sealed with a digest
and written atomically when the run's tests are done).  A rerun skips runs whose intact
``result.json`` has every test the protocol needs, made on the current test sets; resumes a
killed run from its checkpoint (an unreadable one is moved aside and the run trained
again); and only tests a finished one that lacks a test (e.g. an ImageNet run trained by
``xd``, then used by ``dg``), whose test set changed, or whose ``result.json`` is damaged.
It says which runs it redoes and why.

Test sets are named ``<data set>/<classes>`` (``oxford_pets/base``, ``imagenet_a/all``)
and evaluated on cached image features (:mod:`.features`): a test set's images are encoded
once per model and preprocessing, whatever the number of methods, seeds, shots and epochs.
A method whose learner prompts the image tower (``vision_prompted``: MaPLe, IVLP, VPT) is
tested on the images (test transform), since its image features depend on its prompts, and
trains on images even with ``--cache-train-features`` (the grid says so once).  An
image-conditioned learner (CoCoOp) keeps the frozen image tower: cached features serve it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..atomic import atomic_write_json
from ..clip import PromptedCLIP, parallel
from ..clip.data import ImageDataset, coop_transforms
from ..clip.load import load_model
from ..clip.trainer import PRECISIONS, TrainConfig, Trainer, correct_counts, transfer_context
from ..datasets import dataset_folder, few_shot_train, get_spec, read_dataset
from ..datasets.items import (Item, Split, class_subset, few_shot_shortfall,
                              subsample_classes)
from ..datasets.registry import DatasetError
from ..methods import default_grid_methods, get_method
from .config import (DEFAULT_SETTING, METHODS, PROTOCOLS, SETTING_MODELS, SOURCE,
                     PromptOverrides, ProtocolError, Schedule, default_datasets, default_shots,
                     method_prompt, official_schedule, prompts_image_tower)
from .features import FeatureCache, model_fingerprint
from .records import check_result, move_aside, seal, why_redone

__all__ = ["Run", "GridOptions", "plan", "GridRunner", "RUN_FORMAT"]

RUN_FORMAT = 3
TEST_BATCH = 100  # images per test batch (the official configs' DATALOADER.TEST.BATCH_SIZE)
FEATURES_IN_MEMORY = 4 << 30  # bytes of test features kept between runs (ImageNet ViT-B: 0.1 GB)


@dataclass(frozen=True)
class Run:
    """One prompt: ``method`` trained on ``dataset``'s ``classes`` ("all" or "base") with
    ``shots`` per class from ``seed`` (0 and 0 for zero-shot), and its test sets."""

    dataset: str
    classes: str
    method: str
    shots: int
    seed: int
    tests: tuple[str, ...]

    @property
    def trained(self) -> bool:
        return get_method(self.method).trains

    def title(self) -> str:
        what = f"{self.dataset}/{self.classes} {self.method}"
        return what if not self.trained else f"{what} {self.shots}-shot seed {self.seed}"


@dataclass
class GridOptions:
    """Everything ``prograd-fast protocol`` takes (see ``--help``)."""

    protocol: str
    root: str
    datasets: Sequence[str] | None = None
    seeds: Sequence[int] = (1, 2, 3)
    methods: Sequence[str] = field(default_factory=lambda: tuple(default_grid_methods()))
    shots: Sequence[int] | None = None
    source: str = SOURCE
    model: str | None = None  # None: the setting's backbone
    pretrained: str | None = "openai"
    output_dir: str = "protocol_runs"
    cache_dir: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lam: float | None = None
    precision: str = "fp32"
    device: str | None = None
    num_workers: int = 0
    cache_train_features: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)
    setting: str = DEFAULT_SETTING
    prompt: PromptOverrides = field(default_factory=PromptOverrides)
    prograd_groups: str = "together"

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = SETTING_MODELS.get(self.setting, SETTING_MODELS[DEFAULT_SETTING])


def plan(protocol: str, datasets: Sequence[str] | None, methods: Sequence[str],
         shots: Sequence[int] | None, seeds: Sequence[int], source: str = SOURCE,
         setting: str = DEFAULT_SETTING) -> list[Run]:
    """The runs of a protocol's grid, data set by data set (their test features stay hot)."""
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ProtocolError(f"unknown method(s) {bad}: use {', '.join(METHODS)}")
    # a repeated value is one run (a table must not average a run with itself)
    methods, seeds = list(dict.fromkeys(methods)), list(dict.fromkeys(seeds))
    shots = list(dict.fromkeys(shots or default_shots(protocol, setting)))
    if any(k < 1 for k in shots) or not seeds:
        raise ProtocolError("shots must be >= 1 and at least one seed is needed")
    if protocol != "fewshot" and len(shots) != 1:
        raise ProtocolError(f"{protocol} takes one --shots value (its table has no shots axis)")
    src = get_spec(source)
    specs = list({s.name: s for s in map(get_spec, datasets or default_datasets(protocol, src.name))
                  if protocol in ("fewshot", "base2new") or s.name != src.name}.values())
    runs: list[Run] = []

    def add(dataset, classes, tests):
        for m in methods:
            if not get_method(m).trains:
                runs.append(Run(dataset, classes, m, 0, 0, tests))
                continue
            runs.extend(Run(dataset, classes, m, k, s, tests) for k in shots for s in seeds)

    if protocol in ("fewshot", "base2new"):
        for spec in specs:
            if spec.test_only:
                raise DatasetError(f"{spec.name} is a test-only data set: use it as an xd/dg "
                                   f"target, not in --datasets of {protocol}")
            if protocol == "fewshot":
                add(spec.name, "all", (f"{spec.name}/all",))
            else:
                add(spec.name, "base", (f"{spec.name}/base", f"{spec.name}/new"))
    else:  # the source is always tested first, so it is never also a target
        if src.test_only:
            raise DatasetError(f"{src.name} is a test-only data set: it cannot be the source")
        add(src.name, "all", (f"{src.name}/all",) + tuple(f"{s.name}/all" for s in specs))
    return runs


def _check_options(opts: GridOptions) -> None:
    """Refuse bad overrides before any work (the trainer would stop mid-grid with a traceback)."""
    from ..checks import AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT, range_error

    bad = range_error((("--epochs", opts.epochs, AT_LEAST_0),
                       ("--batch-size", opts.batch_size, AT_LEAST_1),
                       ("--lr", opts.lr, POSITIVE), ("--lam", opts.lam, UNIT),
                       ("--num-workers", opts.num_workers, AT_LEAST_0),
                       ("--n-ctx", opts.prompt.n_ctx, AT_LEAST_1)))
    if bad:
        raise ProtocolError(bad)
    for method in dict.fromkeys(opts.methods):  # overrides a method's learner does not take
        if method in METHODS:
            method_prompt(method, "ImageNet", opts.setting, opts.prompt, opts.protocol)
    if opts.prograd_groups not in ("together", "apart"):
        raise ProtocolError(f"--prograd-groups must be together or apart, got "
                            f"{opts.prograd_groups!r}")
    if opts.prompt.csc and opts.protocol != "fewshot":
        raise ProtocolError(f"--csc: a class-specific context cannot be tested on other classes "
                            f"({opts.protocol} does): use it with fewshot")
    from ..runs import RunFolderError, check_writable

    try:
        check_writable(Path(opts.output_dir))
        if opts.cache_dir:
            check_writable(Path(opts.cache_dir), "--cache-dir")
    except RunFolderError as e:
        raise ProtocolError(str(e)) from None


class GridRunner:
    """Loads the model once, then runs (or skips, or resumes) every run of the grid."""

    def __init__(self, opts: GridOptions, log=print) -> None:
        _check_options(opts)
        self.opts = opts
        self.device = parallel.init_from_env(opts.device)
        self.log = log if parallel.is_main() else (lambda *a, **k: None)
        self._splits: dict[str, tuple] = {}
        self._fewshot: dict[tuple[str, int, int], tuple] = {}
        self._warned: set[tuple[str, int]] = set()  # (data set, shots) with too few images
        self.runs = plan(opts.protocol, opts.datasets, opts.methods, opts.shots, opts.seeds,
                         opts.source, opts.setting)
        for name in {r.dataset for r in self.runs} | {t.split("/")[0] for r in self.runs
                                                      for t in r.tests}:
            self._split(name)  # every data set is checked before the first run
        for run in self.runs:  # and every few-shot set (pickles read, images present)
            if run.trained:
                self._few_shot(run)
        torch.manual_seed(0)  # random weights (--pretrained none, tests) are the same every call
        self.clip, self.tokenizer, size, mean, std = load_model(opts.model, opts.pretrained,
                                                                self.device)
        self._check_image_tower()
        self.test_tf = coop_transforms(size, mean, std, augment=False)
        self.train_tf = coop_transforms(size, mean, std, augment=True)
        self.autocast = PRECISIONS[opts.precision]
        self.model_fp = model_fingerprint(self.clip)
        cache_dir = opts.cache_dir or str(Path(opts.output_dir) / "features")
        self.cache = FeatureCache(cache_dir, self.device, num_workers=opts.num_workers,
                                  autocast_dtype=self.autocast)
        self.out = Path(opts.output_dir)
        self._features: dict[str, tuple] = {}
        self._test_ids: dict[str, str] = {}
        self.trained = 0  # runs that trained at least one epoch in this call
        on_images = [m for m in dict.fromkeys(opts.methods) if prompts_image_tower(m)]
        if opts.cache_train_features and on_images:
            self.log(f"--cache-train-features: {', '.join(on_images)} train on images (they "
                     f"prompt the image tower: cached image features are not valid for them)")
        self._check_images()

    def _check_image_tower(self) -> None:
        """A method that prompts the image tower needs a transformer there (ViT): refused
        before the first run on another one (RN50, the ``prograd`` setting's backbone)."""
        if getattr(self.clip.visual, "transformer", None) is not None:
            return
        bad = [m for m in dict.fromkeys(self.opts.methods) if prompts_image_tower(m)]
        if bad:
            raise ProtocolError(f"{', '.join(bad)} prompt(s) the image tower's transformer: "
                                f"{self.opts.model} has none (use --setting cocoop or a ViT "
                                f"--model)")

    def _check_images(self) -> None:
        """Read the header (and JPEG stream) of every image this call will load, before the
        first run: the few-shot sets of runs with work left and the test sets whose features
        are not cached.  A bad one is one line naming it."""
        from ..datasets.images import check_images

        todo = parallel.broadcast_object([i for i, r in enumerate(self.runs)
                                          if self._missing(r, self._result(r)[0])]
                                         if parallel.is_main() else None)
        for i in todo:
            if self.runs[i].trained:
                check_images(self._few_shot(self.runs[i])[0])
        on_images = {t.split("/")[0] for i in todo for t in self.runs[i].tests
                     if self._on_images(self.runs[i])}
        for name in dict.fromkeys(t.split("/")[0] for i in todo for t in self.runs[i].tests):
            _, split, _ = self._split(name)
            key, _ = self.cache.key(self.clip, split.test, self.test_tf)
            if name in on_images or self.cache.root is None \
                    or not (self.cache.root / f"{key}.pt").is_file():
                check_images(split.test)

    @staticmethod
    def _on_images(run: Run) -> bool:
        """Whether the run is tested on images, not on cached features."""
        return run.trained and prompts_image_tower(run.method)

    # ------------------------------------------------------------------ data
    def _split(self, name: str):
        if name not in self._splits:
            spec = get_spec(name)
            self._splits[name] = (spec, read_dataset(spec, self.opts.root),
                                  dataset_folder(spec, self.opts.root))
        return self._splits[name]

    def _few_shot(self, run: Run) -> tuple[list, str, str]:
        """The run's few-shot items (all classes), where they came from and their identity."""
        key = (run.dataset, run.shots, run.seed)
        if key not in self._fewshot:
            spec, full, folder = self._split(run.dataset)
            items, source = few_shot_train(spec, folder, full, run.shots, run.seed)
            self._fewshot[key] = (items, source, _items_id(items, folder))
            short = few_shot_shortfall(full, run.shots) if source == "draw" else None
            if short and parallel.is_main() and (run.dataset, run.shots) not in self._warned:
                self._warned.add((run.dataset, run.shots))
                print(f"prograd-fast: warning: {run.dataset}: {short}", file=sys.stderr)
        return self._fewshot[key]

    def _test_id(self, name: str) -> str:
        """The identity of a data set's test list (its images and labels)."""
        if name not in self._test_ids:
            _, split, folder = self._split(name)
            self._test_ids[name] = _items_id(split.test, folder)
        return self._test_ids[name]

    def _test_features(self, name: str):
        """A test set's features: kept in memory (least recently used first out, up to
        ``FEATURES_IN_MEMORY`` bytes), else from the disk cache, else encoded once."""
        if name in self._features:
            self._features[name] = self._features.pop(name)  # most recently used
            return self._features[name]
        _, split, _ = self._split(name)
        self._features[name] = self.cache.get(self.clip, split.test, self.test_tf)
        def held() -> int:
            return sum(f.numel() * f.element_size() for f, _ in self._features.values())

        while len(self._features) > 1 and held() > FEATURES_IN_MEMORY:
            self._features.pop(next(iter(self._features)))
        return self._features[name]

    # ------------------------------------------------------------------ settings
    def schedule(self, run: Run) -> Schedule:
        s = official_schedule(self.opts.protocol, run.dataset, run.shots, run.method,
                              self.opts.setting)
        o = self.opts
        over = {k: v for k, v in (("epochs", o.epochs), ("batch_size", o.batch_size), ("lr", o.lr))
                if v is not None}
        if o.lam is not None and get_method(run.method).prograd:
            over["lam"] = o.lam
        return Schedule(**{**s.as_dict(), **over})

    def prompt(self, method: str, dassl_name: str) -> dict:
        """The method's prompt in this grid's setting, with the ablation overrides."""
        return method_prompt(method, dassl_name, self.opts.setting, self.opts.prompt,
                             self.opts.protocol)

    def settings(self, run: Run) -> dict:
        spec = get_spec(run.dataset)
        out = {"format": RUN_FORMAT, "dataset": run.dataset, "classes": run.classes,
               "method": run.method, "model": self.opts.model, "pretrained": self.opts.pretrained,
               "model_sha256": self.model_fp, "prompt": self.prompt(run.method, spec.dassl),
               "precision": self.opts.precision}
        if run.trained:  # the few-shot images (drawn or a cached pickle's) are part of the run
            out.update(shots=run.shots, seed=run.seed, schedule=self.schedule(run).as_dict(),
                       inputs="features" if self._train_on_features(run) else "images",
                       train_items=self._few_shot(run)[2])
            if self.opts.prograd_groups != "together":  # (absent: the runs made before it)
                out["prograd_groups"] = self.opts.prograd_groups
        return out

    def _train_on_features(self, run: Run) -> bool:
        """``--cache-train-features``, except for a learner that prompts the image tower."""
        return self.opts.cache_train_features and not prompts_image_tower(run.method)

    def run_dir(self, run: Run) -> Path:
        settings = self.settings(run)
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        base = self.out / "runs" / run.dataset / run.classes / run.method
        if not run.trained:
            return base / f"zeroshot-{digest}"
        return base / f"shots{run.shots}-seed{run.seed}-ep{settings['schedule']['epochs']}-{digest}"

    # ------------------------------------------------------------------ one run
    def _result(self, run: Run) -> tuple[dict, str | None]:
        """The run's result (empty when there is none) and why a ``result.json`` there was
        not used (None: it was, or there was none)."""
        path = self.run_dir(run) / "result.json"
        settings = self.settings(run)
        if parallel.is_main() and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):  # never half-written by us
                data, why = None, "is not valid JSON"
            else:
                why = check_result(data, settings)
            if why is None:
                return data, None
            return {"settings": settings, "tests": {}}, f"{path} {why}"
        return {"settings": settings, "tests": {}}, None

    def _missing(self, run: Run, result: dict) -> list[str]:
        """The run's tests that its result lacks or made on another test list."""
        made_on = result.get("test_sets", {})
        return [t for t in run.tests if t not in result["tests"]
                or made_on.get(t) != self._test_id(t.split("/")[0])]

    def _train(self, run: Run, out: Path) -> tuple[PromptedCLIP, str, int]:
        """The trained prompt (resumed, or loaded when finished), where its few-shot items
        came from, and the number of epochs run now."""
        spec, full, _ = self._split(run.dataset)
        items, source, _ = self._few_shot(run)
        split = subsample_classes(Split(items, [], [], full.classnames), run.classes)
        torch.manual_seed(run.seed)  # the random context (CoOp) depends on the seed only
        try:  # an ablation's prompt that cannot be built (too long, too short for its words)
            model = PromptedCLIP(self.clip, split.classnames, tokenizer=self.tokenizer,
                                 learner=get_method(run.method).learner,
                                 **self.prompt(run.method, spec.dassl))
        except ValueError as exc:
            raise ProtocolError(f"{run.title()}: {exc}") from None
        s = self.schedule(run)
        if self._train_on_features(run):
            feats, labels = self.cache.get(self.clip, split.train, self.test_tf)
            train_set, inputs = TensorDataset(feats, labels), "features"
        else:
            train_set, inputs = ImageDataset(split.train, self.train_tf, seed=run.seed), "images"
        cfg = TrainConfig(method=run.method, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                          momentum=s.momentum, weight_decay=s.weight_decay,
                          warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
                          lam=s.lam if get_method(run.method).prograd else 0.0,
                          temperature=s.temperature, precision=self.opts.precision,
                          seed=run.seed, num_workers=self.opts.num_workers, drop_last=True,
                          output_dir=str(out), progress=self.opts.progress, inputs=inputs,
                          prograd_groups=self.opts.prograd_groups,
                          plot=False, extra={"few_shot_source": source})
        trainer = Trainer(model, train_set, None, cfg, self.device)
        try:
            resumed = trainer.maybe_resume()
        except Exception as e:  # unreadable or not this run's: keep it for a look, train again
            path = out / "checkpoint.pt"
            parallel.barrier()  # every process has read it before it moves
            if parallel.is_main() and path.exists():
                aside = move_aside(path)
                reason = " ".join(str(e).split())[:200] or type(e).__name__
                self.log(f"{run.title()}: {path} is unreadable ({reason}): moved to "
                         f"{aside.name}; training again")
            parallel.barrier()
            return self._train(run, out)
        if resumed and trainer.epoch < s.epochs:
            self.log(f"{run.title()}: resuming from the checkpoint of epoch {trainer.epoch}")
        start = trainer.epoch
        trainer.fit(resume=False)
        return model, source, s.epochs - start

    def _test(self, run: Run, model: PromptedCLIP | None, test: str) -> float:
        name, classes = test.split("/")
        spec, full, _ = self._split(name)
        n = len(full.classnames)
        keep = torch.tensor(class_subset(n, classes))
        remap = torch.full((n,), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        classnames = [full.classnames[i] for i in keep.tolist()]
        prompt = self.prompt(run.method, spec.dassl)
        if model is None:  # zero-shot: CoOp's template of the tested data set
            torch.manual_seed(0)
            tested = PromptedCLIP(self.clip, classnames, tokenizer=self.tokenizer, **prompt)
        elif name == run.dataset and classes == run.classes:
            tested = model
        else:  # base -> new, or another data set: the learned context on these class names
            tested = transfer_context(model, classnames, templates=spec.dassl,
                                      tokenizer=self.tokenizer, ctx_init=prompt.get("ctx_init"))
        tested.to(self.device)
        on_images = self._on_images(run)
        if on_images:  # its image features depend on its prompts: the test images themselves
            kept = set(keep.tolist())
            items = [Item(it.path, int(remap[it.label])) for it in full.test if it.label in kept]
            loader = DataLoader(ImageDataset(items, self.test_tf), batch_size=TEST_BATCH,
                                num_workers=self.opts.num_workers)
        else:
            feats, labels = self._test_features(name)
            mask = torch.isin(labels, keep)
            loader = DataLoader(TensorDataset(feats[mask], remap[labels[mask]]), batch_size=1000)
        correct, total = correct_counts(tested, loader, self.device, zeroshot=model is None,
                                        autocast_dtype=self.autocast,
                                        inputs_are_features=not on_images).tolist()
        return 100.0 * correct / max(total, 1)

    def execute(self, run: Run) -> dict:
        """Train (or resume) and test ``run`` unless its result is complete; its result."""
        out = self.run_dir(run)
        result, why = parallel.broadcast_object(self._result(run))
        ids = {t: self._test_id(t.split("/")[0]) for t in run.tests}
        made_on = result.setdefault("test_sets", {})
        # a test made on another test list (the data set changed since) is made again
        missing = self._missing(run, result)
        if not missing:
            return result
        if why is not None:
            self.log(f"{run.title()}: {why}: testing it again")
        elif result["tests"]:
            changed = [t for t in missing if t in result["tests"]]
            if changed:
                self.log(f"{run.title()}: test set(s) {', '.join(changed)} changed since tested "
                         f"(images, labels, sizes or modification times): testing again")
        elif not out.exists():
            redone = why_redone(out, result["settings"])
            if redone:
                self.log(f"{run.title()}: {redone}: {'training' if run.trained else 'testing'} "
                         f"it again in {out.name}")
        start = time.time()
        model = None
        if run.trained:
            if parallel.is_main():
                atomic_write_json(out / "settings.json", result["settings"])
            model, result["few_shot_source"], epochs = self._train(run, out)
            self.trained += epochs > 0
        for test in missing:
            result["tests"][test] = self._test(run, model, test)
            result["test_sets"][test] = ids[test]
        result["seconds"] = round(time.time() - start, 2)
        result = seal(result)
        if parallel.is_main():
            atomic_write_json(out / "result.json", result)
        parallel.barrier()
        return result

    # ------------------------------------------------------------------ the grid
    def run(self) -> list[tuple[Run, dict]]:
        from tqdm.auto import tqdm

        o = self.opts
        self.log(f"{o.protocol}: {len(self.runs)} runs ({', '.join(o.methods)}; "
                 f"{len({r.dataset for r in self.runs})} training data set(s)) on {o.model}"
                 f"{'/' + o.pretrained if o.pretrained else ''}, {parallel.world_size()} "
                 f"process(es), output {self.out}")
        results = []
        bar = tqdm(self.runs, desc=o.protocol, disable=not o.progress or not parallel.is_main())
        # lines go above the bar, which stays at the bottom and is left behind at the end
        say = (lambda msg: tqdm.write(str(msg))) if not bar.disable and self.log is print else self.log
        for i, run in enumerate(bar):
            bar.set_postfix_str(run.title())
            res = self.execute(run)
            results.append((run, res))
            accs = ", ".join(f"{t} {res['tests'][t]:.2f}" for t in run.tests)
            say(f"[{i + 1}/{len(self.runs)}] {run.title()}: {accs}")
        bar.close()
        self.log(f"trained {self.trained} run(s); image features: {self.cache.misses} computed, "
                 f"{self.cache.hits} from the cache")
        return results


def _items_id(items, folder: str) -> str:
    """SHA-256 of the items' paths under the data set folder, labels, sizes and modification
    times (as the feature cache keys images): which images a run trains or is tested on, and
    whether any was replaced since."""
    h = hashlib.sha256()
    for it in items:
        try:
            st = os.stat(it.path)
            stat = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:
            stat = "missing"
        h.update(f"{os.path.relpath(str(it.path), folder)}\0{it.label}\0{stat}\n".encode())
    return h.hexdigest()[:16]
