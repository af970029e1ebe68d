"""The protocols' two official settings, the ablation overrides, and honest plots."""

from __future__ import annotations

import pytest

from prograd_fast.protocols import plan
from prograd_fast.protocols.config import (PromptOverrides, default_shots, method_prompt,
                                           official_schedule)


def test_prograd_setting_is_the_official_prograd_code():
    assert default_shots("base2new") == (4,) and default_shots("fewshot") == (1, 2, 4, 8, 16)
    assert official_schedule("base2new", "dtd", 4, "prograd").epochs == 100
    # ProGrad's own zero-shot templates (they differ from CoOp's on OxfordPets)
    zs = method_prompt("zeroshot", "OxfordPets")
    assert zs["template_set"] == "prograd"
    assert method_prompt("zeroshot", "OxfordPets", "cocoop")["template_set"] == "coop"


def test_cocoop_setting_shots_and_schedules():
    assert default_shots("base2new", "cocoop") == (16,) and default_shots("xd", "cocoop") == (16,)
    assert default_shots("fewshot", "cocoop") == (1, 2, 4, 8, 16)
    assert [r.shots for r in plan("base2new", ["dtd"], ["coop"], None, [1], setting="cocoop")] == [16]
    assert official_schedule("base2new", "dtd", 16, "coop", "cocoop").epochs == 200
    assert official_schedule("base2new", "imagenet", 16, "coop", "cocoop").epochs == 50
    assert official_schedule("base2new", "dtd", 16, "prograd", "cocoop").epochs == 100
    assert method_prompt("coop", "DescribableTextures", "cocoop")["ctx_init"] == "a photo of a"
    with pytest.raises(ValueError, match="unknown setting"):
        default_shots("base2new", "coco")


def test_ablation_overrides_reach_the_prompt():
    o = PromptOverrides(n_ctx=8, csc=True, class_token_position="middle")
    p = method_prompt("coop", "DescribableTextures", "cocoop", o)
    assert p["n_ctx"] == 8 and "ctx_init" not in p  # CoOp's init words would fix the length
    assert p["class_specific"] and p["class_token_position"] == "middle"
    g = method_prompt("prograd", "DescribableTextures", "prograd", PromptOverrides(ctx_init="none"))
    assert "ctx_init" not in g and "ctx_init_mode" not in g
    assert method_prompt("zeroshot", "DescribableTextures", "prograd", o).get("n_ctx") == 16
    assert o.active() == {"n-ctx": 8, "csc": True, "class-token-position": "middle"}


def _cell(mean, std, n):
    return {"mean": mean, "std": std, "n": n}


@pytest.mark.parametrize("protocol", ["base2new", "fewshot", "xd"])
def test_plots_have_error_bars_full_axes_and_a_legend_off_the_bars(protocol):
    pytest.importorskip("matplotlib")
    from matplotlib.container import ErrorbarContainer
    import matplotlib.pyplot as plt

    from prograd_fast.protocols.tables import figure

    if protocol == "base2new":
        cols = ["base", "new", "H"]
        rows = [{"dataset": "DTD", "method": m, "cells": {
            "base": _cell(70.0, 2.0, 3), "new": _cell(60.0, 1.5, 3), "H": _cell(64.6, None, 3)}}
            for m in ("coop", "prograd")]
    elif protocol == "fewshot":
        cols = ["0", "1", "2"]
        rows = [{"dataset": "DTD", "method": "zeroshot", "cells": {"0": _cell(40.0, 0.0, 1)}},
                {"dataset": "DTD", "method": "coop",
                 "cells": {"1": _cell(50.0, 3.0, 3), "2": _cell(55.0, 2.0, 3)}}]
    else:
        cols = ["ImageNet", "DTD", "Average"]
        rows = [{"dataset": "ImageNet", "method": m, "cells": {
            "ImageNet": _cell(60.0, 1.0, 3), "DTD": _cell(40.0, 2.0, 3),
            "Average": _cell(40.0, None, 1)}} for m in ("coop", "prograd")]
    fig = figure({"protocol": protocol, "columns": cols, "rows": rows})
    axes = [ax for ax in fig.axes if ax.axison]
    bars = [c for ax in axes for c in ax.containers]
    assert any(isinstance(c, ErrorbarContainer) for c in bars) or any(
        getattr(c, "errorbar", None) is not None for c in bars)
    assert all(ax.get_ylim() == (0.0, 100.0) for ax in axes)
    assert fig.legends and not any(ax.get_legend() for ax in axes)
    plt.close(fig)


def test_demo_plot_shows_the_spread_over_seeds_on_a_full_axis():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from prograd_fast.clip.demo import _figure

    rows = [{"method": "zero-shot", "shots": 0, "seed": 0, "base": 67.0, "new": 62.0}]
    rows += [{"method": m, "shots": k, "seed": s, "base": 60.0 + s, "new": 55.0 - s}
             for m in ("CoOp", "ProGrad") for k in (1, 4) for s in (1, 2, 3)]
    fig = _figure(rows, (1, 4))
    assert any(c.has_yerr for ax in fig.axes[:2] for c in ax.containers)
    assert all(ax.get_ylim() == (0.0, 100.0) for ax in fig.axes)
    assert fig.legends and not any(ax.get_legend() for ax in fig.axes)
    plt.close(fig)


def test_training_curves_show_accuracy_on_the_whole_scale(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from prograd_fast.clip.trainer import plot_history

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [{"epoch": e, "lr": 0.002, "ce": 1.0 / e, "kl": 0.1, "conflict_rate": 0.2,
             "acc": 50.0 + e} for e in (1, 2)]
    assert plot_history(rows, tmp_path / "curves.png")
    assert figures[0].axes[0].get_ylim() == (0.0, 100.0)
