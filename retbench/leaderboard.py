"""Leaderboards: tables, significance marks and figures rendered from the result store.

For each protocol, :func:`build_board` collects one :class:`Cell` per (model, task) — the mean of the
task's primary metric (or ``metric``) over the runs at the protocol's headline setting, with a 95% CI
(t over seeds; for a single run, a percentile bootstrap over test images stratified by class) — plus
the mean over tasks. With baselines (``--baseline MODEL``, repeatable), every other model is
compared with the best baseline of each column: the difference in parentheses and stars from a
paired test (Wilcoxon signed-rank over runs paired by seed, or by task × seed for the mean column;
a paired bootstrap or DeLong's test for single runs), corrected (Holm by default) over the models
compared. :func:`write_leaderboards` writes ``<protocol>.md`` (GitHub markdown), ``<protocol>.csv``,
``<protocol>.html`` and PNG figures under ``figures/``. Everything is a pure function of the store:
regenerating gives byte-identical files.
"""

from __future__ import annotations

import csv
import difflib
import html
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps
from tabulate import tabulate

from retbench import stats
from retbench.errors import RetbenchError
from retbench.io import atomic_write_bytes
from retbench.metrics import METRICS, metric_for
from retbench.store import iter_results, safe_name

MEAN = "mean"
"""Column key of the mean over tasks."""

PRIMARY_PROTOCOL = "linear_probe"
"""Confusion matrices are drawn for this protocol (else for the first protocol written)."""

DEFAULT_RESAMPLES = stats.MIN_RESAMPLES


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


def _headline_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    k = result.get("headline_k")
    return [r for r in result.get("runs", []) if r.get("k") == k]


def _run_value(run: dict[str, Any], name: str) -> float:
    """A run's value of metric ``name``: stored, else recomputed from its predictions."""
    value = run.get("metrics", {}).get(name)
    if value is None and "predictions" in run:
        pred = run["predictions"]
        value = METRICS.get(name)(np.asarray(pred["y_true"]), np.asarray(pred["proba"], dtype=float))
    return float("nan") if value is None else float(value)


def _stored_or(run: dict[str, Any], name: str, compute: Any) -> float:
    """A run's stored metric, else ``compute(y_true, proba)`` on its predictions (NaN without them)."""
    value = run.get("metrics", {}).get(name)
    if value is None and "predictions" in run:
        pred = run["predictions"]
        value = compute(np.asarray(pred["y_true"]), np.asarray(pred["proba"], dtype=float))
    return float("nan") if value is None else float(value)


