"""Building a leaderboard: one cell per (model, task) from the store, comparisons with baselines."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from retbench import resampling as rs
from retbench import stats
from retbench.errors import RetbenchError
from retbench.metrics import METRICS, metric_for
from retbench.store import iter_results, safe_name

MEAN = "mean"
"""Column key of the mean over tasks."""

PRIMARY_PROTOCOL = "linear_probe"
"""Confusion matrices are drawn for this protocol (else for the first protocol written)."""

DEFAULT_RESAMPLES = rs.RESAMPLES


@dataclass
class Cell:
    """One model on one task (or the mean over tasks): mean, 95% CI and the per-run values."""

    model: str
    task: str
    metric: str
    k: int | None
    mean: float
    low: float | None
    high: float | None
    se: float | None
    n_runs: int
    ci_method: str
    values: dict[tuple[int, int], float] = field(default_factory=dict)
    interval: rs.Interval | None = None
    stored_method: str = ""
    """With ``ci_method == "stored"``: how the result made that interval (its ``ci_method``), for the footnote."""


@dataclass
class Comparison:
    """A model against the reference (best baseline) of one column."""

    model: str
    reference: str
    column: str
    delta: float
    test: str = ""
    n: int = 0
    p_value: float = float("nan")
    p_adjusted: float = float("nan")
    unit: str = ""


@dataclass
class PairedRow:
    """A Wilcoxon test of a model against one baseline over one unit of pairing."""

    model: str
    baseline: str
    unit: str
    result: stats.WilcoxonResult
    p_adjusted: float = float("nan")


@dataclass
class Board:
    """Everything one protocol's leaderboard shows, computed once and rendered three ways."""

    protocol: str
    tasks: list[str]
    models: list[str]
    metric_of: dict[str, str]
    k_of: dict[str, int | None]
    higher: dict[str, bool]
    cells: dict[tuple[str, str], Cell]
    baselines: list[str]
    requested_baselines: list[str]
    reference_of: dict[str, str]
    comparisons: dict[tuple[str, str], Comparison]
    paired: list[PairedRow]
    correction: str
    resamples: int
    results: dict[tuple[str, str], dict[str, Any]]
    versions: list[tuple[str, str]]
    classes: dict[str, list[str]]
    requested_metric: str | None = None
    figures: list[tuple[str, str]] = field(default_factory=list)

    def cell(self, model: str, column: str) -> Cell | None:
        """The cell of ``model`` in a task column or the mean column."""
        return self.cells.get((model, column))

    @property
    def columns(self) -> list[str]:
        """Task columns then the mean."""
        return [*self.tasks, MEAN]

    def column_higher(self, column: str) -> bool | None:
        """Direction of a column (None for a mean over metrics of mixed direction)."""
        if column != MEAN:
            return self.higher[column]
        directions = {self.higher[t] for t in self.tasks}
        return directions.pop() if len(directions) == 1 else None


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def load_store(results_dir: Path) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """Every result of the store: ``{protocol: {(model, task): result}}``."""
    by_protocol: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for r in iter_results(results_dir):
        by_protocol.setdefault(r["protocol"]["name"], {})[(r["model"]["name"], r["task"]["name"])] = r
    return by_protocol


def resolve_models(requested: Sequence[str], available: Iterable[str], what: str = "baseline") -> list[str]:
    """Map names given on the command line to stored model names.

    Exact names win; a family name (``classical``) or a path-safe name (``timm_resnet18``) matches
    when it is unambiguous. Unknown names raise with the close matches.
    """
    names = sorted(set(available))
    out = []
    for name in requested:
        if name in names:
            out.append(name)
            continue
        matches = [m for m in names if m.split(".")[0] == name or safe_name(m) == name]
        if len(matches) == 1:
            out.append(matches[0])
            continue
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RetbenchError(f"{what} '{name}' has no results in the store (models: {', '.join(names)}){hint}")
    return list(dict.fromkeys(out))


def headline_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    k = result.get("headline_k")
    return [r for r in result.get("runs", []) if r.get("k") == k]


