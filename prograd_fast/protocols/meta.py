"""How a grid's table was made: its setting, model, seeds, and every setting that differs
from the official configs (the table's caption and the JSON's ``meta``)."""

from __future__ import annotations

from .config import OFFICIAL_PRECISION, SETTING_MODELS, default_shots

__all__ = ["grid_meta", "OFFICIAL_PRETRAINED"]

OFFICIAL_PRETRAINED = "openai"  # every official config loads OpenAI's CLIP weights


def grid_meta(opts, processes: int = 1) -> dict:
    """``{"setting", "model", "seeds", "processes", "differs": {...}}``: seeds once each, in
    order; ``differs`` maps each setting that is not the official one to what ran and what
    the official configs use."""
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
                                  ("lr", opts.lr, 0.002), ("batch size", opts.batch_size, 32),
                                  ("lambda", opts.lam, "1.0 (0.8 for 8 and 16 shots on "
                                   "Flowers102, DTD, EuroSAT)")):
        if value is not None and value != official:
            differs[name] = f"{value} (official: {official})"
    if opts.precision != OFFICIAL_PRECISION:
        differs["precision"] = f"{opts.precision} (official: {OFFICIAL_PRECISION})"
    if opts.cache_train_features:
        differs["training inputs"] = "cached features, no augmentation (--cache-train-features)"
    for name, value in opts.prompt.active().items():
        differs[name] = f"{value} (ablation)"
    meta = {"setting": opts.setting,
            "model": opts.model + (f"/{opts.pretrained}" if opts.pretrained else ""),
            "seeds": " ".join(map(str, seeds)), "processes": processes}
    if differs:
        meta["differs from the official configs"] = differs
    return meta