def _predictions(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    pred = run.get("predictions")
    if not pred:
        return None
    return np.asarray(pred["index"]), np.asarray(pred["y_true"]), np.asarray(pred["proba"], dtype=float)


def _t_interval(values: np.ndarray) -> tuple[float, float, float]:
    n = len(values)
    se = float(np.std(values, ddof=1) / math.sqrt(n))
    half = float(sps.t.ppf(0.975, n - 1)) * se
    mean = float(np.mean(values))
    return mean - half, mean + half, se


def make_cell(result: dict[str, Any], metric: str, runs: list[dict[str, Any]], resamples: int) -> Cell:
    """Mean and 95% CI of ``metric`` over ``runs`` of one result."""
    values = {(int(r["seed"]), int(r.get("k") or 0)): _run_value(r, metric) for r in runs}
    finite = np.array([v for v in values.values() if np.isfinite(v)], dtype=float)
    model, task, k = result["model"]["name"], result["task"]["name"], result.get("headline_k")
    if finite.size == 0:
        return Cell(model, task, metric, k, float("nan"), None, None, None, 0, "no value", values)
    mean = float(np.mean(finite))
    if finite.size >= 2:
        low, high, se = _t_interval(finite)
        return Cell(model, task, metric, k, mean, low, high, se, int(finite.size), "t", values)
    pred = _predictions(runs[0]) if len(runs) == 1 else None
    if pred is not None:
        _, y, proba = pred
        try:
            boot = stats.bootstrap_ci(METRICS.get(metric), y, proba, n_resamples=resamples, seed=0)
            return Cell(model, task, metric, k, mean, boot.low, boot.high, boot.se, 1, "bootstrap", values)
        except ValueError:
            pass
    stored = result.get("metrics", {}).get(metric, {}).get("ci95")
    low, high = (stored if stored else (None, None))
    return Cell(model, task, metric, k, mean, low, high, None, 1, "stored" if stored else "none", values)


def _mean_cell(model: str, cells: list[Cell]) -> Cell:
    mean = float(np.mean([c.mean for c in cells]))
    if all(c.se is not None for c in cells):
        se = math.sqrt(sum(c.se ** 2 for c in cells)) / len(cells)  # type: ignore[operator]
        half = float(sps.norm.ppf(0.975)) * se
        return Cell(model, MEAN, "", None, mean, mean - half, mean + half, se, len(cells), "combined")
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
        cells[(model, task)] = make_cell(result, name, _headline_runs(result), resamples)
    models = sorted({m for m, _ in results})
    for model in models:
        row = [cells.get((model, t)) for t in tasks]
        if all(c is not None and np.isfinite(c.mean) for c in row):
            cells[(model, MEAN)] = _mean_cell(model, row)  # type: ignore[arg-type]
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


def _single_run_test(board: Board, model: str, ref: str, task: str) -> tuple[str, int, float]:
    ra, rb = _headline_runs(board.results[(model, task)]), _headline_runs(board.results[(ref, task)])
    if len(ra) != 1 or len(rb) != 1:
        return "", 0, float("nan")
    pa, pb = _predictions(ra[0]), _predictions(rb[0])
    if pa is None or pb is None or not np.array_equal(pa[0], pb[0]) or not np.array_equal(pa[1], pb[1]):
        return "", 0, float("nan")
    metric = board.metric_of[task]
    y = pa[1]
    if metric == "auroc" and pa[2].shape[1] == 2:
        try:
            return "delong", len(y), stats.delong_test(y, pa[2][:, 1], pb[2][:, 1]).p_value
        except ValueError:
            return "", 0, float("nan")
    try:
        boot = stats.paired_bootstrap(METRICS.get(metric), y, pa[2], pb[2], n_resamples=board.resamples, seed=0)
    except ValueError:
        return "", 0, float("nan")
    return "bootstrap", len(y), float(boot.p_value) if boot.p_value is not None else float("nan")


def _compare(board: Board, model: str, ref: str, column: str) -> Comparison:
    a, b = board.cell(model, column), board.cell(ref, column)
    assert a is not None and b is not None
    comp = Comparison(model, ref, column, a.mean - b.mean)
    tasks = board.tasks if column == MEAN else [column]
    xs, ys, hs = _pairs(board, model, ref, tasks)
    if len(xs) >= 2:
        w = stats.wilcoxon_test(xs, ys, hs)
        comp.test, comp.n, comp.p_value = "wilcoxon", w.n, w.p_value
    elif column != MEAN:
        comp.test, comp.n, comp.p_value = _single_run_test(board, model, ref, column)
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


UNITS = (("task", "tasks (task means)"), ("task × seed", "task × seed (runs)"))


def _paired_tables(board: Board) -> None:
    for baseline in board.baselines:
        for unit, _ in UNITS:
            group = []
            for model in board.models:
                if model in board.baselines:
                    continue
                if unit == "task":
                    shared = [t for t in board.tasks if board.cell(model, t) and board.cell(baseline, t)]
                    xs = [board.cells[(model, t)].mean for t in shared]
                    ys = [board.cells[(baseline, t)].mean for t in shared]
                    hs = [board.higher[t] for t in shared]
                else:
                    xs, ys, hs = _pairs(board, model, baseline, board.tasks)
                if len(xs) >= 2:
                    group.append(PairedRow(model, baseline, unit, stats.wilcoxon_test(xs, ys, hs)))
            for row, adj in zip(group, stats.adjust_pvalues([r.result.p_value for r in group], board.correction)):
                row.p_adjusted = float(adj)
            board.paired.extend(group)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass
class Shown:
    """A cell broken into the parts the three renderers lay out differently."""

    value: str
    bold: bool = False
    underline: bool = False
    delta: str = ""
    stars: str = ""
    ci: str = ""


def shown_cell(board: Board, model: str, column: str) -> Shown | None:
    """Formatted parts of one cell (None where the model has no value)."""
    c = board.cell(model, column)
    if c is None or not np.isfinite(c.mean):
        return None
    best = best_value(board, column)
    ref = board.reference_of.get(column)
    best_base = best_value(board, column, board.baselines) if board.baselines else None
    out = Shown(_f3(c.mean), bold=best is not None and round(c.mean, 3) == best,
                underline=model in board.baselines and best_base is not None and round(c.mean, 3) == best_base)
    if c.low is not None and c.high is not None:
        out.ci = f"[{_f3(c.low)}, {_f3(c.high)}]"
    comp = board.comparisons.get((model, column))
    if comp is not None and ref is not None:
        out.delta = f"({_f3(comp.delta, sign=True)})"
        out.stars = stats.stars(comp.p_adjusted)
    return out


def _f3(x: float, sign: bool = False) -> str:
    """Three decimals, never "-0.000"."""
    value = round(float(x), 3) + 0.0
    return f"{value:+.3f}" if sign else f"{value:.3f}"


def _column_label(board: Board, column: str) -> tuple[str, str]:
    if column == MEAN:
        return "mean", f"over {len(board.tasks)} tasks"
    k = board.k_of.get(column)
    return column, board.metric_of[column] + (f", k={k}" if k is not None else "")


def _markdown_cell(s: Shown | None) -> str:
    if s is None:
        return "–"
    value = s.value
    if s.underline:
        value = f"<u>{value}</u>"
    if s.bold:
        value = f"**{value}**"
    text = value
    if s.delta:
        text += f" {s.delta}"
    if s.stars:
        text += "<sup>" + s.stars.replace("*", "\\*") + "</sup>"
    if s.ci:
        text += f"<br>{s.ci}"
    return text


def _model_label(board: Board, model: str) -> str:
    return f"`{model}`" + (" (baseline)" if model in board.baselines else "")


def render_table(board: Board) -> str:
    """The GitHub-markdown table: models × tasks + mean."""
    header = ["model"] + ["{}<br>{}".format(*_column_label(board, c)) for c in board.columns]
    rows = [[_model_label(board, m)] + [_markdown_cell(shown_cell(board, m, c)) for c in board.columns]
            for m in board.models]
    return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True)


