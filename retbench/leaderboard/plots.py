"""Leaderboard figures (matplotlib, PNG): few-shot curves, per-task bars, ROC curves, confusion matrices.

The plotting functions take plain numbers — no access to the result store — and write one PNG each
through matplotlib's object-oriented API (no pyplot state, no GUI backend). The files carry no
timestamp or software metadata, so the same numbers and matplotlib version give the same bytes.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from sklearn.metrics import confusion_matrix, roc_curve

from retbench.atomic_files import atomic_write_bytes

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
"""Model colours (matplotlib's tab10), assigned in sorted model order so a model keeps its colour."""

Point = tuple[int, float, float | None, float | None]
"""One point of a curve: (k, mean, CI low, CI high)."""

MIN_WIDTH = 6.5
"""The narrowest figure (inches): a single panel still leaves its title and legend room."""


def model_colours(models: Sequence[str]) -> dict[str, str]:
    """A fixed colour per model (sorted names, cycling through :data:`PALETTE`)."""
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(sorted(set(models)))}


def save_png(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Render ``fig`` to ``path`` atomically, without metadata (deterministic bytes)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return path


def _grid(n: int, ncols: int = 3, width: float = 4.3, height: float = 3.5) -> tuple[Figure, np.ndarray]:
    cols = max(1, min(ncols, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(max(MIN_WIDTH, width * cols), height * rows + 0.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _legend_below(fig: Figure, models: Sequence[str], colours: Mapping[str, str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([0], [0], color=colours[m], lw=2.5) for m in models]
    renderer = FigureCanvasAgg(fig).get_renderer()
    for ncols in range(min(len(models), 4), 0, -1):  # as many columns (up to 4) as the figure's width holds
        legend = fig.legend(handles, list(models), loc="outside lower center", ncols=ncols, frameon=False)
        if ncols == 1 or legend.get_window_extent(renderer).width <= 0.98 * fig.bbox.width:
            break
        legend.remove()


def _fit_width(fig: Figure, text: Text) -> Text:
    """Wrap ``text`` (a title) onto more lines until it is no wider than the figure; unchanged when it fits."""
    renderer, whole = FigureCanvasAgg(fig).get_renderer(), text.get_text()
    chars = len(whole)
    while (wide := text.get_window_extent(renderer).width) > 0.98 * fig.bbox.width and chars > 12:
        chars = min(chars - 1, int(chars * 0.98 * fig.bbox.width / wide))
        text.set_text("\n".join(textwrap.wrap(whole, max(chars, 12), break_on_hyphens=False)))
    return text


def plot_few_shot_curves(curves: Mapping[str, Mapping[str, Sequence[Point]]], ylabel: Mapping[str, str],
                         colours: Mapping[str, str], path: Path, title: str) -> Path:
    """Metric against shots per class k, one panel per task, one line per model, 95% CI bands.

    ``curves[task][model]`` is a list of (k, mean, low, high); a point without a CI has no band.
    """
    tasks = list(curves)
    fig, axes = _grid(len(tasks))
    models = sorted({m for t in tasks for m in curves[t]})
    for ax, task in zip(axes, tasks):
        ks_all = sorted({p[0] for pts in curves[task].values() for p in pts})
        for model in models:
            pts = sorted(curves[task].get(model, []))
            if not pts:
                continue
            ks = np.array([p[0] for p in pts], dtype=float)
            ax.plot(ks, [p[1] for p in pts], marker="o", ms=4, lw=1.8, color=colours[model], label=model)
            banded = [p for p in pts if p[2] is not None and p[3] is not None]
            if banded:
                ax.fill_between([p[0] for p in banded], [p[2] for p in banded], [p[3] for p in banded],
                                color=colours[model], alpha=0.18, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks_all, [str(k) for k in ks_all])
        ax.minorticks_off()
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("shots per class (k)")
        ax.set_ylabel(ylabel.get(task, ""))
        ax.grid(alpha=0.3)
    _legend_below(fig, models, colours)
    _fit_width(fig, fig.suptitle(title))
    return save_png(fig, path)


def plot_task_bars(values: Mapping[str, Mapping[str, tuple[float, float | None, float | None]]],
                   labels: Mapping[str, str], models: Sequence[str], colours: Mapping[str, str], path: Path,
                   title: str, ylabel: str = "") -> Path:
    """Grouped bars: one group per column (task, or the mean), one bar per model, 95% CI whiskers.

    ``values[column][model] = (mean, low, high)``; a missing model leaves a gap.
    """
    columns = list(values)
    width = 0.8 / max(1, len(models))
    fig = Figure(figsize=(min(15.0, max(6.5, 2.2 + (0.75 + 0.3 * len(models)) * len(columns))), 4.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(columns), dtype=float)
    for i, model in enumerate(models):
        means, err_lo, err_hi = [], [], []
        for column in columns:
            mean, low, high = values[column].get(model, (float("nan"), None, None))
            means.append(mean)
            err_lo.append(0.0 if low is None or not np.isfinite(mean) else max(0.0, mean - low))
            err_hi.append(0.0 if high is None or not np.isfinite(mean) else max(0.0, high - mean))
        ax.bar(x + (i - (len(models) - 1) / 2) * width, means, width * 0.92, yerr=[err_lo, err_hi], capsize=2.5,
               color=colours[model], label=model, error_kw={"elinewidth": 1, "ecolor": "#333333"})
    ax.set_xticks(x, [labels.get(c, c) for c in columns], rotation=20, ha="right", fontsize=9)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9)
    _fit_width(fig, ax.set_title(title))
    return save_png(fig, path)


ROC_GRID = np.linspace(0.0, 1.0, 201)
"""False-positive rates at which ROC curves are averaged."""


def mean_roc(runs: Sequence[tuple[np.ndarray, np.ndarray]], grid: np.ndarray = ROC_GRID) -> np.ndarray | None:
    """True-positive rate on ``grid``, averaged over runs (vertical averaging).

    Each run is (y_true, proba). Two classes: the ROC curve of class 1. More: the macro average of
    the one-vs-rest curves of the classes present (sklearn's ``roc_curve`` for each). None when no
    run has both positives and negatives.
    """
    per_run = []
    for y, proba in runs:
        y, proba = np.asarray(y), np.asarray(proba, dtype=float)
        classes = [1] if proba.shape[1] == 2 else sorted(np.unique(y).tolist())
        curves = []
        for c in classes:
            truth = y == c
            if truth.all() or not truth.any():
                continue
            fpr, tpr, _ = roc_curve(truth, proba[:, c])
            curves.append(np.interp(grid, fpr, tpr))
        if curves:
            per_run.append(np.mean(curves, axis=0))
    if not per_run:
        return None
    tpr = np.mean(per_run, axis=0)
    tpr[0] = 0.0 if grid[0] == 0 else tpr[0]
    return tpr


def plot_roc_curves(panels: Mapping[str, Mapping[str, tuple[np.ndarray, float]]], subtitles: Mapping[str, str],
                    colours: Mapping[str, str], path: Path, title: str, grid: np.ndarray = ROC_GRID) -> Path:
    """One panel per task, one ROC curve per model; ``panels[task][model] = (tpr on grid, AUROC)``."""
    tasks = list(panels)
    fig, axes = _grid(len(tasks), width=4.0, height=4.3)
    models = sorted({m for t in tasks for m in panels[t]})
    for ax, task in zip(axes, tasks):
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#999999")
        for model in models:
            if model not in panels[task]:
                continue
            tpr, auc = panels[task][model]
            ax.plot(np.r_[0.0, grid], np.r_[0.0, tpr], lw=1.8, color=colours[model], label=f"{auc:.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(f"{task}\n{subtitles.get(task, '')}", fontsize=9)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.grid(alpha=0.3)
        ax.legend(title="AUROC", loc="lower right", fontsize=8, title_fontsize=8)
    _legend_below(fig, models, colours)
    _fit_width(fig, fig.suptitle(title))
    return save_png(fig, path)


def confusion_rates(runs: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int) -> np.ndarray:
    """Row-normalised confusion matrix (rows: true class, columns: predicted = argmax), pooled over runs.

    A class absent from the test set gives a row of NaN.
    """
    labels = np.arange(n_classes)
    counts = sum(confusion_matrix(np.asarray(y), np.asarray(p).argmax(1), labels=labels) for y, p in runs)
    counts = np.asarray(counts, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def plot_confusion_matrices(matrices: Mapping[str, np.ndarray], class_names: Sequence[str], path: Path,
                            title: str) -> Path:
    """One row-normalised confusion matrix per model, side by side, each cell annotated."""
    models = list(matrices)
    k = len(class_names)
    side = max(3.2, 0.62 * k + 1.9)
    fig = Figure(figsize=(side * len(models) + 0.8, side + 0.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(models), squeeze=False)).ravel()
    names = ["\n".join(textwrap.wrap(n, 14)) or n for n in class_names]
    image = None
    for ax, model in zip(axes, models):
        rates = matrices[model]
        image = ax.imshow(np.nan_to_num(rates), vmin=0, vmax=1, cmap="Blues", interpolation="nearest")
        for i in range(k):
            for j in range(k):
                v = rates[i, j]
                ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8 if k > 4 else 9,
                        color="white" if np.nan_to_num(v) > 0.55 else "black")
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=7.5)
        ax.set_yticks(range(k), names, fontsize=7.5)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(model, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of the true class")
    _fit_width(fig, fig.suptitle(title))
    return save_png(fig, path)
