"""How a grid's table was made: its setting, model, seeds, and every setting that differs
from the official configs (the table's caption and the JSON's ``meta``)."""

from __future__ import annotations

from ..methods import METHODS, get_method
from .config import (OFFICIAL_PRECISION, SETTING_MODELS, default_shots, method_settings,
                     official_schedule, prompts_image_tower)

__all__ = ["grid_meta", "OFFICIAL_PRETRAINED"]

OFFICIAL_PRETRAINED = "openai"  # every official config loads OpenAI's CLIP weights


METHODS_KEY = "methods (settings that differ from CoOp's)"


def _official(opts, name: str, coop: object) -> tuple[set, str]:
    """The official values of a schedule setting over the grid's trained methods, and how
    the caption states them (CoOp's when every method has CoOp's, else per method)."""
    per_method = {}
    for m in dict.fromkeys(opts.methods):
        if m in METHODS and get_method(m).trains:
            s = official_schedule(opts.protocol, "dtd", 16, m, opts.setting)
            per_method[m] = getattr(s, name)
    values = set(per_method.values()) or {coop}
    if len(values) == 1:
        return values, str(next(iter(values)))
    return values, ", ".join(f"{m} {v}" for m, v in per_method.items())


def grid_meta(opts, processes: int = 1) -> dict:
    """``{"setting", "model", "seeds", "processes", "methods ...": {...}, "differs": {...}}``:
    seeds once each, in order; ``methods ...`` maps each method whose official settings
    differ from CoOp's (its own configs: depth, n_ctx, W, batch, lr, epochs) to them;
    ``differs`` maps each setting that is not the official one to what ran and what the
    official configs use."""
    seeds = list(dict.fromkeys(opts.seeds))
    differs: dict[str, str] = {}
    official_model = SETTING_MODELS[opts.setting]
    if opts.model != official_model:
        differs["model"] = f"{opts.model} (official: {official_model})"
    if opts.pretrained is None:
        differs["pretrained"] = "none: random weights (official: openai)"
    elif opts.pretrained != OFFICIAL_PRETRAINED:
        differs["pretrained"] = f"{opts.pretrained} (official: {OFFICIAL_PRETRAINED})"
    if opts.shots:
        shots = list(dict.fromkeys(opts.shots))
        official = list(default_shots(opts.protocol, opts.setting))
        if shots != official:
            differs["shots"] = (f"{' '.join(map(str, shots))} (official: "
                                f"{' '.join(map(str, official))})")
    for name, value, official in (("epochs", opts.epochs, "per data set and shots"),
                                  ("lambda", opts.lam, "1.0 (0.8 for 8 and 16 shots on "
                                   "Flowers102, DTD, EuroSAT)")):
        if value is not None and value != official:
            differs[name] = f"{value} (official: {official})"
    for name, key, value, coop in (("lr", "lr", opts.lr, 0.002),
                                   ("batch size", "batch_size", opts.batch_size, 32)):
        values, official = _official(opts, key, coop)
        if value is not None and values != {value}:
            differs[name] = f"{value} (official: {official})"
    if opts.precision != OFFICIAL_PRECISION:
        differs["precision"] = f"{opts.precision} (official: {OFFICIAL_PRECISION})"
    if opts.cache_train_features:
        on_images = [m for m in dict.fromkeys(opts.methods)
                     if m in METHODS and prompts_image_tower(m)]
        differs["training inputs"] = ("cached features, no augmentation (--cache-train-features"
                                      + (f"; images for {', '.join(on_images)}: they prompt "
                                         f"the image tower" if on_images else "") + ")")
    if getattr(opts, "prograd_groups", "together") != "together":
        differs["prograd groups"] = (f"{opts.prograd_groups}: each tower's prompt projected on "
                                     f"its own (official: together, the whole prompt as one "
                                     f"vector)")
    for name, value in opts.prompt.active().items():
        differs[name] = f"{value} (ablation)"
    meta = {"setting": opts.setting,
            "model": opts.model + (f"/{opts.pretrained}" if opts.pretrained else ""),
            "seeds": " ".join(map(str, seeds)), "processes": processes}
    shots = tuple(dict.fromkeys(opts.shots)) if opts.shots else None
    methods = {m: method_settings(m, opts.protocol, opts.setting, shots)
               for m in dict.fromkeys(opts.methods)}
    methods = {m: text for m, text in methods.items() if text}
    if methods:
        meta[METHODS_KEY] = methods
    if differs:
        meta["differs from the official configs"] = differs
    return meta