def _metric_phrase(board: Board) -> str:
    listed = ", ".join(f"`{n}`" for n in sorted(set(board.metric_of.values())))
    return f"each task's primary metric ({listed})" if board.requested_metric is None else listed


def _runs_phrase(board: Board) -> str:
    per_task = {t: max(c.n_runs for (m, tt), c in board.cells.items() if tt == t) for t in board.tasks}
    counts = sorted(per_task.values())
    usual = max(set(counts), key=lambda n: (counts.count(n), n))
    text = f"{usual} runs (seeds) per cell" if usual != 1 else "1 run per cell"
    others = sorted({n for n in counts if n != usual})
    for n in others:
        text += f"; {n} for " + ", ".join(t for t in board.tasks if per_task[t] == n)
    if any(k is not None for k in board.k_of.values()):
        text += (", at the k shown in the column header (the largest k run on the task; the curves figure shows "
                 "every k)")
    return text


def _ci_phrase(board: Board) -> str:
    methods = {c.ci_method for (m, t), c in board.cells.items() if t != MEAN}
    parts = []
    if "t" in methods:
        parts.append("t over seeds")
    if "bootstrap" in methods:
        single = sorted({t for (m, t), c in board.cells.items() if c.ci_method == "bootstrap"})
        parts.append(f"for single runs ({', '.join(single)}) a percentile bootstrap over test images stratified by class "
                     f"({board.resamples} resamples, seed 0)")
    if "stored" in methods:
        parts.append("for single runs without stored class predictions (retrieval, VQA), the interval stored with the "
                     "result (its `ci_method` says how it was computed)")
    return "; ".join(parts) or "none"


