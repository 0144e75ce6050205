"""Leaderboard figures keep their title and legends inside the figure, whatever the number of tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from retbench.leaderboard import plots

MODELS = ("classical.default", "local:flair", "local:flair@random", "local:mae", "local:mae@random", "timm:resnet18",
          "tinyclip.test")
TASKS = ("csdi_cataract_severity", "eye4class", "eye4class_dr_grading", "mx_dme_cfp_dr", "mx_dme_oct_dme",
         "retinamnist", "messidor", "aptos2019")
PROTOCOL = "linear_probe.flair_grouped"  # the longest shipped protocol name: the longest titles


def _figures(n: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Figure]:
    """Every kind of leaderboard figure for ``n`` tasks and seven models, as drawn (not saved)."""
    drawn: list[Figure] = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path, dpi=110: drawn.append(fig) or FigureCanvasAgg(fig) and path)
    tasks, colours = TASKS[:n], plots.model_colours(MODELS)
    rng = np.random.default_rng(0)
    curves = {t: {m: [(k, 0.5 + 0.02 * k, 0.45, 0.6) for k in (1, 2, 4, 8, 16)] for m in MODELS} for t in tasks}
    plots.plot_few_shot_curves(curves, dict.fromkeys(tasks, "kappa_quadratic"), colours, tmp_path / "c.png",
                               f"{PROTOCOL}: metric against shots per class (mean and 95% CI over seeds)")
    values = {c: {m: (0.7, 0.65, 0.75) for m in MODELS} for c in (*tasks, "mean")}
    labels = {c: f"{c}\nkappa_quadratic" for c in values}
    plots.plot_task_bars(values, labels, sorted(MODELS), colours, tmp_path / "b.png",
                         f"{PROTOCOL}: per task, mean and 95% CI")
    tpr = np.sqrt(plots.ROC_GRID)
    panels = {t: {m: (tpr, 0.8) for m in MODELS} for t in tasks}
    plots.plot_roc_curves(panels, dict.fromkeys(tasks, "macro one-vs-rest, 5 classes, k=16, mean of 10 runs"), colours,
                          tmp_path / "r.png", f"{PROTOCOL}: ROC curves on the test set")
    for models in (MODELS[:1], MODELS):
        matrices = {m: rng.dirichlet(np.ones(5), size=5) for m in models}
        plots.plot_confusion_matrices(matrices, ["no DR", "mild", "moderate", "severe", "proliferative DR"],
                                      tmp_path / "m.png", f"{TASKS[0]} ({PROTOCOL}): row-normalised confusion "
                                      "matrices, pooled over runs")
    return dict(zip(("curves", "bars", "roc", "confusion of one model", "confusion"), drawn))


def _texts(fig: Figure) -> dict[str, Any]:
    """The figure's titles and legends: what a reader must see whole."""
    out: dict[str, Any] = {"suptitle": fig._suptitle} if fig._suptitle is not None else {}
    out.update({f"legend {i}": legend for i, legend in enumerate(fig.legends)})
    for i, ax in enumerate(a for a in fig.axes if a.get_visible()):
        if ax.get_title():
            out[f"axes {i} title"] = ax.title
        if ax.get_legend() is not None:
            out[f"axes {i} legend"] = ax.get_legend()
    return out


@pytest.mark.parametrize("n_tasks", [1, 2, 8])
def test_titles_and_legends_lie_inside_the_figure(n_tasks: int, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    for kind, fig in _figures(n_tasks, monkeypatch, tmp_path).items():
        fig.set_dpi(110)  # as saved
        fig.canvas.draw()
        renderer, box = fig.canvas.get_renderer(), fig.bbox
        texts = _texts(fig)
        assert "suptitle" in texts or "axes 0 title" in texts, kind
        if kind in ("curves", "roc", "bars"):
            assert any("legend" in name for name in texts), kind
        for name, artist in texts.items():
            ext = artist.get_window_extent(renderer)
            assert box.x0 - 0.5 <= ext.x0 and ext.x1 <= box.x1 + 0.5 and box.y0 - 0.5 <= ext.y0 \
                and ext.y1 <= box.y1 + 0.5, f"{n_tasks} tasks, {kind}: {name} {ext.bounds} outside {box.bounds}"