def run_value(run: dict[str, Any], name: str) -> float:
    """A run's value of metric ``name``: stored, else recomputed from its predictions."""
    value = run.get("metrics", {}).get(name)
    if value is None and "predictions" in run:
        pred = run["predictions"]
        value = METRICS.get(name)(np.asarray(pred["y_true"]), np.asarray(pred["proba"], dtype=float))
    return float("nan") if value is None else float(value)


def stored_or(run: dict[str, Any], name: str, compute: Any) -> float:
    """A run's stored metric, else ``compute(y_true, proba)`` on its predictions (NaN without them)."""
    value = run.get("metrics", {}).get(name)
    if value is None and "predictions" in run:
        pred = run["predictions"]
        value = compute(np.asarray(pred["y_true"]), np.asarray(pred["proba"], dtype=float))
    return float("nan") if value is None else float(value)


def run_predictions(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    pred = run.get("predictions")
    if not pred:
        return None
    return np.asarray(pred["index"]), np.asarray(pred["y_true"]), np.asarray(pred["proba"], dtype=float)


def resampling_of(result: dict[str, Any]) -> tuple[dict[int, int] | None, str, int]:
    """A result's resampling units (test image → patient code), their name and the task's bootstrap seed.

    Results stored before units were recorded resample images.
    """
    stored = result.get("resampling") or {}
    seed = int(stored.get("seed", rs.task_seed(str(result["task"]["name"]))))
    if stored.get("unit") == "patient":
        return dict(zip(stored["index"], stored["cluster"])), "patient", seed
    return None, "image", seed


def class_predictions(result: dict[str, Any], runs: list[dict[str, Any]],
                      metric: str = "") -> list[rs.RunPredictions] | None:
    """The runs' per-image class predictions (VQA: per question type, for a headline metric), or None
    (retrieval results, a single VQA question's metric, or predictions not stored)."""
    kind = result["task"].get("kind", "classification")
    if kind == "retrieval" or (kind == "vqa" and "/" in metric):
        return None
    preds = [rs.predictions_of(r) for r in runs]
    present = [p for p in preds if p is not None]
    return None if not preds or len(present) < len(preds) else present


def make_cell(result: dict[str, Any], metric: str, runs: list[dict[str, Any]], resamples: int) -> Cell:
    """Mean and 95% CI of ``metric`` over ``runs`` of one result.

    From stored class predictions: the bootstrap over test patients × runs of
    :mod:`retbench.resampling`, point and interval from the same predictions. Without them
    (retrieval, VQA): the interval stored with the result.
    """
    values = {(int(r["seed"]), int(r.get("k") or 0)): run_value(r, metric) for r in runs}
    finite = np.array([v for v in values.values() if np.isfinite(v)], dtype=float)
    model, task, k = result["model"]["name"], result["task"]["name"], result.get("headline_k")
    if finite.size == 0:
        return Cell(model, task, metric, k, float("nan"), None, None, None, 0, "no value", values)
    preds = class_predictions(result, runs, metric)
    if preds is not None:
        cluster_of, unit, seed = resampling_of(result)
        iv = rs.bootstrap(metric_for(metric), preds, cluster_of, unit, n_resamples=resamples, seed=seed)
        if np.isfinite(iv.low) and np.isfinite(iv.high):
            return Cell(model, task, metric, k, iv.estimate, iv.low, iv.high, iv.se, len(preds), "bootstrap", values, iv)
    mean = float(np.mean(finite))
    summary = result.get("metrics", {}).get(metric, {})
    stored = summary.get("ci95")
    low, high = (stored if stored else (None, None))
    return Cell(model, task, metric, k, mean, low, high, None, int(finite.size), "stored" if stored else "none", values,
                stored_method=str(summary.get("ci_method", "")) if stored else "")


def _mean_cell(model: str, cells: list[Cell]) -> Cell:
    mean = float(np.mean([c.mean for c in cells]))
    intervals = [c.interval for c in cells if c.interval is not None]
    if len(intervals) == len(cells):
        _, low, high, se = rs.mean_of_intervals(intervals)
        return Cell(model, MEAN, "", None, mean, low, high, se, len(cells), "bootstrap")
    return Cell(model, MEAN, "", None, mean, None, None, None, len(cells), "none")


def _best(values: list[float], higher: bool | None) -> float | None:
    shown = [round(v, 3) for v in values if np.isfinite(v)]
    if not shown or higher is None:
        return None
    return max(shown) if higher else min(shown)


def build_board(protocol: str, results: dict[tuple[str, str], dict[str, Any]], metric: str | None = None,
                baselines: Sequence[str] = (), correction: str = "holm", resamples: int = DEFAULT_RESAMPLES) -> Board:
    """Collect cells, references, comparisons and paired tests for one protocol's results."""
    if correction not in stats.CORRECTIONS:
        raise RetbenchError(f"correction must be one of {', '.join(stats.CORRECTIONS)}, got '{correction}'")
    if metric is not None and metric_for(metric).per_class:
        raise RetbenchError(f"metric '{metric}' is per class; choose a scalar metric (retbench list metrics)")
    tasks = sorted({t for _, t in results})
    for task in tasks:
        stats.check_comparable([results[key] for key in sorted(results) if key[1] == task])
    cells: dict[tuple[str, str], Cell] = {}
    metric_of, k_of, higher, classes = {}, {}, {}, {}
    for (model, task), result in sorted(results.items()):
        name = metric or result["primary_metric"]
        metric_of[task], k_of[task] = name, result.get("headline_k")
        higher[task] = metric_for(name).higher_is_better  # qualified names too: image_to_text/recall_at_1
        classes[task] = list(result["task"].get("classes", []))
        cells[(model, task)] = make_cell(result, name, headline_runs(result), resamples)
    models = sorted({m for m, _ in results})
    for model in models:
        row = [c for t in tasks if (c := cells.get((model, t))) is not None and np.isfinite(c.mean)]
        if len(row) == len(tasks):
            cells[(model, MEAN)] = _mean_cell(model, row)
    versions = sorted({(t, str(r["task"]["version"])) for (_, t), r in results.items()})
    board = Board(protocol, tasks, models, metric_of, k_of, higher, cells, [m for m in baselines if m in models],
                  list(baselines), {}, {}, [], correction, resamples, results, versions, classes, metric)
    board.models = sorted(models, key=lambda m: _row_order(board, m))
    if board.baselines:
        _compare_with_references(board)
        _paired_tables(board)
    return board


def _row_order(board: Board, model: str) -> tuple[int, float, str]:
    mean = board.cell(model, MEAN)
    if mean is None:
        return (1, 0.0, model)
    direction = board.column_higher(MEAN)
    return (0, -mean.mean if direction is not False else mean.mean, model)


def best_value(board: Board, column: str, among: Iterable[str] | None = None) -> float | None:
    """Best displayed (3-decimal) value of a column, among all models or ``among``."""
    pool = board.models if among is None else list(among)
    return _best([c.mean for m in pool if (c := board.cell(m, column)) is not None], board.column_higher(column))


def _reference(board: Board, column: str) -> str | None:
    candidates = [(c.mean, m) for m in board.baselines if (c := board.cell(m, column)) is not None and np.isfinite(c.mean)]
    direction = board.column_higher(column)
    if not candidates:
        return None
    if direction is None:
        direction = True
    return sorted(candidates, key=lambda vm: (-vm[0] if direction else vm[0], vm[1]))[0][1]


def _pairs(board: Board, a: str, b: str, tasks: Sequence[str]) -> tuple[list[float], list[float], list[bool]]:
    xs, ys, hs = [], [], []
    for task in tasks:
        ca, cb = board.cell(a, task), board.cell(b, task)
        if ca is None or cb is None:
            continue
        for key in sorted(set(ca.values) & set(cb.values)):
            va, vb = ca.values[key], cb.values[key]
            if np.isfinite(va) and np.isfinite(vb):
                xs.append(va)
                ys.append(vb)
                hs.append(board.higher[task])
    return xs, ys, hs


def _task_means(board: Board, a: str, b: str) -> tuple[list[float], list[float], list[bool]]:
    shared = [t for t in board.tasks if board.cell(a, t) and board.cell(b, t)]
    return ([board.cells[(a, t)].mean for t in shared], [board.cells[(b, t)].mean for t in shared],
            [board.higher[t] for t in shared])


def runs_resample_test(board: Board, task: str) -> bool:
    """Whether the runs of ``task`` score different test images (folds), i.e. are replicates of test sampling."""
    for (_, t), result in board.results.items():
        if t != task:
            continue
        indices = {tuple(r["predictions"]["index"]) for r in headline_runs(result) if r.get("predictions")}
        if len(indices) < 2:
            return False
    return True


def _task_test(board: Board, model: str, ref: str, task: str) -> tuple[str, int, float, str]:
    """Paired test of two models on one task: (test, n, p, unit)."""
    ra, rb = board.results[(model, task)], board.results[(ref, task)]
    metric = board.metric_of[task]
    pa, pb = class_predictions(ra, headline_runs(ra), metric), class_predictions(rb, headline_runs(rb), metric)
    if pa is not None and pb is not None:
        cluster_of, unit, seed = resampling_of(ra)
        if metric == "auroc" and len(pa) == 1 and len(pb) == 1 and not pa[0].parts and pa[0].proba.shape[1] == 2:
            try:
                y = pa[0].y
                return "delong", len(y), stats.delong_test(y, pa[0].proba[:, 1], pb[0].proba[:, 1]).p_value, "image"
            except ValueError:
                pass
        try:
            boot = rs.paired_bootstrap(metric_for(metric), pa, pb, cluster_of, unit, n_resamples=board.resamples,
                                       seed=seed)
        except ValueError:
            return "", 0, float("nan"), ""
        return "bootstrap", boot.n_clusters, float(cast(float, boot.p_value)), unit  # paired: p_value is always set
    xs, ys, hs = _pairs(board, model, ref, [task])  # retrieval / VQA: stored runs only
    if len(xs) >= 2:
        return "wilcoxon", len(xs), stats.wilcoxon_test(xs, ys, hs).p_value, "run"
    return "", 0, float("nan"), ""


def _compare(board: Board, model: str, ref: str, column: str) -> Comparison:
    a, b = board.cell(model, column), board.cell(ref, column)
    assert a is not None and b is not None
    comp = Comparison(model, ref, column, a.mean - b.mean)
    if column == MEAN:
        xs, ys, hs = _task_means(board, model, ref)
        if len(xs) >= 2:
            w = stats.wilcoxon_test(xs, ys, hs)
            comp.test, comp.n, comp.p_value, comp.unit = "wilcoxon", w.n, w.p_value, "task"
        return comp
    comp.test, comp.n, comp.p_value, comp.unit = _task_test(board, model, ref, column)
    return comp


def _compare_with_references(board: Board) -> None:
    for column in board.columns:
        ref = _reference(board, column)
        if ref is None:
            continue
        board.reference_of[column] = ref
        compared = [m for m in board.models if m not in board.baselines and board.cell(m, column) is not None]
        comps = [_compare(board, m, ref, column) for m in compared]
        for comp, adj in zip(comps, stats.adjust_pvalues([c.p_value for c in comps], board.correction)):
            comp.p_adjusted = float(adj)
            board.comparisons[(comp.model, column)] = comp


UNITS = (("task", "tasks (task means)"), ("task × fold", "task × fold (runs with their own test sets)"))


def _paired_tables(board: Board) -> None:
    folds = bool(board.tasks) and all(runs_resample_test(board, t) for t in board.tasks)
    for baseline in board.baselines:
        for unit, _ in UNITS:
            if unit == "task × fold" and not folds:
                continue  # runs on one test set share its sampling error: not independent pairs
            group = []
            for model in board.models:
                if model in board.baselines:
                    continue
                xs, ys, hs = _task_means(board, model, baseline) if unit == "task" else _pairs(
                    board, model, baseline, board.tasks)
                if len(xs) >= 2:
                    group.append(PairedRow(model, baseline, unit, stats.wilcoxon_test(xs, ys, hs)))
            for row, adj in zip(group, stats.adjust_pvalues([r.result.p_value for r in group], board.correction)):
                row.p_adjusted = float(adj)
            board.paired.extend(group)