def footnotes(board: Board) -> list[str]:
    """The paragraphs under the table: what the cells are, the marks, the test, correction and n."""
    notes = [
        f"Each cell: mean of {_metric_phrase(board)} over the runs ({_runs_phrase(board)}); 95% CI in brackets: "
        f"{_ci_phrase(board)}. Mean column: unweighted mean over the {len(board.tasks)} tasks, for models with every "
        "task; its CI combines the per-task standard errors (tasks independent, normal approximation)."
    ]
    directions = {board.higher[t] for t in board.tasks}
    direction = ("higher is better for every metric shown" if directions == {True} else
                 "lower is better for every metric shown" if directions == {False} else "direction per metric")
    marks = f"**Bold**: best in the column ({direction}; ties at the shown precision all bold)."
    if board.baselines:
        marks += (" <u>Underlined</u>: best baseline in the column (baseline" + ("s" if len(board.baselines) > 1 else "")
                  + ": " + ", ".join(f"`{b}`" for b in board.baselines) + ").")
    notes.append(marks)
    notes.append(_significance_note(board))
    notes.append("Generated by `retbench leaderboard` from the result store; task versions: "
                 + ", ".join(f"{t} v{v}" for t, v in board.versions) + ".")
    return notes


def _n_phrase(ns: Sequence[int], unit: str) -> str:
    values = sorted(set(ns))
    return f"n = {'–'.join(map(str, [values[0], values[-1]])) if len(values) > 1 else values[0]} {unit}"


def _significance_note(board: Board) -> str:
    corr = stats.correction_name(board.correction)
    if not board.baselines:
        missing = [b for b in board.requested_baselines if b not in board.baselines]
        why = (f"the baseline{'s' if len(missing) > 1 else ''} {', '.join(f'`{b}`' for b in missing)} "
               f"{'have' if len(missing) > 1 else 'has'} no results under `{board.protocol}`" if missing
               else "no baseline was given (`retbench leaderboard --baseline MODEL`)")
        return (f"Significance: {why}, so no deltas, underlines or stars. With a baseline, each model is compared with "
                "the best baseline of each column by a two-sided Wilcoxon signed-rank test over runs paired by seed "
                "(by task × seed for the mean; for single runs, a paired bootstrap over test images stratified by class, "
                f"or DeLong's test for a binary AUROC), {corr}-corrected over the models compared.")
    comps = list(board.comparisons.values())
    n_compared = {col: sum(1 for c in comps if c.column == col) for col in board.columns}
    sizes = sorted(set(n_compared.values()) - {0})
    text = ("(±Δ): difference from the column's best baseline (model − baseline). "
            "<sup>\\*</sup> p < 0.01, <sup>\\*\\*</sup> p < 0.001, two-sided, "
            f"{corr}-adjusted over the {'/'.join(map(str, sizes)) or 0} model{'s' if sizes != [1] else ''} "
            "compared with the baseline in each column.")
    task_w = [c.n for c in comps if c.test == "wilcoxon" and c.column != MEAN]
    if task_w:
        small = min(task_w)
        text += (f" Per task: Wilcoxon signed-rank test (scipy) over runs paired by seed, {_n_phrase(task_w, 'pairs')}")
        floor = stats.min_wilcoxon_p(small)
        if floor >= 0.01:
            text += f" (with {small} pairs the smallest attainable p is {floor:.4g}, so no per-task star is possible)"
        text += "."
    boot = sorted({c.column for c in comps if c.test == "bootstrap"})
    if boot:
        text += (f" Single-run tasks ({', '.join(boot)}): paired bootstrap of the difference over the same resampled "
                 f"test images, stratified by class ({board.resamples} resamples, seed 0).")
    delong = sorted({c.column for c in comps if c.test == "delong"})
    if delong:
        text += f" Binary AUROC of single runs ({', '.join(delong)}): DeLong's test for correlated ROC curves."
    mean_w = [c.n for c in comps if c.test == "wilcoxon" and c.column == MEAN]
    if mean_w:
        text += (" Mean column: Wilcoxon signed-rank test over values paired by (task, seed), "
                 f"{_n_phrase(mean_w, '(task, seed) pairs')}.")
    text += " Zero differences are dropped (Wilcoxon's convention); the pairing unit is the run (seed), not the image."
    return text


