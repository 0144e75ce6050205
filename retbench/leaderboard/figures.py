"""The PNG figures of a board: few-shot curves, per-task bars, ROC curves, confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retbench import stats
from retbench.leaderboard.board import Board, headline_runs, run_predictions, run_value, stored_or
from retbench.leaderboard.render import column_label
from retbench.store import safe_name


def _curve_points(result: dict[str, Any], metric: str) -> list[tuple[int, float, float | None, float | None]]:
    by_k: dict[int, list[float]] = {}
    for run in result.get("runs", []):
        if run.get("k") is not None:
            by_k.setdefault(int(run["k"]), []).append(run_value(run, metric))
    points: list[tuple[int, float, float | None, float | None]] = []
    for k, vals in sorted(by_k.items()):
        arr = np.array([v for v in vals if np.isfinite(v)])
        if arr.size == 0:
            continue
        if arr.size >= 2:  # spread of support sets; kept inside the metrics' [0, 1] scale (kappa may go below 0)
            low, high, _ = stats.t_interval(arr)
            low, high = max(low, min(0.0, float(arr.min()))), min(high, max(1.0, float(arr.max())))
            points.append((k, float(arr.mean()), low, high))
        else:
            points.append((k, float(arr.mean()), None, None))
    return points


def _task_runs(board: Board, model: str, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for run in headline_runs(board.results[(model, task)]):
        pred = run_predictions(run)
        if pred is not None:
            out.append((pred[1], pred[2]))
    return out


def write_figures(board: Board, out_dir: Path, colours: dict[str, str], confusion: bool) -> list[Path]:
    """Draw the protocol's figures under ``out_dir/figures`` and record them (caption, relative path) on the board."""
    from retbench.leaderboard import plots

    written: list[Path] = []
    fig_dir = out_dir / "figures"
    p = board.protocol

    curves = {t: {m: pts for m in board.models if (m, t) in board.results
                  and len(pts := _curve_points(board.results[(m, t)], board.metric_of[t])) > 1} for t in board.tasks}
    curves = {t: c for t, c in curves.items() if c}
    if curves:
        path = fig_dir / f"{p}-curves.png"
        plots.plot_few_shot_curves(curves, board.metric_of, colours, path,
                                   f"{p}: metric against shots per class (mean and 95% CI over seeds)")
        board.figures.append((f"{p}: metric against k, one line per model, 95% CI bands", f"figures/{path.name}"))
        written.append(path)

    values = {}
    for column in board.columns:
        values[column] = {m: (c.mean, c.low, c.high) for m in board.models
                          if (c := board.cell(m, column)) is not None and np.isfinite(c.mean)}
    labels = {c: "\n".join(column_label(board, c)) for c in board.columns}
    path = fig_dir / f"{p}-bars.png"
    plots.plot_task_bars(values, labels, sorted(board.models), colours, path, f"{p}: per task, mean and 95% CI")
    board.figures.append((f"{p}: per-task bars with 95% CIs", f"figures/{path.name}"))
    written.append(path)

    panels: dict[str, dict[str, tuple[np.ndarray, float]]] = {}
    subtitles = {}
    for task in board.tasks:
        for model in sorted(board.models):
            if (model, task) not in board.results:
                continue
            runs = _task_runs(board, model, task)
            tpr = plots.mean_roc(runs) if runs else None
            if tpr is None:
                continue
            headline = headline_runs(board.results[(model, task)])
            auc = float(np.nanmean([stored_or(r, "auroc", stats.macro_auroc) for r in headline]))
            panels.setdefault(task, {})[model] = (tpr, auc)
            n_classes = runs[0][1].shape[1]
            k = board.k_of.get(task)
            subtitles[task] = ("binary" if n_classes == 2 else f"macro one-vs-rest, {n_classes} classes") + (
                f", k={k}" if k is not None else "") + (f", mean of {len(runs)} runs" if len(runs) > 1 else "")
    if panels:
        path = fig_dir / f"{p}-roc.png"
        plots.plot_roc_curves(panels, subtitles, colours, path, f"{p}: ROC curves on the test set")
        board.figures.append((f"{p}: ROC curves per model and task (averaged over runs)", f"figures/{path.name}"))
        written.append(path)

    if confusion:
        for task in board.tasks:
            names = board.classes.get(task) or []
            matrices = {}
            for model in board.models:
                if (model, task) in board.results and (runs := _task_runs(board, model, task)):
                    matrices[model] = plots.confusion_rates(runs, runs[0][1].shape[1])
            if not matrices:
                continue
            k = next(iter(matrices.values())).shape[0]
            names = names if len(names) == k else [str(i) for i in range(k)]
            path = fig_dir / f"{p}-confusion-{safe_name(task)}.png"
            plots.plot_confusion_matrices(matrices, names, path,
                                          f"{task} ({p}): row-normalised confusion matrices, pooled over runs")
            board.figures.append((f"{task}: confusion matrices ({p})", f"figures/{path.name}"))
            written.append(path)
    return written