def _paired_markdown(board: Board) -> list[str]:
    if not board.paired:
        return []
    corr = stats.correction_name(board.correction)
    rows = []
    for r in board.paired:
        w = r.result
        rows.append([f"`{r.model}`", f"`{r.baseline}`", dict(UNITS)[r.unit], str(w.n), f"{w.wins}/{w.ties}/{w.losses}",
                     _f3(w.median_difference, sign=True), f"{w.statistic:g}", _fmt_p(w.p_value), _fmt_p(r.p_adjusted),
                     f"{w.effect_size:+.2f}"])
    header = ["model", "baseline", "pairing", "n", "wins/ties/losses", "median Δ", "W", "p", f"p ({corr})", "r"]
    return [
        "## Paired comparisons with the baselines",
        "",
        "Two-sided Wilcoxon signed-rank tests (scipy) of each model against each baseline. Δ is oriented so that positive "
        "means the model is better; W is scipy's statistic (the smaller signed-rank sum); r is the matched-pairs "
        f"rank-biserial correlation (effect size, −1 … 1, positive: the model is better); p is {corr}-adjusted over the "
        "models compared with the same baseline under the same pairing. Pairing by task uses the task means; by "
        "task × seed, the runs with the same seed (and k).",
        "",
        tabulate(rows, headers=header, tablefmt="github", disable_numparse=True),
        "",
    ]


def _fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _title(board: Board) -> str:
    return f"Leaderboard — `{board.protocol}`"


def _summary(board: Board) -> str:
    base = (", baseline" + ("s " if len(board.baselines) > 1 else " ") + ", ".join(f"`{b}`" for b in board.baselines)
            if board.baselines else "")
    models, tasks = len(board.models), len(board.tasks)
    return f"{models} model{'s' if models != 1 else ''} × {tasks} task{'s' if tasks != 1 else ''}{base}."


def render_markdown(board: Board) -> str:
    """The complete markdown document for one protocol."""
    lines = [f"# {_title(board)}", "", _summary(board), "", render_table(board), ""]
    for note in footnotes(board):
        lines += [note, ""]
    lines += _paired_markdown(board)
    if board.figures:
        lines += ["## Figures", ""]
        for caption, rel in board.figures:
            lines += [f"**{caption}**", "", f"![{caption}]({rel})", ""]
    lines.append(f"Also as [CSV]({board.protocol}.csv) and a [standalone HTML page]({board.protocol}.html).")
    lines.append("")
    return "\n".join(lines)


_ALLOWED_TAGS = ("u", "sup", "br")


def markdown_inline_to_html(text: str) -> str:
    """Convert the markdown subset used in footnotes to HTML: `code`, **bold**, escaped stars, <u>, <sup>, <br>."""
    out = html.escape(text, quote=False)
    for tag in _ALLOWED_TAGS:
        out = out.replace(f"&lt;{tag}&gt;", f"<{tag}>").replace(f"&lt;/{tag}&gt;", f"</{tag}>")
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return out.replace("\\*", "*")


def _html_cell(s: Shown | None) -> str:
    if s is None:
        return "<td class='na'>–</td>"
    value = html.escape(s.value)
    if s.underline:
        value = f"<u>{value}</u>"
    if s.bold:
        value = f"<b>{value}</b>"
    extra = f" <span class='delta'>{html.escape(s.delta)}</span>" if s.delta else ""
    extra += f"<sup>{s.stars}</sup>" if s.stars else ""
    ci = f"<br><span class='ci'>{html.escape(s.ci)}</span>" if s.ci else ""
    return f"<td>{value}{extra}{ci}</td>"


HTML_STYLE = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#1f2328;line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #d0d7de;padding:5px 9px;text-align:center;vertical-align:top}th{background:#f6f8fa}
td:first-child{text-align:left;white-space:nowrap}.ci{color:#59636e;font-size:12px}.delta{color:#1f2328}
.na{color:#8c959f}code{background:#f6f8fa;padding:0 3px;border-radius:4px}img{max-width:100%;border:1px solid #eee}
p.note{font-size:14px}"""


def render_html(board: Board) -> str:
    """A standalone HTML page with the same table, notes, paired tests and figures."""
    head = "".join(f"<th>{html.escape(a)}<br><small>{html.escape(b)}</small></th>"
                   for a, b in (_column_label(board, c) for c in board.columns))
    body = []
    for m in board.models:
        label = f"<code>{html.escape(m)}</code>" + (" (baseline)" if m in board.baselines else "")
        body.append(f"<tr><td>{label}</td>" + "".join(_html_cell(shown_cell(board, m, c)) for c in board.columns) + "</tr>")
    title = html.escape(f"Leaderboard — {board.protocol}")
    parts = [
        "<!DOCTYPE html>", "<html lang='en'>", "<head>", "<meta charset='utf-8'>", f"<title>{title}</title>",
        f"<style>{HTML_STYLE}</style>", "</head>", "<body>", f"<h1>{markdown_inline_to_html(_title(board))}</h1>",
        f"<p>{markdown_inline_to_html(_summary(board))}</p>",
        f"<table><thead><tr><th>model</th>{head}</tr></thead><tbody>", *body, "</tbody></table>",
    ]
    parts += [f"<p class='note'>{markdown_inline_to_html(n)}</p>" for n in footnotes(board)]
    if board.paired:
        corr = stats.correction_name(board.correction)
        parts.append("<h2>Paired comparisons with the baselines</h2>")
        parts.append("<p class='note'>Two-sided Wilcoxon signed-rank tests; Δ positive means the model is better; r is the "
                     f"matched-pairs rank-biserial correlation; p adjusted ({html.escape(corr)}) over the models compared "
                     "with the same baseline under the same pairing.</p>")
        cols = ["model", "baseline", "pairing", "n", "wins/ties/losses", "median Δ", "W", "p", f"p ({corr})", "r"]
        parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>")
        for r in board.paired:
            w = r.result
            vals = [r.model, r.baseline, dict(UNITS)[r.unit], str(w.n), f"{w.wins}/{w.ties}/{w.losses}",
                    _f3(w.median_difference, sign=True), f"{w.statistic:g}", _fmt_p(w.p_value), _fmt_p(r.p_adjusted),
                    f"{w.effect_size:+.2f}"]
            parts.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in vals) + "</tr>")
        parts.append("</tbody></table>")
    if board.figures:
        parts.append("<h2>Figures</h2>")
        for caption, rel in board.figures:
            parts.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


CSV_COLUMNS = ["protocol", "model", "is_baseline", "task", "metric", "k", "mean", "ci_low", "ci_high", "se", "n_runs",
               "ci_method", "best", "best_baseline", "reference", "delta", "test", "n_pairs", "p_value", "p_adjusted",
               "stars"]


def _num(x: float | None) -> str:
    return "" if x is None or not np.isfinite(x) else format(float(x), ".10g")


def render_csv(board: Board) -> str:
    """One row per (model, column): the numbers behind the table, unformatted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for m in board.models:
        for column in board.columns:
            c = board.cell(m, column)
            if c is None:
                continue
            s = shown_cell(board, m, column)
            comp = board.comparisons.get((m, column))
            writer.writerow([
                board.protocol, m, int(m in board.baselines), column,
                board.metric_of.get(column, "mean of the task metrics"), "" if c.k is None else c.k,
                _num(c.mean), _num(c.low), _num(c.high), _num(c.se), c.n_runs, c.ci_method,
                int(bool(s and s.bold)), int(bool(s and s.underline)), comp.reference if comp else "",
                _num(comp.delta) if comp else "", comp.test if comp else "", comp.n if comp and comp.test else "",
                _num(comp.p_value) if comp else "", _num(comp.p_adjusted) if comp else "",
                stats.stars(comp.p_adjusted) if comp else "",
            ])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _curve_points(result: dict[str, Any], metric: str) -> list[tuple[int, float, float | None, float | None]]:
    by_k: dict[int, list[float]] = {}
    for run in result.get("runs", []):
        if run.get("k") is not None:
            by_k.setdefault(int(run["k"]), []).append(_run_value(run, metric))
    points = []
    for k, vals in sorted(by_k.items()):
        arr = np.array([v for v in vals if np.isfinite(v)])
        if arr.size == 0:
            continue
        if arr.size >= 2:
            low, high, _ = _t_interval(arr)
            points.append((k, float(arr.mean()), low, high))
        else:
            points.append((k, float(arr.mean()), None, None))
    return points


def _task_runs(board: Board, model: str, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for run in _headline_runs(board.results[(model, task)]):
        pred = _predictions(run)
        if pred is not None:
            out.append((pred[1], pred[2]))
    return out


def write_figures(board: Board, out_dir: Path, colours: dict[str, str], confusion: bool) -> list[Path]:
    """Draw the protocol's figures under ``out_dir/figures`` and record them (caption, relative path) on the board."""
    from retbench import plots

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
    labels = {c: "\n".join(_column_label(board, c)) for c in board.columns}
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
            headline = _headline_runs(board.results[(model, task)])
            auc = float(np.nanmean([_stored_or(r, "auroc", stats.macro_auroc) for r in headline]))
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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_leaderboards(results_dir: Path, out_dir: Path, protocols: list[str] | None = None, metric: str | None = None,
                       *, baselines: Sequence[str] = (), correction: str = "holm", resamples: int = DEFAULT_RESAMPLES,
                       figures: bool = True, written: list[Path] | None = None) -> list[Path]:
    """Write ``<out>/<protocol>.md``, ``.csv`` and ``.html`` per protocol, the figures and an index ``README.md``.

    Returns the markdown paths; every file written is appended to ``written`` when given.
    """
    store = load_store(results_dir)
    if not store:
        return []
    if protocols:
        unknown = [p for p in protocols if p not in store]
        if unknown:
            raise RetbenchError(f"no results for protocol {', '.join(unknown)} in {results_dir} "
                                f"(stored: {', '.join(sorted(store))})")
    if resamples < stats.MIN_RESAMPLES:
        raise RetbenchError(f"--resamples must be at least {stats.MIN_RESAMPLES}, got {resamples}")
    chosen = list(dict.fromkeys(protocols)) if protocols else sorted(store)
    all_models = sorted({m for p in chosen for m, _ in store[p]})
    base = resolve_models(list(baselines), all_models) if baselines else []
    colours = _colours(all_models)
    primary = PRIMARY_PROTOCOL if PRIMARY_PROTOCOL in chosen else chosen[0]
    files: list[Path] = []
    markdown: list[Path] = []
    boards = []
    for protocol in chosen:
        board = build_board(protocol, store[protocol], metric, base, correction, resamples)
        if figures:
            files += write_figures(board, out_dir, colours, confusion=protocol == primary)
        for suffix, text in (("md", render_markdown(board)), ("csv", render_csv(board)), ("html", render_html(board))):
            path = out_dir / f"{protocol}.{suffix}"
            atomic_write_bytes(path, text.encode())
            files.append(path)
        markdown.append(out_dir / f"{protocol}.md")
        boards.append(board)
    index = out_dir / "README.md"
    atomic_write_bytes(index, _index(boards).encode())
    files.append(index)
    if written is not None:
        written.extend(files)
    return markdown


def _colours(models: Sequence[str]) -> dict[str, str]:
    from retbench.plots import model_colours

    return model_colours(models)


def _index(boards: Sequence[Board]) -> str:
    lines = ["# Leaderboards", "", "Generated by `retbench leaderboard` from the result store.", ""]
    for b in boards:
        lines.append(f"- [{b.protocol}]({b.protocol}.md) — {_summary(b)} ([CSV]({b.protocol}.csv), "
                     f"[HTML]({b.protocol}.html))")
    lines.append("")
    return "\n".join(lines)
